"""The contract surface: job names, asset graph, the options document and secret handling."""

from __future__ import annotations

import subprocess
import sys

import dagster as dg
import pytest

from dicom_etl_dagster.definitions import default_database, defs
from dicom_etl_dagster_tests.helpers import options


def test_contract_jobs_and_assets_are_defined():
    assert {"load_vocab", "ingest_metadata"} <= {job.name for job in defs.resolve_all_job_defs()}
    graph = defs.resolve_asset_graph()
    groups = {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}
    assert {k for k, g in groups.items() if g == "vocabulary"} == {
        "vocabulary",
        "concept_class",
        "concept",
        "concept_relationship",
        "dicom_data_element",
    }
    assert {
        "procedure_occurrence",
        "image_occurrence",
        "dicom_file_metadata",
        "dicom_ingest_log",
    } <= {k for k, g in groups.items() if g == "imaging"}
    # Lineage reads like the data flow: vocabulary -> imaging.
    assert dg.AssetKey("concept") in graph.get(dg.AssetKey("image_occurrence")).parent_keys
    assert (
        dg.AssetKey("dicom_data_element")
        in graph.get(dg.AssetKey("dicom_file_metadata")).parent_keys
    )


@pytest.mark.parametrize(
    "options, reason",
    [
        (
            {"dicom_files_abs_pth": "/x"},
            "unknown key 'dicom_files_abs_pth' in options: did you mean 'dicom_files_abs_path'?",
        ),
        (
            {"person_to_patient_mapping": {"tabel_name": "m"}},
            "unknown key 'tabel_name' in options.person_to_patient_mapping: "
            "did you mean 'table_name'?",
        ),
        (
            {"PersonPatientMapping": {}, "person_to_patient_mapping": {}},
            "options give both person_to_patient_mapping and PersonPatientMapping (two "
            "spellings of the same key): keep one",
        ),
    ],
)
def test_a_mistaken_options_document_fails_the_run_with_one_line_naming_the_key(options, reason):
    """Before any database work: the check is the first thing a step does."""
    job = defs.resolve_job_def("load_vocab")
    result = job.execute_in_process(run_config={"options": options}, raise_on_error=False)
    assert not result.success
    [failure] = result.get_step_failure_events()
    assert failure.step_failure_data.user_failure_data.description == reason


def test_the_original_readme_spelling_of_the_mapping_key_is_an_alias():
    from dicom_etl_dagster.config import EtlOptions, PersonToPatientMapping

    alias = EtlOptions(PersonPatientMapping=PersonToPatientMapping(table_name="m"))
    alias.check_for("ingest_metadata")
    assert alias.person_mapping().table_name == "m"
    assert EtlOptions().person_mapping() == PersonToPatientMapping()


def test_a_load_vocab_document_is_refused_by_ingest_metadata_but_not_the_reverse():
    from dicom_etl_dagster.config import EtlOptions
    from dicom_etl_dagster.core.errors import OptionsError

    with pytest.raises(OptionsError, match="^flow_action_type is 'load_vocab' but this is the "):
        EtlOptions(flow_action_type="Load_Vocab").check_for("ingest_metadata")
    # The README runs load_vocab with the ingest document (the vocabulary is its prerequisite).
    EtlOptions(flow_action_type="ingest_metadata").check_for("load_vocab")
    EtlOptions(flow_action_type="load_vocab").check_for("__ASSET_JOB")  # a UI launch


@pytest.mark.parametrize(
    "value, policy", [("SKIP", "skip"), ("Use_Id_Zero", "use_id_zero"), ("skip", "skip")]
)
def test_missing_person_option_accepts_any_case(value, policy):
    from dicom_etl_dagster.config import EtlOptions

    assert EtlOptions(missing_person_id_options=value).missing_person_policy() == policy


def test_missing_person_option_rejects_other_values():
    from dicom_etl_dagster.assets.common import dagster_failures
    from dicom_etl_dagster.config import EtlOptions

    # The run fails with that one line: the option error becomes the step's dg.Failure.
    with pytest.raises(dg.Failure, match="must be one of skip, use_id_zero"), dagster_failures():
        EtlOptions(missing_person_id_options="drop").missing_person_policy()


def test_database_password_never_reaches_config_logs_or_errors(monkeypatch):
    monkeypatch.setenv("DICOM_ETL_DATABASE_URL", "postgresql://etl:s3cret-pw@127.0.0.1:1/omop")
    from dicom_etl_dagster.definitions import build_definitions

    job = build_definitions(default_database()).resolve_job_def("load_vocab")
    result = job.execute_in_process(run_config=options(), raise_on_error=False)
    assert not result.success
    events = "\n".join(repr(event) for event in result.all_events)
    assert "postgresql://etl:***@127.0.0.1:1/omop" in events
    assert "s3cret-pw" not in events
    assert "s3cret-pw" not in repr(result.dagster_run.run_config)


def test_loading_the_definitions_takes_their_objects_out_of_the_collectors_way():
    """`dagster job execute` loads this module once per run; the objects of its imports live
    until the process ends, and a collection that traverses them (the one at exit costs
    ~0.35 s) finds nothing to free."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import gc, dicom_etl_dagster.definitions; print(gc.get_freeze_count())"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert int(loaded.stdout) > 100_000
