"""The progress reporter, driven by a fake clock."""

from __future__ import annotations

from dicom_etl_dagster.core.progress import ProgressReporter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_per_interval_with_done_total_rate_and_time_left():
    clock, lines = FakeClock(), []
    reporter = ProgressReporter("ingest", 1000, lines.append, interval=10.0, clock=clock)
    clock.now += 4
    reporter.update(40)  # 4 s after the start: too early
    assert lines == []
    clock.now += 6
    reporter.update(100)  # 10 s: 10 files/s, 900 left -> 90 s, shown in minutes
    clock.now += 9.9
    reporter.update(150)  # 9.9 s after the last line: none
    clock.now += 0.1
    reporter.update(200, note="2 failed")  # 20 s: 10 files/s, 800 left
    assert lines == [
        "ingest: 100 / 1000 files (10%), 10.0 files/s, about 2 min left",
        "ingest: 200 / 1000 files (20%), 10.0 files/s, about 80 s left; 2 failed",
    ]


def test_long_estimates_are_in_minutes_and_hours():
    clock, lines = FakeClock(), []
    reporter = ProgressReporter("upload", 100_000, lines.append, interval=10.0, clock=clock)
    clock.now += 10
    reporter.update(10)  # 1 file/s, 99,990 left: 1,666.5 min
    clock.now += 10
    reporter.update(10_000)  # 500 files/s, 90,000 left: 3 min
    assert lines == [
        "upload: 10 / 100000 files (0%), 1.0 files/s, about 27 h 46 min left",
        "upload: 10000 / 100000 files (10%), 500.0 files/s, about 3 min left",
    ]


def test_nothing_done_yet_and_more_done_than_counted():
    clock, lines = FakeClock(), []
    reporter = ProgressReporter("ingest", 5, lines.append, interval=0.0, clock=clock)
    reporter.update(0)  # no time has passed: no rate, no estimate
    clock.now += 2
    reporter.update(6)  # a file was added after the count
    assert lines == [
        "ingest: 0 / 5 files (0%), 0.0 files/s, time left not known yet",
        "ingest: 6 / 6 files (100%), 3.0 files/s, finishing",
    ]
