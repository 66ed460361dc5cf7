"""The shape the architecture promises, checked on the source itself.

- no function longer than 80 lines (long functions are where decisions hide);
- no SQL in ``assets/`` (assets call core functions and map numbers to Dagster results);
- ``core/`` never imports Dagster;
- every ``DICOM_ETL_*`` variable is declared in ``core/settings.py`` and nowhere else, and the
  README's configuration tables document exactly those variables.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dicom_etl_dagster.core import settings
from dicom_etl_dagster_tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "dicom_etl_dagster"
MAX_FUNCTION_LINES = 80
SQL_STATEMENT = re.compile(
    r"\b(SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s+\S+\s+SET|DELETE\s+FROM|COPY\s.+\sFROM|"
    r"CREATE\s+(TABLE|INDEX|SCHEMA|SEQUENCE))\b",
    re.IGNORECASE | re.DOTALL,
)
#: Variables only the test suite reads (documented in the README's Tests section).
TEST_ONLY_VARIABLES = {"DICOM_ETL_REQUIRE_ORTHANC", "DICOM_ETL_REQUIRE_CHROMIUM"}


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _string_constants(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node


def test_no_function_is_longer_than_80_lines():
    too_long = {
        f"{path.relative_to(REPO_ROOT)}:{fn.lineno} {fn.name}": fn.end_lineno - fn.lineno + 1
        for path in _modules(PACKAGE)
        for fn in _functions(_tree(path))
        if fn.end_lineno is not None and fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert not too_long, too_long


def test_the_length_check_sees_a_long_function(tmp_path):
    source = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    (fn,) = _functions(ast.parse(source))
    assert fn.end_lineno - fn.lineno + 1 == MAX_FUNCTION_LINES + 1


def test_assets_hold_no_sql():
    found = {
        f"{path.relative_to(REPO_ROOT)}:{node.lineno}": node.value[:60]
        for path in _modules(PACKAGE / "assets")
        for node in _string_constants(_tree(path))
        if SQL_STATEMENT.search(node.value)
    }
    imports_sql = [
        str(path.relative_to(REPO_ROOT))
        for path in _modules(PACKAGE / "assets")
        if re.search(r"^from psycopg import sql|^import psycopg\.sql", path.read_text(), re.M)
    ]
    assert not found and not imports_sql, (found, imports_sql)


@pytest.mark.parametrize(
    "text", ["SELECT count(*) FROM {}", "INSERT INTO {} (a) VALUES (1)", "UPDATE {} SET a = 1"]
)
def test_the_sql_check_recognises_statements(text):
    assert SQL_STATEMENT.search(text)


def test_core_never_imports_dagster():
    offenders = []
    for path in _modules(PACKAGE / "core"):
        for node in ast.walk(_tree(path)):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(REPO_ROOT)}: {n}" for n in names if n.split(".")[0] == "dagster"
            ]
    assert not offenders, offenders


def test_environment_variables_are_declared_in_settings_only():
    declared = {s.name for s in settings.SETTINGS}
    settings_file = PACKAGE / "core" / "settings.py"
    elsewhere = {
        f"{path.relative_to(REPO_ROOT)}:{node.lineno}": node.value
        for path in _modules(PACKAGE)
        if path != settings_file
        for node in _string_constants(_tree(path))
        if re.fullmatch(r"DICOM_ETL_[A-Z_]+", node.value)
    }
    assert not elsewhere, f"declare these in core/settings.py: {elsewhere}"
    assert len(declared) == len(settings.SETTINGS), "a variable is declared twice"
    in_source = set(re.findall(r'"(DICOM_ETL_[A-Z_]+)"', settings_file.read_text()))
    assert in_source == declared, "every declared variable is in SETTINGS"


def test_secrets_are_never_read_by_the_package_itself():
    # A secret reaches a resource only as dg.EnvVar(setting.name), so Dagster keeps its value
    # out of run config, the UI and logs; reading it with .value() would bypass that.
    secrets = [
        name for name, s in vars(settings).items() if isinstance(s, settings.Setting) and s.secret
    ]
    assert secrets, "the database URL and the passwords are marked secret"
    read = {
        f"{path.relative_to(REPO_ROOT)}: {name}"
        for path in _modules(PACKAGE)
        for name in secrets
        if re.search(rf"settings\.{name}\.(value|as_int)\(", path.read_text())
    }
    assert not read, read


def _readme_table_variables() -> set[str]:
    """Variables named in the first column of a README table row."""
    rows = re.findall(r"^\| `(DICOM_ETL_[A-Z_]+)`(?: / `(DICOM_ETL_[A-Z_]+)`)?", _readme(), re.M)
    return {name for row in rows for name in row if name}


def _readme() -> str:
    return (REPO_ROOT / "README.md").read_text()


def test_readme_documents_every_setting_and_no_other():
    documented = _readme_table_variables()
    declared = {s.name for s in settings.SETTINGS}
    assert documented == declared, {
        "undocumented": sorted(declared - documented),
        "documented but not read by the product": sorted(documented - declared),
    }
    # Without wildcards such as DICOM_ETL_DICOM_SERVER_*, which name a family of variables.
    text = re.sub(r"DICOM_ETL_[A-Z_]*\*", "", _readme())
    mentioned = set(re.findall(r"DICOM_ETL_[A-Z_]*[A-Z]", text))
    assert mentioned <= declared | TEST_ONLY_VARIABLES, sorted(mentioned - declared)
