"""The run's id ranges the series checks read: adjacent batches' ranges become one query."""

from dicom_etl_dagster.core.ingest.checks import coalesced


def test_adjacent_and_overlapping_ranges_are_joined_and_empty_ones_dropped():
    ranges = [range(20, 25), range(0, 0), range(10, 15), range(15, 20), range(40, 41)]
    assert coalesced(ranges) == [range(10, 25), range(40, 41)]


def test_no_ranges_no_queries():
    assert coalesced([]) == []
    assert coalesced([range(7, 7)]) == []
