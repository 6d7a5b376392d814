"""The README's Repository table names every module of every package, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_architecture import ALLOWED

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(ALLOWED)  # the packages whose import rules are checked
SOURCE_SUFFIXES = (".py", ".cpp", ".h")
NOT_LISTED = {"__init__.py", "__main__.py"}  # a package's plumbing, not a module with a job


def layout_rows(readme: str) -> dict[str, str]:
    """The Repository table's rows: the first cell's path -> the second cell."""
    section = readme.split("\n## Repository\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            rows[cells[0].strip("`").rstrip("/")] = cells[1]
    return rows


def named_files(cell: str) -> set[str]:
    return {name for name in re.findall(r"`([\w./]+)`", cell) if name.endswith(SOURCE_SUFFIXES)}


@pytest.mark.parametrize("package", PACKAGES)
def test_the_table_lists_the_package_modules(package: str) -> None:
    rows = layout_rows((ROOT / "README.md").read_text())
    assert package in rows, f"README's Repository table has no row for {package}/"
    on_disk = {path.name for path in (ROOT / package).iterdir()
               if path.suffix in SOURCE_SUFFIXES and path.name not in NOT_LISTED}
    listed = named_files(rows[package])
    assert not on_disk - listed, f"README does not name {sorted(on_disk - listed)} in {package}/"
    assert not listed - on_disk, f"README names {sorted(listed - on_disk)}, not in {package}/"


def test_every_package_has_a_row() -> None:
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages == set(PACKAGES)


def test_the_parser_reads_a_table() -> None:
    readme = "# x\n\n## Repository\n\n| path | what |\n|---|---|\n| `a/` | `b.py` (b), `c.h` |\n"
    assert {name: named_files(cell) for name, cell in layout_rows(readme).items()} == {
        "a": {"b.py", "c.h"}}
