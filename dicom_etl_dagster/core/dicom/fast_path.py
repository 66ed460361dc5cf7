"""Read the common DICOM encodings straight from the file's bytes.

Why: pydicom builds a DataElement per element, converts its value and serialises it again
with ``to_json_dict``; across millions of files that is most of the ETL's CPU. This
module walks the bytes once and renders each value directly as DICOM JSON, producing
exactly the rows ``reader`` produces through pydicom.

Scope: Part 10 files (preamble + "DICM") whose dataset is little endian, explicit VR
(including the encapsulated transfer syntaxes) or implicit VR, in the default character
set, a single-byte ISO_IR character set or UTF-8. Anything outside that scope or anything unusual (an
unexpected VR, a length past the end of the file, tags out of order, a value pydicom
would convert differently or reject) raises :class:`NeedsPydicom`, and the caller reads
the file with pydicom instead: the fast path never decides that a file is broken, it
only declines it. Tests check that both paths give identical rows for every pydicom
sample file and every template of the benchmark corpus.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from typing import Any, BinaryIO

from pydicom.charset import python_encoding
from pydicom.datadict import DicomDictionary, RepeatersDictionary, mask_match

from dicom_etl_dagster.core.dicom.corrections import (
    code_strings,
    real_vr,
    same_encoding,
    stray_meta_end,
)
from dicom_etl_dagster.core.dicom.elements import (
    NUMBER_TEXT_VRS,
    PIXEL_DATA_TAGS,
    ElementRow,
    fmt_tag,
    number_text,
    private_name,
    public_info,
)
from dicom_etl_dagster.core.dicom.odd_values import verbatim_value

__all__ = ["NeedsPydicom", "read_fast"]


class NeedsPydicom(Exception):
    """The file is outside the fast path's scope; read it with pydicom."""


_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_CHARSET_TAG = 0x00080005
_TRANSFER_SYNTAX_TAG = 0x00020010
#: Files up to this size are read whole (one read, page cache); larger ones are read up
#: to here and the rest only where needed (pixel data is skipped, never read).
_WHOLE_FILE_LIMIT = 8 * 1024 * 1024

_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_ENCAPSULATED_PREFIX = "1.2.840.10008.1.2.4."  # JPEG family, JPEG 2000, HTJ2K, MPEG...
_RLE = "1.2.840.10008.1.2.5"

# Character sets that decode with one single-byte codec or UTF-8 (pydicom: a plain
# ``bytes.decode``); ISO 2022 code extensions and multi-byte Asian sets stay with pydicom.
_CHARSETS: dict[str | None, str] = {
    None: python_encoding[""],
    **{
        name: python_encoding[name]
        for name in (
            "",
            "ISO_IR 6",
            "ISO_IR 100",
            "ISO_IR 101",
            "ISO_IR 109",
            "ISO_IR 110",
            "ISO_IR 126",
            "ISO_IR 127",
            "ISO_IR 138",
            "ISO_IR 144",
            "ISO_IR 148",
            "ISO_IR 166",
            "ISO_IR 192",
        )
    },
}

_EXPLICIT_HEADER = struct.Struct("<HH2sH")
_IMPLICIT_HEADER = struct.Struct("<HHL")
_UINT32 = struct.Struct("<L")
_NUMBER_FORMATS = {
    "US": "H",
    "SS": "h",
    "UL": "L",
    "SL": "l",
    "FL": "f",
    "FD": "d",
    "SV": "q",
    "UV": "Q",
}
_LONG_LENGTH_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)

# JSON string escaping is needed only for these characters (json.dumps, ensure_ascii=False).
_NEEDS_JSON_ESCAPE = re.compile(r'[\x00-\x1f"\\]').search
# What Python's float()/int() accept and pydicom's DS/IS turn into the same number.
_DECIMAL = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*").fullmatch
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*").fullmatch


def _json_strings(items: list[str]) -> str:
    joined = '", "'.join(items)
    if _NEEDS_JSON_ESCAPE(joined):
        return json.dumps(items, ensure_ascii=False)
    return f'["{joined}"]'


