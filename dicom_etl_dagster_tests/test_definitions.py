"""The contract surface: job names, asset graph, the options document and secret handling."""

from __future__ import annotations

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


def test_unknown_option_is_refused_with_its_name():
    job = defs.resolve_job_def("load_vocab")
    with pytest.raises(
        dg.DagsterInvalidConfigError, match='unexpected config entry "PersonPatientMapping"'
    ):
        job.execute_in_process(run_config={"options": {"PersonPatientMapping": {}}})


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
