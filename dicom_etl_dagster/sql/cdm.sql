-- OMOP CDM v5.4 clinical tables the imaging ETL writes to. Created only when missing.

-- table: person
CREATE TABLE {schema}.person (
    person_id                    integer     NOT NULL,
    gender_concept_id            integer     NOT NULL,
    year_of_birth                integer     NOT NULL,
    month_of_birth               integer     NULL,
    day_of_birth                 integer     NULL,
    birth_datetime               timestamp   NULL,
    race_concept_id              integer     NOT NULL,
    ethnicity_concept_id         integer     NOT NULL,
    location_id                  integer     NULL,
    provider_id                  integer     NULL,
    care_site_id                 integer     NULL,
    person_source_value          varchar(50) NULL,
    gender_source_value          varchar(50) NULL,
    gender_source_concept_id     integer     NULL,
    race_source_value            varchar(50) NULL,
    race_source_concept_id       integer     NULL,
    ethnicity_source_value       varchar(50) NULL,
    ethnicity_source_concept_id  integer     NULL,
    CONSTRAINT xpk_person PRIMARY KEY (person_id)
);

-- table: procedure_occurrence
CREATE TABLE {schema}.procedure_occurrence (
    procedure_occurrence_id      integer     NOT NULL,
    person_id                    integer     NOT NULL,
    procedure_concept_id         integer     NOT NULL,
    procedure_date               date        NOT NULL,
    procedure_datetime           timestamp   NULL,
    procedure_end_date           date        NULL,
    procedure_end_datetime       timestamp   NULL,
    procedure_type_concept_id    integer     NOT NULL,
    modifier_concept_id          integer     NULL,
    quantity                     integer     NULL,
    provider_id                  integer     NULL,
    visit_occurrence_id          integer     NULL,
    visit_detail_id              integer     NULL,
    procedure_source_value       varchar(50) NULL,
    procedure_source_concept_id  integer     NULL,
    modifier_source_value        varchar(50) NULL,
    CONSTRAINT xpk_procedure_occurrence PRIMARY KEY (procedure_occurrence_id)
);
CREATE INDEX idx_procedure_person_id ON {schema}.procedure_occurrence (person_id);