def _strings(items: list[str]) -> tuple[str, str | None, Any]:
    """(VM, JSON Value, Python value) of split string values, as pydicom's MultiValue has them."""
    if len(items) == 1:
        value = items[0]
        return ("1", _json_strings(items), value) if value else ("0", None, value)
    return str(len(items)), _json_strings(items), items


# --------------------------------------------------------------------------
# Value converters: raw bytes -> (VM, JSON Value or None, Python value)
# Each mirrors pydicom.values.convert_* followed by DataElement.to_json_dict.
# --------------------------------------------------------------------------
def _plain_string(raw: bytes, encoding: str):  # AS CS DA DT TM: multi_string
    return _strings(raw.decode("latin_1").rstrip(" \x00").split("\\"))


def _code_string(raw: bytes, encoding: str):  # CS: each value without its spaces (corrections)
    return _strings(code_strings(raw.decode("latin_1").rstrip(" \x00").split("\\")))


def _ae(raw: bytes, encoding: str):
    return _strings([s.strip() for s in raw.decode("latin_1").split("\\")])


def _ui(raw: bytes, encoding: str):
    # pydicom's UID class strips whitespace from each value
    return _strings([uid.strip() for uid in raw.decode("latin_1").rstrip("\x00 ").split("\\")])


def _text(raw: bytes, encoding: str):  # SH LO UC
    if b"\x1b" in raw:
        raise NeedsPydicom  # ISO 2022 escape sequences
    try:
        decoded = raw.decode(encoding)
    except UnicodeDecodeError:
        raise NeedsPydicom from None  # pydicom replaces and warns
    return _strings([v.rstrip("\x00 ") for v in decoded.split("\\")])


def _single_text(raw: bytes, encoding: str):  # LT ST UT: backslash is not a delimiter
    if b"\x1b" in raw:
        raise NeedsPydicom
    try:
        value = raw.decode(encoding).rstrip("\x00 ")
    except UnicodeDecodeError:
        raise NeedsPydicom from None
    return ("1", _json_strings([value]), value) if value else ("0", None, value)


def _person_name(raw: bytes, encoding: str):
    if b"\x1b" in raw:
        raise NeedsPydicom
    try:
        decoded = raw.rstrip(b"\x00 ").decode(encoding)
    except UnicodeDecodeError:
        raise NeedsPydicom from None
    # pydicom re-encodes each name, which drops empty trailing component groups ("A^B=").
    names = [name.rstrip("=") for name in decoded.split("\\")]
    if len(names) == 1 and not names[0]:
        return "0", None, ""
    rendered = []
    for name in names:
        components = name.split("=")
        if not name or len(components) > 3:
            raise NeedsPydicom  # pydicom fails on empty names in a list; > 3 groups is invalid
        keys = ("Alphabetic", "Ideographic", "Phonetic")[: len(components)]
        rendered.append(dict(zip(keys, components)))
    value_json = json.dumps(rendered, ensure_ascii=False)
    return str(len(names)), value_json, names[0] if len(names) == 1 else names


def _decimal_string(raw: bytes, encoding: str):
    items = raw.decode("latin_1").strip().rstrip(" \x00").split("\\")
    if len(items) == 1 and not items[0]:
        return "0", None, ""
    if not all(_DECIMAL(item) for item in items):
        return _verbatim_number("DS", raw, items)
    numbers = [float(item) for item in items]
    return str(len(items)), json.dumps(numbers), numbers[0] if len(numbers) == 1 else numbers


def _integer_string(raw: bytes, encoding: str):
    items = raw.decode("latin_1").rstrip(" \x00").split("\\")  # unlike DS, not stripped first
    if len(items) == 1 and not items[0]:
        return "0", None, ""
    if not all(_INTEGER(item) for item in items):
        return _verbatim_number("IS", raw, items)
    numbers = [int(item) for item in items]
    return (
        str(len(items)),
        "[" + ", ".join(map(str, numbers)) + "]",
        numbers[0] if len(numbers) == 1 else numbers,
    )


