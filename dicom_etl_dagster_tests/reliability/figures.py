"""The figures the reliability suite reached, collected by its tests and printed at the end
by test_zz_summary.py (pytest runs the package's modules in file-name order)."""

from __future__ import annotations

from collections import Counter

FIGURES: dict = {
    "files_tried": 0,
    "property_examples": 0,
    "files_ingested": 0,
    "files_duplicate": 0,
    "files_failed": 0,
    "failures_by_reason": Counter(),
    "faults_injected": Counter(),
    "duplicates_found": 0,
    "phi_leaks_found": 0,
    "secret_leaks_found": 0,
    "verbatim_values_checked": 0,
    "identifiers_refused": 0,
}


def reason_class(reason: str) -> str:
    """A failure reason reduced to its kind ("truncated", "not a DICOM file", ...)."""
    head = (reason or "").split(":")[0].strip()
    for kind in (
        "truncated",
        "not a DICOM file",
        "empty file",
        "missing required attribute",
        "no usable date",
        "cannot decode element",
        "invalid UID",
        "cannot parse DICOM data",
        "cannot read DICOM file",
        "no person",
    ):
        if head.startswith(kind) or reason.startswith(kind):
            return kind
    return head[:60] or "(no reason!)"
