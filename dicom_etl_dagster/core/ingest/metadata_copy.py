"""A file's dicom_file_metadata rows, rendered by the parse worker as one COPY text template.

Why: the main process is the ETL's only writer, so its CPU per row bounds the whole ingest.
It used to unpickle ~200 ElementRow namedtuples per file, build a 19-field tuple per row
and have psycopg serialise every field. Nearly all of a row depends on the file alone; only
the ids the writer reserves under its lock, the data_element_id of tags it may still have to
add, the series' image_occurrence_id and the batch's timestamp are not known in the worker.
So the worker renders everything else as final PostgreSQL COPY text and leaves exactly those
values as ``str.format`` fields; the main process receives one string per file and fills it
with one ``str.format`` call, which runs in C.

Fields of the template (one line per row, columns in ``COLUMNS`` order):

- ``{i}``: metadata_id, positional field i = the row's index in the file;
- ``{p}``: parent_sequence_id, the positional field of the parent sequence row;
- ``{<n + k>}``: parent_dataset_id of item k, where n = the file's row count;
- ``{d[<entry key>]}``: data_element_id, looked up in a ``DataElementIds`` by the key of the
  element's dicom_data_element entry (``private_entries.entry_key``: the dictionary tag, and
  for a private element its private creator too). A parse worker given the entries the
  run started with (``use_known_entries``) writes their ids into the template instead:
  the writer then looks up only the entries it learns during the run;
- ``{e}``: the end of the row, from sop_instance_id on: the same for every row of the file,
  so ``fill`` makes it once per file (``RenderedMetadata.file_columns``, then the writer's
  image_occurrence_id, then the batch's timestamps where the table needs them). One field
  per row instead of three, and a template of about half the characters to pickle and send.

The ETL's table fills etl_created_datetime and etl_modified_datetime itself (their default,
revision 0008): PostgreSQL parsing two text timestamps per row was ~0.55 of its ~2.5 µs per
row. The writer sends them only to a table without those defaults (a user's).

Everything else is COPY text (``\\N`` for NULL, ``t``/``f``, escaped backslash, tab, newline
and carriage return) with ``{`` and ``}`` doubled so that ``str.format`` leaves it alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import NamedTuple

from dicom_etl_dagster.core.dicom.reader import DicomInstance, ElementRow
from dicom_etl_dagster.core.ingest.private_entries import entry_key

#: The COPY column list matching the template's column order.
COLUMNS = (
    "metadata_id",
    "parent_sequence_id",
    "parent_dataset_id",
    "data_element_id",
    "metadata_source_keyword",
    "metadata_source_tag",
    "metadata_source_group_number",
    "metadata_source_value_representation",
    "metadata_source_value_multiplicity",
    "metadata_source_value",
    "is_sequence",
    "sequence_length",
    "is_private",
    "private_creator",
    "sop_instance_id",
    "instance_number",
    "image_occurrence_id",
    "etl_created_datetime",
    "etl_modified_datetime",
)
#: The columns whose values are the batch's: left to the ETL's table's defaults.
TIMESTAMP_COLUMNS = COLUMNS[-2:]

NULL = "\\N"  # COPY text format's NULL
TEXT_COLUMN_LENGTH = 255  # private_creator, data_element_name, data_element_keyword: varchar(255)

# COPY text escapes and str.format's brace doubling in one pass. A NUL is left as it is:
# storable_text removes it where the writer always did; elsewhere PostgreSQL refuses it, as before.
# (_text and render_metadata test for these six characters before translating.)
_TEMPLATE_ESCAPES = str.maketrans(
    {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "{": "{{", "}": "}}"}
)
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


#: A dicom_data_element row the writer adds if the dictionary lacks the entry:
#: (entry key, dictionary_tag, name, keyword, vr, is_private, private creator). A plain tuple:
#: it unpickles faster than a NamedTuple.
TagCandidate = tuple[str, str, str | None, str | None, str, bool, str | None]


class RenderedMetadata(NamedTuple):
    template: str  # the file's rows as COPY text with str.format fields (see the module docstring)
    row_count: int  # metadata ids the file needs
    item_count: int  # dataset ids the file needs: sequence items, numbered 0..item_count-1
    new_tag_candidates: tuple[TagCandidate, ...]  # one per distinct entry key, first seen wins
    file_columns: str  # sop_instance_id and instance_number as COPY text, tab-separated


class DataElementIds(dict):
    """entry key -> data_element_id; a key without an entry fills in as NULL."""

    def __missing__(self, tag: str) -> str:
        return NULL


def storable_text(value: str | None, limit: int | None = None) -> str | None:
    """``value`` as PostgreSQL text can hold it (no NUL), cut to the column's width."""
    if value is None:
        return None
    value = value.replace("\x00", "")
    return value[:limit] if limit else value


