"""Every Python block in README.md and docs/ runs as written, unless marked as an illustration.

A block preceded by the line ``<!-- illustration -->`` is only compiled.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(<!-- illustration -->\s*\n)?```python\n(.*?)```", re.DOTALL)


def blocks() -> list[tuple[str, str, bool]]:
    found = []
    for doc in DOCUMENTS:
        text = doc.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start(2)) + 1
            found.append((f"{doc.relative_to(ROOT)}:{line}", match.group(2), bool(match.group(1))))
    return found


BLOCKS = blocks()


def test_the_documents_hold_python_examples() -> None:
    assert len([b for b in BLOCKS if not b[2]]) >= 10


@pytest.mark.parametrize(("where", "code", "illustration"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_python_block_runs(where: str, code: str, illustration: bool, tmp_path: Path) -> None:
    compile(code, where, "exec")
    if illustration:
        return
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, f"{where} failed:\n{run.stderr[-3000:]}"
