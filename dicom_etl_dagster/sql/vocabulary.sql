-- OMOP CDM v5.4 vocabulary tables the DICOM vocabulary is loaded into.
-- Each block runs only when its table does not exist yet: an existing Athena vocabulary
-- (the normal case) is never altered.

-- table: vocabulary
CREATE TABLE {schema}.vocabulary (
    vocabulary_id          varchar(20)  NOT NULL,
    vocabulary_name        varchar(255) NOT NULL,
    vocabulary_reference   varchar(255) NULL,
    vocabulary_version     varchar(255) NULL,
    vocabulary_concept_id  integer      NOT NULL,
    CONSTRAINT xpk_vocabulary PRIMARY KEY (vocabulary_id)
);

-- table: concept_class
CREATE TABLE {schema}.concept_class (
    concept_class_id          varchar(20)  NOT NULL,
    concept_class_name        varchar(255) NOT NULL,
    concept_class_concept_id  integer      NOT NULL,
    CONSTRAINT xpk_concept_class PRIMARY KEY (concept_class_id)
);

-- table: concept
CREATE TABLE {schema}.concept (
    concept_id        integer      NOT NULL,
    concept_name      varchar(255) NOT NULL,
    domain_id         varchar(20)  NOT NULL,
    vocabulary_id     varchar(20)  NOT NULL,
    concept_class_id  varchar(20)  NOT NULL,
    standard_concept  varchar(1)   NULL,
    concept_code      varchar(50)  NOT NULL,
    valid_start_date  date         NOT NULL,
    valid_end_date    date         NOT NULL,
    invalid_reason    varchar(1)   NULL,
    CONSTRAINT xpk_concept PRIMARY KEY (concept_id)
);
CREATE INDEX idx_concept_code ON {schema}.concept (concept_code);
CREATE INDEX idx_concept_vocabluary_id ON {schema}.concept (vocabulary_id);
-- Concept mapping matches names case-insensitively (modality -> SNOMED procedure, "Entire <body part>").
CREATE INDEX idx_concept_upper_name ON {schema}.concept (upper(concept_name));

-- table: concept_relationship
CREATE TABLE {schema}.concept_relationship (
    concept_id_1      integer     NOT NULL,
    concept_id_2      integer     NOT NULL,
    relationship_id   varchar(20) NOT NULL,
    valid_start_date  date        NOT NULL,
    valid_end_date    date        NOT NULL,
    invalid_reason    varchar(1)  NULL,
    CONSTRAINT xpk_concept_relationship PRIMARY KEY (concept_id_1, concept_id_2, relationship_id)
);
CREATE INDEX idx_concept_relationship_id_2 ON {schema}.concept_relationship (concept_id_2);
