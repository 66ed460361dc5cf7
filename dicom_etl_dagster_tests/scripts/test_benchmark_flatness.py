"""benchmark.py's first / last 10% comparison: CPU per row, and the backend's kernel share."""

from __future__ import annotations

import pytest

from dicom_etl_dagster_tests.helpers import load_script

benchmark = load_script("benchmark")


def _marks(kernel_per_batch: list[float]) -> list:
    """20 batches of 10 files and 1,000 rows each; the backend spends 2 ms of CPU per batch,
    of it ``kernel_per_batch[i]`` in the kernel; the main process 1 ms."""
    marks, backend, kernel = [], 0.0, 0.0
    for i, batch_kernel in enumerate(kernel_per_batch):
        backend, kernel = backend + 0.002, kernel + batch_kernel
        marks.append(
            benchmark.BatchMark(
                at=float(i + 1),
                files_done=10 * (i + 1),
                elements_done=1000 * (i + 1),
                write_seconds=0.5,
                main_cpu=0.001 * (i + 1),
                backend_cpu=backend,
                backend_kernel_cpu=kernel,
                own_cpu=0.004 * (i + 1),
                machine_busy=0.004 * (i + 1),
            )
        )
    return marks


def test_the_last_tenth_separates_the_backends_kernel_time():
    """A backend whose kernel time per row quadruples late in the run, with the same CPU in
    all: the write path's CPU per row stays flat, and the kernel's share is reported."""
    kernel = [0.0002] * 17 + [0.0008] * 3
    result = benchmark.PhaseResult("ETL", extra={"marks": _marks(kernel), "started": 0.0})
    flat = benchmark.flatness(result, total_files=200)
    first, last = flat["first_costs"], flat["last_costs"]
    assert first["backend_us_per_row"] == pytest.approx(2.0)
    assert last["backend_us_per_row"] == pytest.approx(2.0)
    assert first["backend_kernel_us_per_row"] == pytest.approx(0.2)
    assert last["backend_kernel_us_per_row"] == pytest.approx(0.8)
    assert [round(w["backend_kernel_us_per_row"], 2) for w in flat["windows"]][-1] == 0.8