def _verbatim_number(vr: str, raw: bytes, items: list[str]):
    """A DS / IS value with an item that is not a number at all (``1A``, ``2,5``, ``1.9.10.0``):
    pydicom cannot convert it (its DS / IS call float()), and the pydicom path keeps it verbatim
    as ``odd_values.verbatim_value``, so this path does the same. Values float() reads but the
    patterns above do not ("nan", "1_0", "1.5" as IS) stay with pydicom's own rules."""
    if all(_float_reads(item) for item in items):
        raise NeedsPydicom
    return verbatim_value(vr, raw)


def _float_reads(item: str) -> bool:
    # pydicom strips each item's padding (a NUL inside a list too: "1.00\0\0\\0.0") first.
    item = item.strip(" \x00")
    if not item:
        return True  # an empty value: pydicom keeps it, it is not odd
    try:
        float(item)
    except ValueError:
        return False
    return True


def _number_converter(code: str):
    size = struct.calcsize("<" + code)
    floats = code in "fd"

    def convert(raw: bytes, encoding: str):
        count, remainder = divmod(len(raw), size)
        if remainder:
            raise NeedsPydicom  # pydicom raises BytesLengthException: its reason is the one to report
        if count == 0:
            return "0", None, None
        numbers = struct.unpack(f"<{count}{code}", raw)
        value_json = json.dumps(numbers) if floats else "[" + ", ".join(map(str, numbers)) + "]"
        return str(count), value_json, numbers[0] if count == 1 else list(numbers)

    return convert


def _attribute_tag(raw: bytes, encoding: str):
    count, remainder = divmod(len(raw), 4)
    if remainder or count == 0:
        raise NeedsPydicom
    halves = struct.unpack(f"<{2 * count}H", raw)
    tags = [f"{halves[i]:04X}{halves[i + 1]:04X}" for i in range(0, len(halves), 2)]
    return str(count), '["' + '", "'.join(tags) + '"]', None


def _binary(raw: bytes, encoding: str):  # OB OD OF OL OV OW: InlineBinary
    if not raw:
        return "0", None, None
    return "1", '"' + base64.b64encode(raw).decode("ascii") + '"', None


_CONVERTERS = {
    "AE": _ae,
    "AS": _plain_string,
    "CS": _code_string,
    "DA": _plain_string,
    "DT": _plain_string,
    "TM": _plain_string,
    "UI": _ui,
    "SH": _text,
    "LO": _text,
    "UC": _text,
    "LT": _single_text,
    "ST": _single_text,
    "UT": _single_text,
    "PN": _person_name,
    "DS": _decimal_string,
    "IS": _integer_string,
    "AT": _attribute_tag,
    **{vr: _number_converter(code) for vr, code in _NUMBER_FORMATS.items()},
    **dict.fromkeys(("OB", "OD", "OF", "OL", "OV", "OW"), _binary),
}
# Explicit VR: the two VR bytes -> (VR, header length), for the VRs handled here.
_EXPLICIT_VRS = {
    vr.encode(): (vr, 12 if vr in _LONG_LENGTH_VRS else 8) for vr in (*_CONVERTERS, "SQ", "UN")
}


def _implicit_vr(tag: int) -> str:
    """The dictionary VR pydicom would use for an implicit VR element, if unambiguous."""
    entry = DicomDictionary.get(tag)
    if entry is None:
        mask = mask_match(tag)
        if mask is not None:
            entry = RepeatersDictionary[mask]
        elif tag & 0xFFFF == 0:
            return "UL"  # group length, as pydicom assumes (private ones too: corrections)
        else:
            raise NeedsPydicom  # private or unknown: pydicom's own rules
    vr = entry[0]
    if vr in ("OB or OW", "US or SS or OW"):
        vr = real_vr(vr)  # OW in implicit VR, whatever else decides it (corrections.py)
    if vr not in _CONVERTERS and vr != "SQ":
        raise NeedsPydicom  # "US or SS", "OB or OW", UN...: depends on other elements
    return vr


