"""Every `# type: ignore` in the type-checked packages (scripts/typecheck.sh: all four)
names the error it silences and says why on the same line, so none outlives its reason unnoticed
(mypy's warn_unused_ignores reports the ones that silence nothing)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("sdk", "device_agent", "coordinator", "exporters")
IGNORE = re.compile(r"#\s*type:\s*ignore(?P<code>\[[a-z0-9-]+(?:,\s*[a-z0-9-]+)*\])?(?P<rest>.*)$")


def _ignores() -> list[tuple[str, str]]:
    out = []
    for pkg in CHECKED:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if IGNORE.search(line):
                    out.append((f"{path.relative_to(ROOT)}:{n}", line.strip()))
    return out


def test_the_scan_finds_the_ignores_there_are():
    assert any("ort_loader.py" in where for where, _ in _ignores())  # one is known to exist


@pytest.mark.parametrize(("where", "line"), _ignores())
def test_type_ignore_has_a_code_and_a_reason(where: str, line: str):
    m = IGNORE.search(line)
    assert m is not None and m.group("code"), f"{where}: `type: ignore` without an error code"
    assert re.match(r"\s*#\s*\w", m.group("rest")), f"{where}: say why on the same line (`# ...`)"