def render_metadata(instance: DicomInstance) -> RenderedMetadata:
    """Render every metadata row of ``instance``; runs in the parse worker."""
    rows = instance.elements
    row_count = len(rows)
    file_columns = f"{_copy_text(instance.sop_instance_uid)}\t{_number(instance.instance_number)}"
    lines = []
    item_count = 0
    candidates: dict[str, TagCandidate] = {}
    # This loop runs for every row of every file (~180 per file), so its work is written out
    # inline: a Python call costs about as much as a row's own work. Unpacking the row is
    # cheaper than reading the NamedTuple's fields by name.
    rendered_elements = _RENDERED_ELEMENTS
    fields = _positional_fields(row_count)
    for position, (
        index,
        parent_sequence,
        parent_item,
        tag,
        group,
        dictionary_tag,
        keyword,
        name,
        vr,
        vm,
        value,
        is_sequence,
        sequence_length,
        is_private,
        private_creator,
    ) in enumerate(rows):
        if (
            index != position
            or (parent_sequence is not None and not 0 <= parent_sequence < row_count)
            or (parent_item is not None and parent_item < 0)
        ):
            _check_numbering(rows[position], position, row_count)  # raises, saying what is wrong
        if parent_item is not None and parent_item >= item_count:
            item_count = parent_item + 1
            fields = _positional_fields(row_count + item_count)
        # Everything the row's element decides, rendered once per worker (_render_element).
        element = (tag, group, dictionary_tag, keyword, name, vr, vm, is_private, private_creator)
        try:
            columns, private_columns, key, candidate = rendered_elements[element]
        except KeyError:
            columns, private_columns, key, candidate = _render_element(element)
        if key not in candidates:
            candidates[key] = candidate
        value = _text(value)
        # One f-string for the whole line: cheaper than a tuple, "\t".join and concatenation.
        lines.append(
            f"{fields[index]}\t"
            f"{NULL if parent_sequence is None else fields[parent_sequence]}\t"
            f"{NULL if parent_item is None else fields[row_count + parent_item]}\t"
            f"{columns}\t"
            f"{value}\t"
            f"{'t' if is_sequence else 'f'}\t"
            f"{NULL if sequence_length is None else int(sequence_length)}\t"
            f"{private_columns}{{e}}"
        )
    return RenderedMetadata(
        "".join(lines), row_count, item_count, _shared(tuple(candidates.values())), file_columns
    )


def timestamp_fields(timestamp_text: str) -> str:
    """What ends each row after image_occurrence_id for a table that needs the timestamps
    given: the batch's (as its transaction's start, the ETL table's default) twice."""
    return f"\t{timestamp_text}" * len(TIMESTAMP_COLUMNS)


def fill(
    rendered: RenderedMetadata,
    metadata_id: int,
    dataset_id: int,
    image_occurrence_id: int,
    data_elements: DataElementIds,
    timestamps: str = "",
) -> str:
    """The file's rows as COPY text, given the first of its reserved metadata and dataset ids;
    ``timestamps`` ends each row (``timestamp_fields``)."""
    return rendered.template.format(
        *range(metadata_id, metadata_id + rendered.row_count),
        *range(dataset_id, dataset_id + rendered.item_count),
        d=data_elements,
        e=f"\t{rendered.file_columns}\t{image_occurrence_id}{timestamps}\n",
    )


def _check_numbering(row: ElementRow, position: int, row_count: int) -> None:
    """The reader's numbering is what the template's positional fields stand for; a row that
    broke it would silently take another row's id (or a dataset id), so it stops the run."""
    if row.index != position:
        raise ValueError(
            f"element rows must be numbered in order: row {position} has index {row.index}"
        )
    if row.parent_sequence_index is not None and not 0 <= row.parent_sequence_index < row_count:
        raise ValueError(
            f"row {position}: parent sequence row {row.parent_sequence_index} does not exist"
        )
    if row.parent_item_index is not None and row.parent_item_index < 0:
        raise ValueError(f"row {position}: negative item index {row.parent_item_index}")


#: The columns of a row that only its element decides: tag, group, dictionary_tag, keyword,
#: name, vr, vm, is_private, private_creator.
_Element = tuple[str, str, str, str | None, str | None, str, str, bool, str | None]
#: What an element renders to: (data_element_id's field to metadata_source_value_multiplicity,
#: is_private and private_creator, the entry key, the tag candidate). A plain tuple: the render
#: loop unpacks it faster than a NamedTuple.
_RenderedElement = tuple[str, str, str, TagCandidate]
#: The same few hundred elements recur in every file, so each is rendered once per worker and
#: a row then costs one dict lookup for all of them (keyed by the whole element: cheaper than
#: building and hashing the arguments of lru_caches for the parts).
_RENDERED_ELEMENTS: dict[_Element, _RenderedElement] = {}
_RENDERED_ELEMENTS_LIMIT = 65536  # emptied when full: a bound on memory for an odd corpus

