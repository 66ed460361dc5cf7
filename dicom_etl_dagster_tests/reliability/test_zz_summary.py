"""Last test of the package (modules run in file-name order): print the figures the
reliability suite reached, visible in the CI log even when output is captured."""

from __future__ import annotations

from dicom_etl_dagster_tests.reliability.figures import FIGURES


def test_print_reliability_figures(capsys):
    lines = ["", "=" * 72, "Reliability suite: figures reached", "=" * 72]
    lines.append(
        f"files tried: {FIGURES['files_tried']} in the hostile corpus run"
        f" + {FIGURES['property_examples']} property-test mutations"
    )
    lines.append(
        f"  corpus outcome: {FIGURES['files_ingested']} ingested, {FIGURES['files_duplicate']} duplicate, "
        f"{FIGURES['files_failed']} failed"
    )
    lines.append("failures by reason:")
    for reason, n in sorted(FIGURES["failures_by_reason"].items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {n:6d}  {reason}")
    faults = FIGURES["faults_injected"]
    lines.append(f"faults injected: {sum(faults.values())}")
    for fault, n in sorted(faults.items()):
        lines.append(f"  {n:6d}  {fault}")
    lines.append(f"identifiers refused: {FIGURES['identifiers_refused']}")
    lines.append(f"hostile values checked verbatim: {FIGURES['verbatim_values_checked']}")
    lines.append(f"duplicates found: {FIGURES['duplicates_found']}")
    lines.append(f"secret leaks found: {FIGURES['secret_leaks_found']}")
    lines.append(f"PHI leaks found: {FIGURES['phi_leaks_found']}")
    lines.append("=" * 72)
    with capsys.disabled():
        print("\n".join(lines))
    assert FIGURES["duplicates_found"] == 0
    assert FIGURES["secret_leaks_found"] == 0 and FIGURES["phi_leaks_found"] == 0
