"""Which dicom_data_element entry a private element belongs to, and what that entry is called.

Why: a private tag means nothing without its private creator. (0019,1060) is "Starting view"
under GE's creator ``GEMS_ACQU_01`` and something else, or nothing anyone has published,
under AGFA's or SonoSite's; a dictionary keyed by tag alone gave every vendor's element the
name of whichever file came first. And the block number (the ``10`` of ``1060``) is chosen
per file (PS3.5 7.8.1): (0019,1060) and (0019,1160) under the same creator are the same
attribute. So a private element with a creator belongs to the entry of its creator, its group
and its element byte, ``(gggg,xxee)`` with the block masked as pydicom's private dictionary
masks it; a private creator element ``(gggg,00bb)`` to its creator's ``(gggg,00xx)``.

An entry is named only from pydicom's private dictionary of its own creator, else left
unnamed. Private elements without a creator (no reservation in their dataset) have nothing to
key by but their tag: they keep the entry of their tag, as public tags do.

The parse workers render an entry's key into each row's COPY template (``metadata_copy``);
the writer finds or adds the entry (``data_elements``). The key holds the element's own tag
as well, so that a dicom_data_element table without the private_creator column (a user's
table, never altered) can still be given one entry per tag, as before.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from pydicom.datadict import get_private_entry

#: The block a creator is given first: what pydicom's explicit (unmasked) entries describe.
FIRST_BLOCK = 0x10
PRIVATE_CREATOR_NAME = "Private Creator"


class PrivateDescription(NamedTuple):
    name: str | None
    vr: str | None
    vm: str | None


def entry_key(dictionary_tag: str, is_private: bool, creator: str | None) -> str:
    """The ``DataElementIds`` key of an element's entry: its dictionary tag, and for a private
    element with a creator the creator too (hex-encoded: any text can be a private creator,
    only some can be a ``str.format`` field name)."""
    if not (is_private and creator):
        return dictionary_tag
    return _private_key(dictionary_tag, creator)


@lru_cache(maxsize=65536)
def _private_key(dictionary_tag: str, creator: str) -> str:
    return f"{dictionary_tag}@{creator.encode('utf-8').hex()}"


def private_entry_tag(tag: str) -> str:
    """The per-creator entry's tag of a private tag ``(gggg,eeee)``: ``(gggg,xxee)`` for an
    element of a block, ``(gggg,00xx)`` for a private creator element (gggg,0010-00FF)."""
    group, element = tag[1:5], int(tag[6:10], 16)
    if 0x0010 <= element <= 0x00FF:
        return f"({group},00xx)"
    if element >> 8 < FIRST_BLOCK:
        raise ValueError(f"{tag} is in no private block: it has no private creator")
    return f"({group},xx{element & 0xFF:02X})"


@lru_cache(maxsize=16384)
def describe_private_entry(entry_tag: str, creator: str) -> PrivateDescription:
    """Name, VR and VM of the entry from pydicom's private dictionary of ``creator``.

    A block element is looked up as pydicom looks up the element in the creator's first block,
    (gggg,10ee): the explicit entry of that block, else the masked ``ggggxxee``, else
    ``ggxxxxee``. Unknown to the dictionary: no name, no VR, no VM.
    """
    group, element = entry_tag[1:5], entry_tag[6:10]
    if element == "00xx":
        return PrivateDescription(PRIVATE_CREATOR_NAME, "LO", "1")
    tag = (int(group, 16) << 16) | (FIRST_BLOCK << 8) | int(element[2:], 16)
    try:
        vr, vm, name, _retired = get_private_entry(tag, creator)
    except KeyError:
        return PrivateDescription(None, None, None)
    return PrivateDescription(name or None, vr or None, vm or None)
