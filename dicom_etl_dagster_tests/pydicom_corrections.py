"""The oracle's rule: pydicom's DICOM JSON model, corrected where the rows differ on purpose.

The equivalence tests compare every row with pydicom's JSON model (PS3.18 F.2) after
exactly these corrections, stated here once and independently of the code under test
(core/dicom/corrections.py; README, "Where the rows differ from pydicom"):

* ``vr``: a dictionary ambiguity pydicom leaves ("OB or OW", "US or SS or OW",
  "US or OW") is OW; "US or SS" is UN;
* CS: every value without its leading and trailing spaces;
* a binary value of a big-endian file (OW, OF, OL, OD, OV) is in little-endian byte order;
* a private group length (gggg,0000) that pydicom reads as UN in an implicit VR file is a
  UL number (or numbers).

The structural corrections (a stray group-0002 copy dropped, UN sequences read as implicit
VR, blank VRs recovered) make files readable that pydicom reads wrongly; test_fidelity.py
checks them on files built for the purpose (none of pydicom's samples has one).
"""

from __future__ import annotations

import base64
import struct
from typing import Any

AMBIGUOUS = {"OB or OW": "OW", "US or SS or OW": "OW", "US or OW": "OW", "US or SS": "UN"}
WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def corrected_attribute(
    key: str, attribute: dict[str, Any], *, big_endian: bool, implicit: bool
) -> dict[str, Any]:
    """One attribute of pydicom's JSON model (``key`` "ggggeeee") as the rows hold it."""
    attribute = dict(attribute)
    vr = str(attribute["vr"])
    attribute["vr"] = AMBIGUOUS.get(vr, vr)
    if vr == "CS" and "Value" in attribute:
        attribute["Value"] = [v.strip(" ") if isinstance(v, str) else v for v in attribute["Value"]]
    if big_endian and vr in WORD_SIZES and "InlineBinary" in attribute:
        raw, size = base64.b64decode(attribute["InlineBinary"]), WORD_SIZES[vr]
        if len(raw) % size == 0:
            raw = b"".join(raw[i : i + size][::-1] for i in range(0, len(raw), size))
        attribute["InlineBinary"] = base64.b64encode(raw).decode("ascii")
    is_private_group_length = int(key[:4], 16) & 1 and key[4:] == "0000"
    if implicit and is_private_group_length and vr == "UN":
        raw = base64.b64decode(attribute.pop("InlineBinary", ""))
        if len(raw) % 4:
            attribute["InlineBinary"] = base64.b64encode(raw).decode("ascii")
        else:
            attribute["vr"] = "UL"
            if raw:
                attribute["Value"] = list(struct.unpack(f"<{len(raw) // 4}L", raw))
    return attribute


def corrected_document(
    document: dict[str, Any], *, big_endian: bool, implicit: bool
) -> dict[str, Any]:
    """A whole JSON model (items of sequences included), corrected attribute by attribute."""
    corrected = {}
    for key, attribute in document.items():
        if attribute["vr"] == "SQ":
            items = [
                corrected_document(item, big_endian=big_endian, implicit=implicit)
                for item in attribute.get("Value", [])
            ]
            corrected[key] = {**attribute, "Value": items} if "Value" in attribute else attribute
        else:
            corrected[key] = corrected_attribute(
                key, attribute, big_endian=big_endian, implicit=implicit
            )
    return corrected
