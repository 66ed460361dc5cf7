"""Vocabulary assets: the DICOM2OMOP rows in OMOP vocabulary tables and the data dictionary."""

import dagster as dg

from dicom_etl_dagster.assets.common import dagster_failures, database_session
from dicom_etl_dagster.assets.table_schemas import column_schema
from dicom_etl_dagster.config import EtlOptions
from dicom_etl_dagster.core.db.tables import Tables, row_count
from dicom_etl_dagster.core.vocabulary import loader
from dicom_etl_dagster.resources.database import PostgresResource

GROUP = "vocabulary"

_DESCRIPTIONS = {
    "vocabulary": "The DICOM row of the OMOP `vocabulary` table (version = pinned DICOM2OMOP commit).",
    "concept_class": "The two DICOM concept classes (`DICOM Attributes`, `DICOM Value Sets`).",
    "concept": "DICOM2OMOP concepts (8,811) plus the vocabulary and concept-class concepts, in OMOP `concept`.",
    "concept_relationship": "DICOM2OMOP `Maps to` / `Maps to value` relationships (1,052) in OMOP `concept_relationship`.",
}


#: Only the small tables are counted: an Athena concept / concept_relationship has millions of rows.
_COUNTED_TABLES = ("vocabulary", "concept_class", "dicom_data_element")


def _materialization(conn, tables: Tables, result: loader.LoadResult) -> dg.MaterializeResult:
    metadata: dict = {"table": tables.qualified(result.table), **result.as_metadata()}
    if result.table in _COUNTED_TABLES:
        metadata["dagster/row_count"] = row_count(conn, tables[result.table])
    return dg.MaterializeResult(metadata=metadata)


def _vocabulary_table_asset(spec: loader.TableSpec, deps: list[str]) -> dg.AssetsDefinition:
    @dg.asset(
        name=spec.table,
        group_name=GROUP,
        deps=deps,
        description=_DESCRIPTIONS[spec.table],
        kinds={"postgres"},
        pool="dicom_etl_database",
        metadata=column_schema(spec.table),
    )
    def _asset(context: dg.AssetExecutionContext, config: EtlOptions, database: PostgresResource):
        with dagster_failures(), database_session(context, config, database) as (conn, tables):
            result = loader.load_table(conn, tables.schemas, spec, truncate=config.to_truncate)
            context.log.info(
                f"{tables.qualified(spec.table)}: {result.rows_written} rows written, "
                f"{result.rows_already_present} already present"
            )
            return _materialization(conn, tables, result)

    return _asset


vocabulary = _vocabulary_table_asset(loader.VOCABULARY, deps=[])
concept_class = _vocabulary_table_asset(loader.CONCEPT_CLASS, deps=["vocabulary"])
concept = _vocabulary_table_asset(loader.CONCEPT, deps=["vocabulary", "concept_class"])
concept_relationship = _vocabulary_table_asset(loader.CONCEPT_RELATIONSHIP, deps=["concept"])


# After `vocabulary` (both come from the pinned DICOM2OMOP release), not beside it: a run
# with a wrong database or options then fails in one step, with its reason printed once.
@dg.asset(
    group_name=GROUP,
    deps=["vocabulary"],
    kinds={"postgres"},
    pool="dicom_etl_database",
    metadata=column_schema("dicom_data_element"),
    description="The DICOM PS3.6 data dictionary (5,190 tags) plus private/unknown tags met during ingest.",
)
def dicom_data_element(
    context: dg.AssetExecutionContext, config: EtlOptions, database: PostgresResource
):
    with dagster_failures(), database_session(context, config, database) as (conn, tables):
        result = loader.load_data_elements(conn, tables.schemas, truncate=config.to_truncate)
        context.log.info(
            f"{tables.qualified('dicom_data_element')}: {result.rows_written} rows written, "
            f"{result.rows_already_present} already present, {result.rows_refreshed} refreshed"
        )
        return _materialization(conn, tables, result)


VOCABULARY_ASSETS = [vocabulary, concept_class, concept, concept_relationship, dicom_data_element]
