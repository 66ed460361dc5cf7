"""Link imaging to the person's visit: found, never invented.

When the CDM schema has ``visit_occurrence``, a study's visit is the person's one visit whose
dates contain the study date (``visit_start_date <= date <= visit_end_date``, an open end
counting as the start day). None, or more than one: no visit (NULL), counted, because a
guess would put an image into the wrong encounter. Person 0 (unmapped patients under
use_id_zero) has no visits. One query per batch for the (person, date) pairs it has.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.db.tables import Tables, column_names

VISIT_COLUMNS = ("visit_occurrence_id", "person_id", "visit_start_date", "visit_end_date")
VisitKey = tuple[int, dt.date]  # (person_id, study date)

_VISITS_SQL = """
SELECT k.person_id, k.day, min(v.visit_occurrence_id), count(DISTINCT v.visit_occurrence_id)
FROM unnest(%s::bigint[], %s::date[]) AS k(person_id, day)
JOIN {visit} v ON v.person_id = k.person_id AND v.visit_start_date <= k.day
             AND coalesce(v.visit_end_date, v.visit_start_date) >= k.day
GROUP BY 1, 2
"""


def has_visits(conn: psycopg.Connection, tables: Tables) -> bool:
    """Whether the CDM schema has a visit_occurrence table with the columns linkage needs."""
    columns = column_names(conn, tables.schemas.cdm, "visit_occurrence")
    return all(c in columns for c in VISIT_COLUMNS)


#: What a study's (person, date) found: a visit id, AMBIGUOUS, or nothing (not in the dict).
AMBIGUOUS = -1


def find_visits(
    conn: psycopg.Connection, tables: Tables, keys: Iterable[VisitKey]
) -> dict[VisitKey, int]:
    """Each (person, date) with a visit: its one visit's id, or AMBIGUOUS for several."""
    wanted = sorted({k for k in keys if k[0] != 0})
    if not wanted:
        return {}
    rows = conn.execute(
        sql.SQL(_VISITS_SQL).format(visit=tables["visit_occurrence"]),
        [[k[0] for k in wanted], [k[1] for k in wanted]],
    ).fetchall()
    return {(person, day): visit if n == 1 else AMBIGUOUS for person, day, visit, n in rows}


def visit_of(visits: dict[VisitKey, int], key: VisitKey) -> int | None:
    """The visit to write for ``key``: None when there is none or it is ambiguous."""
    visit = visits.get(key)
    return None if visit is None or visit == AMBIGUOUS else visit


def visit_outcome(visits: dict[VisitKey, int], key: VisitKey) -> str:
    """How a study's visit was found, for the materialization metadata."""
    visit = visits.get(key)
    return "none" if visit is None else "ambiguous" if visit == AMBIGUOUS else "linked"
