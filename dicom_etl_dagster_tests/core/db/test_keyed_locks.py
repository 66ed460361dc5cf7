"""``take_keyed_locks``: batches wait for each other only where their keys meet, a holder of
the schema's lock in exclusive mode waits for (and excludes) them all, and rolling back to a
savepoint releases the keyed locks taken after it (the writer's retry relies on that)."""

from __future__ import annotations

import psycopg
import pytest

from dicom_etl_dagster.core.db.tables import take_advisory_lock, take_keyed_locks

KEY = "dicom_etl_dagster.ingest:test_keyed_locks"


@pytest.fixture
def connections(database_url):
    conns = [psycopg.connect(database_url) for _ in range(2)]
    for conn in conns:
        conn.execute("SET lock_timeout = '300ms'")
        conn.commit()
    yield conns
    for conn in conns:
        conn.close()


def _waits(action) -> bool:
    """Whether ``action`` ran into lock_timeout (it waited for the other connection)."""
    try:
        action()
    except psycopg.errors.LockNotAvailable:
        return True
    return False


def test_keys_exclude_only_where_they_meet(connections):
    a, b = connections
    take_keyed_locks(a, KEY, ["series:1", "study:1"])
    assert not _waits(lambda: take_keyed_locks(b, KEY, ["series:2", "study:2"]))
    b.rollback()
    assert _waits(lambda: take_keyed_locks(b, KEY, ["series:9", "study:1"]))
    b.rollback()
    # The schema's lock in exclusive mode waits for every holder of keys.
    assert _waits(lambda: take_advisory_lock(b, KEY))
    b.rollback()
    a.commit()
    assert not _waits(lambda: take_advisory_lock(b, KEY))
    # ... and, held, keeps every keyed batch out.
    assert _waits(lambda: take_keyed_locks(a, KEY, ["series:3"]))
    a.rollback()
    b.rollback()


def test_rollback_to_savepoint_releases_the_keyed_locks(connections):
    a, b = connections
    with pytest.raises(RuntimeError), a.transaction():
        take_keyed_locks(a, KEY, ["series:1"])
        raise RuntimeError
    # a's transaction goes on, without the locks it took inside the savepoint.
    assert not _waits(lambda: take_advisory_lock(b, KEY))
    b.rollback()
    a.rollback()
