"""docs/DATABASE.md describes the database the daemon creates: every table and column (with its
declared type), every session and position status and every event type, and no more. The
values it calls reserved are never written by the daemon's store."""

from __future__ import annotations

import ast
import re
import sqlite3
from pathlib import Path

from positiond.store.schema import SCHEMA_VERSION, migrate

ROOT = Path(__file__).parent.parent
DOC = (ROOT / "docs" / "DATABASE.md").read_text()
LOOKUPS = {"session_statuses", "position_statuses", "event_types"}


def section(title: str, end: str) -> str:
    start = DOC.index(title)
    return DOC[start : DOC.index(end, start + len(title))]


def first_column(text: str) -> list[str]:
    return re.findall(r"^\| `(\w+)` \|", text, re.M)


def database(tmp: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp / "positiond.db")
    assert migrate(conn) == SCHEMA_VERSION
    return conn


def test_every_table_and_column_is_documented_with_its_type(tmp_path: Path) -> None:
    conn = database(tmp_path)
    tables = {
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    }
    documented = set(re.findall(r"^### `(\w+)`$", DOC, re.M))
    assert documented == tables - LOOKUPS
    assert all(f"`{name}`" in DOC for name in LOOKUPS)
    for table in sorted(documented):
        part = section(f"### `{table}`", "\n### ")
        rows = re.findall(r"^\| `(\w+)` \| (\w+) \| (yes|no) \|", part, re.M)
        info = conn.execute(f"PRAGMA table_info({table})").fetchall()
        expected = [(c[1], c[2], "yes" if not c[3] and not c[5] else "no") for c in info]
        assert rows == expected, table


def test_every_status_and_event_type_is_documented(tmp_path: Path) -> None:
    conn = database(tmp_path)

    def names(table: str) -> set[str]:
        return {r[0] for r in conn.execute(f"SELECT name FROM {table}")}

    sessions = section("### Session statuses", "\n### ")
    positions = section("### Position statuses", "\n## ")
    events = section("## 4. Event types", "\n## 5.")
    assert set(first_column(sessions)) == names("session_statuses")
    assert set(first_column(positions)) == names("position_statuses")
    assert set(first_column(events)) == names("event_types")


def test_reserved_values_are_never_written_by_the_store() -> None:
    reserved = set(re.findall(r"^\| `(\w+)` \|[^\n]*\breserved\b", DOC, re.M))
    assert reserved == {"RECOVERED", "MANUAL_EXIT", "EXPIRED", "ORPHAN", "STOP_HIT", "ATM_CHANGE"}
    literals: set[str] = set()
    for name in (
        "store/sqlite.py", "store/writes.py", "store/recovery.py", "engine.py", "ops.py"
    ):
        tree = ast.parse((ROOT / "daemon" / "positiond" / name).read_text())
        literals |= {
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and type(n.value) is str
        }
    assert "TRAIL_UPDATE" in literals and "FENCED_WRITE" in literals  # the walk sees events
    assert not reserved & literals