# --------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------
# Tag texts and names, kept for the life of a worker process: the same few hundred tags
# recur in every file.
_PUBLIC_NAMES: dict[int, tuple] = {}
_PRIVATE_TAG_TEXT: dict[int, str] = {}
_PRIVATE_NAMES: dict[tuple[int, str | None], tuple] = {}  # (tag, creator) -> _private_names
_NAME_CACHE_LIMIT = 100_000
# ElementRow's own __new__ is a Python function; tuple.__new__ builds the same row in C.
_new_row = tuple.__new__

#: Converted values, (VM, JSON Value, Python value), by character set, VR and raw bytes, for
#: the life of a worker process. Most elements of a file repeat in the next file of its
#: series (all but UIDs, positions, instance numbers, times...), and a look-up costs a
#: fraction of a conversion. Only short values are kept (the ones that repeat, and memory
#: stays bounded), and never for the tags whose Python value the walker keeps (``_note``):
#: a list value is shared by every row that found it here, so nothing may change it.
_CONVERTED: dict[str, dict[str, dict[bytes, tuple[str, str | None, Any]]]] = {}
_CACHED_VALUE_BYTES = 64
_CONVERTED_PER_VR_LIMIT = 4096


def _convert_and_keep(
    converted: dict[bytes, tuple[str, str | None, Any]], vr: str, raw: bytes, encoding: str
) -> tuple[str, str | None, Any]:
    """Convert a value not seen before; keep it if it is short."""
    known = _CONVERTERS[vr](raw, encoding)
    if len(raw) <= _CACHED_VALUE_BYTES:
        if len(converted) >= _CONVERTED_PER_VR_LIMIT:
            converted.clear()
        converted[raw] = known
    return known


def _converted_values(encoding: str) -> dict[str, dict[bytes, tuple[str, str | None, Any]]]:
    """The converted values of one character set, by VR."""
    by_vr = _CONVERTED.get(encoding)
    if by_vr is None:
        by_vr = _CONVERTED[encoding] = {vr: {} for vr in _CONVERTERS}
    return by_vr


