-- MI-CDM tables, the DICOM data dictionary and metadata EAV table, the upload record and
-- the ingest ledger. Created only when missing; the ETL's id sequences live here too so
-- that the user's CDM schema only receives rows.

-- table: image_occurrence
CREATE TABLE {schema}.image_occurrence (
    image_occurrence_id       integer      NOT NULL,
    person_id                 integer      NOT NULL,
    procedure_occurrence_id   integer      NOT NULL,
    visit_occurrence_id       integer      NULL,
    anatomic_site_concept_id  integer      NULL,
    wadors_uri                text         NULL,
    local_path                text         NULL,
    image_occurrence_date     date         NOT NULL,
    image_study_uid           varchar(250) NOT NULL,
    image_series_uid          varchar(250) NOT NULL,
    modality_concept_id       integer      NOT NULL,
    CONSTRAINT xpk_image_occurrence PRIMARY KEY (image_occurrence_id)
);
-- One row per series, enforced by the database, not only by the ETL's lock.
CREATE UNIQUE INDEX idx_image_occurrence_series_uid ON {schema}.image_occurrence (image_series_uid);
CREATE INDEX idx_image_occurrence_study_uid ON {schema}.image_occurrence (image_study_uid);

-- table: image_feature
CREATE TABLE {schema}.image_feature (
    image_feature_id                      integer   NOT NULL,
    person_id                             integer   NOT NULL,
    image_occurrence_id                   integer   NOT NULL,
    image_feature_event_field_concept_id  integer   NULL,
    image_feature_event_id                integer   NULL,
    image_feature_concept_id              integer   NOT NULL,
    image_feature_type_concept_id         integer   NOT NULL,
    image_finding_concept_id              integer   NULL,
    image_finding_id                      integer   NULL,
    anatomic_site_concept_id              integer   NULL,
    alg_system                            text      NULL,
    alg_datetime                          timestamp NULL,
    CONSTRAINT xpk_image_feature PRIMARY KEY (image_feature_id)
);

-- table: dicom_data_element
CREATE TABLE {schema}.dicom_data_element (
    data_element_id        integer      NOT NULL,
    data_element_tag       varchar(20)  NOT NULL,
    data_element_name      varchar(255) NULL,
    data_element_keyword   varchar(255) NULL,
    value_representation   varchar(20)  NULL,
    value_multiplicity     varchar(20)  NULL,
    is_private             boolean      NULL,
    is_retired             boolean      NULL,
    retired_remarks        varchar(255) NULL,
    etl_created_datetime   timestamp    NOT NULL,
    etl_modified_datetime  timestamp    NOT NULL,
    CONSTRAINT xpk_dicom_data_element PRIMARY KEY (data_element_id)
);
CREATE UNIQUE INDEX idx_dicom_data_element_tag ON {schema}.dicom_data_element (data_element_tag);

-- table: dicom_file_metadata
CREATE TABLE {schema}.dicom_file_metadata (
    metadata_id                           bigint       NOT NULL,
    data_element_id                       integer      NULL,
    metadata_source_keyword               varchar(255) NULL,
    metadata_source_tag                   varchar(20)  NOT NULL,
    metadata_source_group_number          varchar(20)  NULL,
    metadata_source_value_representation  varchar(20)  NULL,
    metadata_source_value_multiplicity    varchar(20)  NULL,
    metadata_source_value                 text         NULL,
    is_sequence                           boolean      NULL,
    sequence_length                       integer      NULL,
    parent_sequence_id                    bigint       NULL,
    parent_dataset_id                     bigint       NULL,
    is_private                            boolean      NULL,
    private_creator                       varchar(255) NULL,
    sop_instance_id                       varchar(255) NULL,
    instance_number                       integer      NULL,
    image_occurrence_id                   integer      NOT NULL,
    etl_created_datetime                  timestamp    NOT NULL,
    etl_modified_datetime                 timestamp    NOT NULL,
    CONSTRAINT xpk_dicom_file_metadata PRIMARY KEY (metadata_id)
);
-- SOP Instance UIDs are only ever looked up by equality; with ~200 rows per instance a hash
-- index costs the bulk COPY about 10% less PostgreSQL CPU than a B-tree (scripts/benchmark.py).
CREATE INDEX idx_dicom_file_metadata_sop_instance ON {schema}.dicom_file_metadata USING hash (sop_instance_id);
CREATE INDEX idx_dicom_file_metadata_image_occurrence ON {schema}.dicom_file_metadata (image_occurrence_id);

-- table: file_upload_metadata
-- One row per SOP instance stored on a DICOM server. The original plugin's columns, plus
-- server_kind (orthanc | dicomweb: what instance_id / uploaded_filename hold) and file_size
-- (bytes sent). Orthanc: instance_id is Orthanc's instance id, uploaded_filename its stored
-- file (attachment uuid + .dcm); DICOMweb: the SOP Instance UID and the instance's RetrieveURL.
CREATE TABLE {schema}.file_upload_metadata (
    file_upload_id       bigint       NOT NULL,
    task_run_id          varchar(255) NOT NULL,
    flow_run_id          varchar(255) NOT NULL,
    original_filename    varchar(255) NOT NULL,
    original_file_path   text         NULL,
    instance_id          varchar(255) NOT NULL,
    uploaded_filename    text         NOT NULL,
    uploaded_datetime    timestamp    NOT NULL,
    image_occurrence_id  integer      NOT NULL,
    sop_instance_id      varchar(255) NOT NULL,
    server_url           text         NOT NULL,
    server_kind          varchar(20)  NULL,
    file_size            bigint       NULL,
    CONSTRAINT xpk_file_upload_metadata PRIMARY KEY (file_upload_id)
);
-- An instance is recorded once per server, also when two runs upload it at the same time.
CREATE UNIQUE INDEX idx_file_upload_metadata_server_sop ON {schema}.file_upload_metadata (server_url, sop_instance_id);
CREATE INDEX idx_file_upload_metadata_sop_instance ON {schema}.file_upload_metadata (sop_instance_id);
CREATE INDEX idx_file_upload_metadata_image_occurrence ON {schema}.file_upload_metadata (image_occurrence_id);

-- table: dicom_ingest_log
CREATE TABLE {schema}.dicom_ingest_log (
    ingest_log_id        bigint       NOT NULL,
    file_path            text         NOT NULL,
    file_size            bigint       NULL,
    file_mtime_ns        bigint       NULL,
    status               varchar(20)  NOT NULL,
    error_message        text         NULL,
    sop_instance_uid     varchar(255) NULL,
    image_occurrence_id  integer      NULL,
    run_id               varchar(255) NULL,
    processed_at         timestamptz  NOT NULL,
    CONSTRAINT xpk_dicom_ingest_log PRIMARY KEY (ingest_log_id),
    CONSTRAINT chk_dicom_ingest_log_status CHECK (status IN ('ingested', 'failed', 'duplicate')),
    CONSTRAINT chk_dicom_ingest_log_reason CHECK (status <> 'failed' OR coalesce(error_message, '') <> '')
);
-- One ledger row per path, and a SOP instance is ingested from one path only.
CREATE UNIQUE INDEX idx_dicom_ingest_log_path ON {schema}.dicom_ingest_log (file_path);
CREATE UNIQUE INDEX idx_dicom_ingest_log_ingested_sop ON {schema}.dicom_ingest_log (sop_instance_uid)
    WHERE status = 'ingested';