#: "{0}", "{1}", ...: the positional fields, made once per worker (formatting an int into a
#: new field string costs several times a list lookup). As long as the largest file needed.
_POSITIONAL_FIELDS: list[str] = []


def _positional_fields(count: int) -> list[str]:
    """``_POSITIONAL_FIELDS``, holding at least fields 0 to ``count - 1``."""
    fields = _POSITIONAL_FIELDS
    if len(fields) < count:
        fields.extend(f"{{{n}}}" for n in range(len(fields), count))
    return fields


#: Entry key -> data_element_id of the dictionary entries the run started with, in a parse
#: worker (``use_known_entries``); empty elsewhere.
_KNOWN_ENTRY_IDS: dict[str, int] = {}


def use_known_entries(ids: Mapping[str, int]) -> None:
    """Render these entries' data_element_id as the id itself from now on, in this process.

    For a parse worker, which serves one run: ``ids`` are the entries the run found at its
    start, whose ids never change during it. Entries the writer adds or learns later stay
    ``{d[...]}`` fields, filled with what the writer knows when it writes the batch (an
    entry added in an attempt that rolled back is not one of these).
    """
    _KNOWN_ENTRY_IDS.clear()
    _KNOWN_ENTRY_IDS.update(ids)
    _RENDERED_ELEMENTS.clear()  # rendered with the ids known before


def _render_element(element: _Element) -> _RenderedElement:
    tag, group, dictionary_tag, keyword, name, vr, vm, is_private, private_creator = element
    creator = storable_text(private_creator, TEXT_COLUMN_LENGTH)
    key = entry_key(dictionary_tag, is_private, creator)
    known_id = _KNOWN_ENTRY_IDS.get(key)
    rendered = (
        "\t".join(
            (
                _data_element_field(key) if known_id is None else str(int(known_id)),
                _text(keyword),
                _text(tag),
                _text(group),
                _text(vr),
                _text(vm),
            )
        ),
        f"{'t' if is_private else 'f'}\t{_text(creator)}",
        key,
        _tag_candidate(key, dictionary_tag, name, keyword, vr, is_private, creator or None),
    )
    if len(_RENDERED_ELEMENTS) >= _RENDERED_ELEMENTS_LIMIT:
        _RENDERED_ELEMENTS.clear()
    _RENDERED_ELEMENTS[element] = rendered
    return rendered


def _text(value: str | None) -> str:
    if value is None:
        return NULL
    # Most values need no escaping; checking first is cheaper than translating every one, and
    # six `in` tests (each a fast C scan) are cheaper than a regex search.
    if (
        "\\" in value
        or "{" in value
        or "}" in value
        or "\t" in value
        or "\n" in value
        or "\r" in value
    ):
        return value.translate(_TEMPLATE_ESCAPES)
    return value


def _copy_text(value: str | None) -> str:
    """``value`` as COPY text, for a ``str.format`` argument (whose braces stay as they are)."""
    if value is None:
        return NULL
    return value.translate(_COPY_ESCAPES)


def _number(value: int | None) -> str:
    return NULL if value is None else str(int(value))


def _data_element_field(key: str) -> str:
    """``{d[<key>]}``, after proving that str.format looks up exactly ``key`` with it.

    A field name cannot hold every string (not "]", and an all-digit index becomes an int);
    the reader's tags, "(0008,0016)" and "(60xx,3000)", and the hex-encoded creators of
    private keys are fine, and a surprise fails here, in the worker, instead of filling in
    another entry's id.
    """
    field = f"{{d[{key}]}}"
    try:
        looked_up = field.format(d=_KeyEcho())
    except (ValueError, IndexError, KeyError):
        looked_up = None
    if looked_up != repr(key):
        raise ValueError(f"dictionary tag {key!r} cannot be a str.format field name")
    return field


class _KeyEcho(dict):
    def __missing__(self, key: object) -> str:
        return repr(key)


# The two caches below return the object made for an earlier, equal value. Pickle writes an
# object it has seen before in the same dump as a back-reference, and the pool pickles a whole
# chunk of results at once: files with the same tags (a series, a modality) then cost the
# main process one back-reference for their candidates instead of ~200 tuples to rebuild.
@lru_cache(maxsize=65536)
def _tag_candidate(
    key: str,
    dictionary_tag: str,
    name: str | None,
    keyword: str | None,
    vr: str,
    is_private: bool,
    creator: str | None,
) -> TagCandidate:
    return (
        key,
        dictionary_tag,
        storable_text(name, TEXT_COLUMN_LENGTH),
        storable_text(keyword, TEXT_COLUMN_LENGTH),
        vr,
        is_private,
        creator,
    )


@lru_cache(maxsize=1024)
def _shared(candidates: tuple[TagCandidate, ...]) -> tuple[TagCandidate, ...]:
    return candidates