class _FastWalker:
    """One file's walk: rows in file order, sequence rows before their items' rows, as the reader."""

    def __init__(self, fp: BinaryIO, file_size: int, instance_tags: frozenset[int]) -> None:
        self.fp = fp
        self.file_size = file_size
        self.buf = fp.read(min(file_size, _WHOLE_FILE_LIMIT))
        self.instance_tags = instance_tags
        #: Tags whose value the walker itself needs (see ``_note``).
        self.noted_tags = instance_tags | {_CHARSET_TAG, _TRANSFER_SYNTAX_TAG}
        self.rows: list[ElementRow] = []
        self.next_item = 0
        self.encoding = _CHARSETS[None]
        self.converted = _converted_values(self.encoding)
        self.explicit = True
        self.transfer_syntax = ""
        self.instance_values: dict[int, Any] = {}
        self.number_texts: dict[int, str] = {}  # see DicomInstance.number_texts
        self.meta_end: int | None = None  # where the real file meta ends, if a stray copy follows

    def _bytes_at(self, start: int, length: int) -> bytes:
        end = start + length
        if end > self.file_size:
            raise NeedsPydicom  # truncated: pydicom's path names the element
        if end <= len(self.buf):
            return self.buf[start:end]
        self.fp.seek(start)
        data = self.fp.read(length)
        if len(data) != length:
            raise NeedsPydicom
        return data

    @staticmethod
    def _names(tag: int) -> tuple[str, str, str, str | None, str | None]:
        """(tag text, group text, dictionary tag, keyword, name) of a public tag, cached per process."""
        names = _PUBLIC_NAMES.get(tag)
        if names is None:
            if (
                len(_PUBLIC_NAMES) > _NAME_CACHE_LIMIT
            ):  # hostile files can invent any number of tags
                _PUBLIC_NAMES.clear()
            names = _PUBLIC_NAMES[tag] = (fmt_tag(tag), f"{tag >> 16:04X}", *public_info(tag))
        return names

    def meta_and_dataset(self) -> None:
        """The file meta group (always explicit VR), then the dataset in its transfer syntax."""
        buf = self.buf
        if len(buf) < 132 or buf[128:132] != b"DICM":
            raise NeedsPydicom
        self.meta_end = stray_meta_end(buf)
        pos = self.dataset(132, self.file_size, None, None, meta=True)
        syntax = self.transfer_syntax
        if syntax == _IMPLICIT_LE:
            self.explicit = False
            if len(buf) >= pos + 6 and 0x40 < buf[pos + 4] < 0x5B and 0x40 < buf[pos + 5] < 0x5B:
                raise NeedsPydicom  # looks explicit: pydicom switches and warns
        elif not (syntax in (_EXPLICIT_LE, _RLE) or syntax.startswith(_ENCAPSULATED_PREFIX)):
            raise NeedsPydicom  # big endian, deflate, unknown
        if pos >= self.file_size:
            raise NeedsPydicom  # no dataset after the meta: pydicom checks the meta bytes
        end = self.dataset(pos, self.file_size, None, None, top=True)
        if end != self.file_size:
            raise NeedsPydicom  # trailing bytes: pydicom's path decides whether that is truncation

    def dataset(
        self,
        pos: int,
        end: int | None,
        parent_sequence: int | None,
        parent_item: int | None,
        top: bool = False,
        meta: bool = False,
    ) -> int:
        """Walk elements from pos to end (or to an item delimiter when end is None); return the end."""
        buf, rows, noted_tags = self.buf, self.rows, self.noted_tags
        explicit = self.explicit or meta
        creators: dict[int, str | None] = {}
        previous_tag = -1
        limit = self.file_size if end is None else end
        while pos < limit:
            if pos + 8 > len(buf):
                raise NeedsPydicom
            if explicit:
                group, element, vr_bytes, length = _EXPLICIT_HEADER.unpack_from(buf, pos)
            else:
                group, element, length = _IMPLICIT_HEADER.unpack_from(buf, pos)
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag == _ITEM_DELIMITER and end is None:
                    return pos + 8
                raise NeedsPydicom
            if meta and (group != 0x0002 or pos == self.meta_end):
                return pos
            if group == 0x0002 and not meta and not (top and self.meta_end):
                raise NeedsPydicom  # file meta elements inside the dataset, not a stray copy
            if tag <= previous_tag:
                raise NeedsPydicom  # unsorted or repeated: pydicom sorts, keeps the last
            previous_tag = tag
            if explicit:
                vr, header, length = self._explicit_vr(pos, vr_bytes, length)
            else:
                header = 8
                vr = "OB" if tag in PIXEL_DATA_TAGS else _implicit_vr(tag)
            start = pos + header
            if tag in PIXEL_DATA_TAGS:
                pos = self._skip_pixel_data(start, length)
                continue
            if vr == "SQ" or vr == "UN":
                read = self._sequence if vr == "SQ" else self._un_sequence
                pos = read(tag, start, length, parent_sequence, parent_item, creators)
                continue
            if length == _UNDEFINED or start + length > limit:
                raise NeedsPydicom  # undefined length outside a sequence, or past the end
            pos = start + length
            raw = buf[start:pos] if pos <= len(buf) else self._bytes_at(start, length)
            if tag in noted_tags:
                vm, value_json, value = _CONVERTERS[vr](raw, self.encoding)
                self._note(tag, value, top, meta)
            else:
                converted = self.converted[vr]
                known = converted.get(raw) or _convert_and_keep(converted, vr, raw, self.encoding)
                vm, value_json, value = known
            if group == 0x0002 and not meta:
                continue  # the stray copy of the file meta: dropped (corrections.stray_meta_end)
            if group & 1:
                names = self._private_names(tag, vr, value, creators)
                row = (*names[:5], vr, vm, value_json, False, None, True, names[5])
                rows.append(_new_row(ElementRow, (len(rows), parent_sequence, parent_item, *row)))
            else:
                tag_text, group_text, dictionary_tag, keyword, name = _PUBLIC_NAMES.get(
                    tag
                ) or self._names(tag)
                # fmt: off
                rows.append(_new_row(ElementRow, (
                    len(rows), parent_sequence, parent_item, tag_text, group_text, dictionary_tag,
                    keyword, name, vr, vm, value_json, False, None, False, None,
                )))
                # fmt: on
                if top and vm == "1" and vr in NUMBER_TEXT_VRS:
                    self.number_texts[len(rows) - 1] = number_text(raw.decode("latin_1"))
        if end is None or pos != end:
            raise NeedsPydicom  # ran past the item's end or the file's end without a delimiter
        return pos

    def _explicit_vr(self, pos: int, vr_bytes: bytes, length: int) -> tuple[str, int, int]:
        """(VR, header length, value length) of an explicit VR element header at pos."""
        known = _EXPLICIT_VRS.get(vr_bytes)
        if known is None:
            raise NeedsPydicom  # UR, invalid or blank VR...
        vr, header = known
        if header == 12:
            if pos + 12 > len(self.buf):
                raise NeedsPydicom
            length = _UINT32.unpack_from(self.buf, pos + 8)[0]
        return vr, header, length

    @staticmethod
    def _private_names(
        tag: int, vr: str, value: Any, creators: dict[int, str | None]
    ) -> tuple[str, str, str, str | None, str | None, str | None]:
        """(tag text, group text, dictionary tag, keyword, name, creator) of a private element.

        Private tags have no keyword; the dictionary tag is the tag itself and the name
        comes from the private dictionary, by the creator of the element's block.
        """
        element = tag & 0xFFFF
        tag_text = _PRIVATE_TAG_TEXT.get(tag)
        if tag_text is None:
            if len(_PRIVATE_TAG_TEXT) > _NAME_CACHE_LIMIT:
                _PRIVATE_TAG_TEXT.clear()
            tag_text = _PRIVATE_TAG_TEXT[tag] = fmt_tag(tag)
        if 0x0010 <= element <= 0x00FF:
            if vr != "LO":
                raise NeedsPydicom  # a creator that is not text: pydicom's path decides
            creator = ("\\".join(value) if isinstance(value, list) else value).strip(
                " \x00"
            ) or None
            creators[tag] = creator
            return tag_text, tag_text[1:5], tag_text, None, "Private Creator", creator
        creator = creators.get((tag & 0xFFFF0000) | element >> 8) if element >> 8 >= 0x10 else None
        # The same (tag, creator) pairs recur in every file of a vendor: one tuple for each.
        names = _PRIVATE_NAMES.get((tag, creator))
        if names is None:
            if len(_PRIVATE_NAMES) > _NAME_CACHE_LIMIT:
                _PRIVATE_NAMES.clear()
            name = private_name(tag, creator) if creator else None
            names = _PRIVATE_NAMES[(tag, creator)] = (
                tag_text,
                tag_text[1:5],
                tag_text,
                None,
                name,
                creator,
            )
        return names

    def _note(self, tag: int, value: Any, top: bool, meta: bool) -> None:
        """Keep what reading goes on with: the character set, transfer syntax, instance values."""
        if tag == _CHARSET_TAG:
            self._set_charset(value, top)
        if top and tag in self.instance_tags:
            self.instance_values[tag] = value
        if meta and tag == _TRANSFER_SYNTAX_TAG:
            self.transfer_syntax = value if isinstance(value, str) else ""
        elif tag == _TRANSFER_SYNTAX_TAG and not same_encoding(value, self.transfer_syntax):
            raise NeedsPydicom  # a stray file meta copy naming another encoding: pydicom's path

    def _set_charset(self, value: Any, top: bool) -> None:
        if not top or isinstance(value, list) or value not in _CHARSETS:
            raise NeedsPydicom  # ISO 2022, other character sets, a character set inside an item
        if any(
            row.vr in ("SH", "LO", "UC", "LT", "ST", "UT", "PN")
            for row in self.rows
            if row.parent_sequence_index is None and row.group != "0002"
        ):
            raise NeedsPydicom  # text decoded before the character set was known
        self.encoding = _CHARSETS[value]
        self.converted = _converted_values(self.encoding)

    def _sequence(
        self,
        tag: int,
        start: int,
        length: int,
        parent_sequence: int | None,
        parent_item: int | None,
        creators: dict,
    ) -> int:
        """Append the sequence's row, then its items' rows; return the position after it."""
        rows = self.rows
        index = len(rows)
        rows.append(None)  # type: ignore[arg-type]  # replaced below, once the item count is known
        end = None if length == _UNDEFINED else start + length
        if end is not None and end > self.file_size:
            raise NeedsPydicom
        pos, items = start, 0
        buf = self.buf
        while end is None or pos < end:
            if pos + 8 > len(buf):
                raise NeedsPydicom
            item_tag_group, item_tag_element, item_length = _IMPLICIT_HEADER.unpack_from(buf, pos)
            item_tag = item_tag_group << 16 | item_tag_element
            if item_tag == _SEQUENCE_DELIMITER and end is None:
                pos += 8
                break
            if item_tag != _ITEM:
                raise NeedsPydicom
            item_index = self.next_item
            self.next_item += 1
            items += 1
            content = pos + 8
            if item_length == _UNDEFINED:
                pos = self.dataset(content, None, index, item_index)
            else:
                pos = self.dataset(content, content + item_length, index, item_index)
        if end is not None and pos != end:
            raise NeedsPydicom
        is_private = bool(tag >> 16 & 1)
        if is_private:
            names = self._private_names(tag, "SQ", None, creators)
        else:
            names = (*self._names(tag), None)
        rows[index] = ElementRow(
            index,
            parent_sequence,
            parent_item,
            *names[:5],
            "SQ",
            "1",
            None,
            True,
            items,
            is_private,
            names[5],
        )
        return pos

    def _un_sequence(
        self,
        tag: int,
        start: int,
        length: int,
        parent_sequence: int | None,
        parent_item: int | None,
        creators: dict,
    ) -> int:
        """A UN element of undefined length: a sequence in implicit VR little endian (CP-246),
        as DCMTK reads it (corrections.py); pydicom's path reads it the same way."""
        if length != _UNDEFINED:
            raise NeedsPydicom  # UN bytes: pydicom's path converts them by the dictionary
        explicit, self.explicit = self.explicit, False
        try:
            return self._sequence(tag, start, length, parent_sequence, parent_item, creators)
        finally:
            self.explicit = explicit

    def _skip_pixel_data(self, start: int, length: int) -> int:
        if length != _UNDEFINED:
            if start + length > self.file_size:
                raise NeedsPydicom
            return start + length
        pos = start  # encapsulated: fragments until the sequence delimiter
        while True:
            header = self._bytes_at(pos, 8)
            group, element, fragment_length = _IMPLICIT_HEADER.unpack(header)
            tag = group << 16 | element
            if tag == _SEQUENCE_DELIMITER:
                return pos + 8
            if tag != _ITEM or fragment_length == _UNDEFINED:
                raise NeedsPydicom
            pos += 8 + fragment_length


def read_fast(
    fp: BinaryIO, file_size: int, instance_tags: frozenset[int]
) -> tuple[list[ElementRow], dict[int, Any], dict[int, str]]:
    """(rows, values of instance_tags at the top level, DS / IS texts) of an open file;
    NeedsPydicom if out of scope."""
    walker = _FastWalker(fp, file_size, instance_tags)
    try:
        walker.meta_and_dataset()
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        raise NeedsPydicom from exc
    return walker.rows, walker.instance_values, walker.number_texts
