"""``phi_policy: drop``: which of a file's element rows dicom_file_metadata gets.

``keep`` (the default, as the original plugin; ``ingest.status.PhiPolicy``) writes every
row. ``drop`` omits the rows of the attributes that PS3.15 Table E.1-1's Basic Profile
removes or replaces (``confidentiality_profile``), and of every private element, with
everything nested in them (an omitted sequence takes its items along). Actions, decided
per code:

- X (remove), Z (zero-length or dummy), D (dummy), U (replacement UID) and the choices
  between them (X/Z, X/D, Z/D, X/Z/D, X/Z/U*): all omitted. A dummy or an empty value in
  a research table tells nothing and a replacement UID needs a mapping the ETL does not
  keep, so every one of them means "the original value is not copied";
- except the top-level attributes the OMOP rows are keyed and dated by
  (``reader.OMOP_SOURCE_TAGS``: Study / Series / SOP Instance UID and the date and time
  attributes of the procedure and image date fallbacks). They are in the OMOP rows anyway,
  and the EAV rows of an instance are found by them;
- the table's row "Private Attributes" is applied as written: every element of an odd
  group, private creators included.

Only the rows are filtered, after the reader has built the instance record from the whole
file and after analytics have read the rows (``parse_pool.parse_file``): PatientID still maps
the person, and SR measurements and SEG segments still become measurement rows. Note that
Content Sequence (0040,A730) is in Table E.1-1 (action D; so in every edition since at least
2020), so under ``drop`` an SR's whole content tree (its free-text TEXT items, but also its
NUM items) is omitted from the EAV; the measurements made of it are in ``measurement``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

from dicom_etl_dagster.core.dicom.confidentiality_profile import in_basic_profile
from dicom_etl_dagster.core.dicom.elements import ElementRow
from dicom_etl_dagster.core.dicom.reader import OMOP_SOURCE_TAGS


class FilteredRows(NamedTuple):
    rows: list[ElementRow]  # numbered again: index, parents and items as the writer expects
    dropped: int  # rows omitted, nested ones included


def is_phi(row: ElementRow) -> bool:
    """Does ``drop`` omit this row by itself (not counting its parents)?"""
    if row.is_private:
        return True
    tag = _tag_number(row.tag)
    if row.parent_sequence_index is None and tag in OMOP_SOURCE_TAGS:
        return False
    return in_basic_profile(tag)


def drop_phi(rows: Sequence[ElementRow]) -> FilteredRows:
    """The rows without those ``is_phi`` names and without everything nested in them.

    Rows come in walk order (a sequence before its items' rows), so one pass sees every
    parent before its children. The rows left are numbered 0..n-1 again, parents pointing at
    the new numbers, and items are numbered again in order of appearance, so that the
    writer's id ranges (``metadata_copy``) have no holes.
    """
    new_index: dict[int, int] = {}  # old row index -> new, for the rows kept
    new_item: dict[int, int] = {}  # old item index -> new
    omitted: set[int] = set()  # old indexes of omitted rows
    kept: list[ElementRow] = []
    for row in rows:
        parent = row.parent_sequence_index
        if (parent is not None and parent in omitted) or is_phi(row):
            omitted.add(row.index)
            continue
        item = row.parent_item_index
        if item is not None and item not in new_item:
            new_item[item] = len(new_item)
        new_index[row.index] = len(kept)
        kept.append(
            row._replace(
                index=len(kept),
                parent_sequence_index=None if parent is None else new_index[parent],
                parent_item_index=None if item is None else new_item[item],
            )
        )
    return FilteredRows(kept, len(omitted))


@lru_cache(maxsize=16384)
def _tag_number(tag: str) -> int:
    """ "(0010,0010)" -> 0x00100010 (the rows' spelling of a tag, ``elements.fmt_tag``)."""
    return int(tag[1:5] + tag[6:10], 16)
