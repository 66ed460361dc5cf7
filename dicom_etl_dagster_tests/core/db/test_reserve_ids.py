"""``reserve_ids`` from several connections at once, none holding the ingest lock: every
reservation is a consecutive range, and no two overlap."""

from __future__ import annotations

import threading

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.db.tables import reserve_ids
from dicom_etl_dagster_tests.conftest import scalar

CONNECTIONS = 4
RESERVATIONS = 150  # per connection
SEQUENCE = sql.Identifier("public", "reserve_test_seq")


def test_concurrent_reservations_are_disjoint_consecutive_ranges(database_url, db):
    db.execute("CREATE SEQUENCE public.reserve_test_seq")
    db.commit()
    ranges: list[range] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(CONNECTIONS)

    def reserve(worker: int) -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                barrier.wait()
                for i in range(RESERVATIONS):
                    count = 1 + (worker * 7 + i) % 13  # sizes 1..13, different per worker
                    first = reserve_ids(conn, SEQUENCE, count)
                    ranges.append(range(first, first + count))
                # No session lock is left behind by the statements.
                assert (
                    scalar(
                        conn,
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                        " AND pid = pg_backend_pid()",
                    )
                    == 0
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reserve, args=(w,)) for w in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(ranges) == CONNECTIONS * RESERVATIONS
    handed_out = [i for r in ranges for i in r]
    # Disjoint, and together exactly 1..n: nothing overlaps, nothing is lost.
    assert sorted(handed_out) == list(range(1, len(handed_out) + 1))
    assert scalar(db, "SELECT last_value FROM public.reserve_test_seq") == len(handed_out)


def test_reserving_nothing_sends_nothing(db):
    assert reserve_ids(db, SEQUENCE, 0) == 0
