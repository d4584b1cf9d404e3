"""The documentation site stays whole: every page is in the nav, the pages that quote files quote
them as they are, and the test module of "Testing your tasks" passes under pytest.

The site itself is built by ``nox -s docs`` (``mkdocs build --strict``); these checks need no
mkdocs and run with the rest of the suite.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support.project import run_pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
NAV_ENTRY = re.compile(r"^\s*-\s+(?:[^:\n]+:\s+)?(?P<page>\S+\.md)\s*$", re.MULTILINE)
FILE_BLOCK = re.compile(
    r"<!-- file: (?P<path>\S+) -->\s*\n(?:<!-- illustration -->\s*\n)?```python\n(?P<code>.*?)```",
    re.DOTALL,
)
PYTEST_BLOCK = re.compile(r"<!-- pytest -->\s*\n```python\n(?P<code>.*?)```", re.DOTALL)


def nav() -> list[str]:
    return NAV_ENTRY.findall((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def blocks(pattern: re.Pattern[str]) -> list[tuple[str, re.Match[str]]]:
    found = []
    for page in PAGES:
        text = (DOCS / page).read_text(encoding="utf-8")
        found += [(page, match) for match in pattern.finditer(text)]
    return found


def test_every_page_is_in_the_nav() -> None:
    assert sorted(set(PAGES) - set(nav())) == []


def test_every_page_in_the_nav_exists() -> None:
    assert sorted(set(nav()) - set(PAGES)) == []


def test_getting_started_gives_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (commands,) = re.findall(r"```sh\n(# 1\..*?)```", readme, re.DOTALL)

    assert commands in (DOCS / "getting-started.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("page", "match"),
    blocks(FILE_BLOCK),
    ids=[f"{page}:{match['path']}" for page, match in blocks(FILE_BLOCK)],
)
def test_a_quoted_file_is_quoted_as_it_is(page: str, match: re.Match[str]) -> None:
    assert match["code"] == (ROOT / match["path"]).read_text(encoding="utf-8")


def test_the_documented_test_module_passes_under_pytest(tmp_path: Path) -> None:
    ((page, match),) = blocks(PYTEST_BLOCK)
    (tmp_path / "test_documented.py").write_text(match["code"], encoding="utf-8")

    run = run_pytest(tmp_path, "test_documented.py")

    tests = match["code"].count("\ndef test_")
    assert run.returncode == 0, f"{page}:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
    assert f"{tests} passed" in run.stdout
