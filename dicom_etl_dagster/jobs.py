"""The two contract jobs; both accept the original plugin's options document."""

from __future__ import annotations

import dagster as dg

from dicom_etl_dagster.assets.imaging import IMAGING_ASSETS
from dicom_etl_dagster.assets.upload import UPLOAD_ASSETS
from dicom_etl_dagster.assets.vocabulary import VOCABULARY_ASSETS
from dicom_etl_dagster.config import options_mapping


def _op_names(assets: list[dg.AssetsDefinition]) -> list[str]:
    return [assets_def.node_def.name for assets_def in assets]


load_vocab = dg.define_asset_job(
    "load_vocab",
    selection=dg.AssetSelection.assets(*VOCABULARY_ASSETS),
    config=options_mapping(_op_names(VOCABULARY_ASSETS)),
    description="Load the DICOM2OMOP vocabulary into OMOP vocabulary tables and dicom_data_element.",
)

# The upload asset is part of the job and does the uploading only when upload_files is true
# (it reports "skipped" otherwise), so one options document drives both, as in the original.
# Its two steps run one after the other in the run's own process: under the multiprocess
# executor each started a process that imported Dagster and loaded the definitions again
# (about 3 s each, for a skipped upload as much as for the ingest), and there is nothing to
# run in parallel; the ingest's parallelism is its own parse workers. Pools still apply.
ingest_metadata = dg.define_asset_job(
    "ingest_metadata",
    selection=dg.AssetSelection.assets(*IMAGING_ASSETS, *UPLOAD_ASSETS),
    config=options_mapping(_op_names([*IMAGING_ASSETS, *UPLOAD_ASSETS])),
    executor_def=dg.in_process_executor,
    description="Ingest a folder of DICOM files into procedure_occurrence, image_occurrence and dicom_file_metadata; "
    "with upload_files: true, upload them to the DICOM server (file_upload_metadata).",
)

JOBS = [load_vocab, ingest_metadata]
