"""The one-way doors between fedclip's four packages, checked on the source: every import statement of
every module is parsed with `ast` (those inside functions and `if TYPE_CHECKING:` blocks included, so
a lazy import cannot hide a dependency), resolved to the fedclip module it names, and held to the rules:

- `device_agent` never imports torch, open_clip, `fedclip.exporters` or `fedclip.coordinator`;
- `exporters` never import `fedclip.device_agent` or `fedclip.coordinator`;
- `sdk` imports none of the other three;
- `coordinator` imports `fedclip.exporters` only in the modules of `EXPORTER_DOORS`;
- no import cycle between fedclip modules (two modules importing each other, or a longer loop).

A violation known today and being fixed is listed in `KNOWN` with the reason: its own test is an
expected failure (strict), so it turns red the day the fix lands and the entry is removed; any other
violation fails the rule's test at once.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sdk", "device_agent", "exporters", "coordinator")

# The coordinator reaches the exporters (torch) only through the `export` command, imported lazily.
# the two commands that need torch: `export` (bundles) and `adapters export` (merged open_clip weights)
EXPORTER_DOORS = frozenset({"fedclip.coordinator.export_cmd", "fedclip.coordinator.adapters_cmd"})

# (importer, imported) edges, or ("cycle", ...members) entries, known and being fixed -> why.
KNOWN: dict[tuple[str, ...], str] = {}  # none today: issue 11 removed the last two


def _modules() -> dict[str, Path]:
    """fedclip module name -> source file, for every module of the four packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(["fedclip", *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every module `name` imports, absolute; a `from X import y` names X.y when that is a module."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, `level - 1` packages up
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield full if full in MODULES else base


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _edges(importer_prefix: str, *forbidden: str) -> set[tuple[str, ...]]:
    return {
        (src, dst)
        for src, targets in GRAPH.items()
        if _under(src, importer_prefix)
        for dst in targets
        if _under(dst, *forbidden)
    }


def _cycles() -> set[tuple[str, ...]]:
    """Strongly connected components of more than one fedclip module (Tarjan), as sorted tuples."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in GRAPH:
                continue  # outside fedclip
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                found.add(("cycle", *sorted(members)))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


VIOLATIONS = {
    "device_agent": _edges(
        "fedclip.device_agent", "torch", "open_clip", "fedclip.exporters", "fedclip.coordinator"
    ),
    "exporters": _edges("fedclip.exporters", "fedclip.device_agent", "fedclip.coordinator"),
    "sdk": _edges("fedclip.sdk", "fedclip.device_agent", "fedclip.exporters", "fedclip.coordinator"),
    "coordinator": {
        e for e in _edges("fedclip.coordinator", "fedclip.exporters") if e[0] not in EXPORTER_DOORS
    },
    "cycles": _cycles(),
}


def test_the_parser_sees_lazy_imports_and_resolves_modules():
    """The check would pass vacuously if imports inside functions or `from pkg import module` were
    missed: both forms occur in the tree today."""
    assert "fedclip.exporters.bundle" in GRAPH["fedclip.coordinator.export_cmd"]  # inside a function
    assert "fedclip.exporters.step_bundle" in GRAPH["fedclip.exporters.bundle"]  # from pkg import module
    assert len(MODULES) > 60 and all(_under(m, "fedclip") for m in MODULES)


@pytest.mark.parametrize("rule", sorted(VIOLATIONS))
def test_one_way_rule(rule: str):
    new = sorted(VIOLATIONS[rule] - set(KNOWN))
    assert not new, f"{rule}: imports against the rules (importer, imported): {new}"


@pytest.mark.parametrize(
    "violation",
    [
        pytest.param(v, marks=pytest.mark.xfail(strict=True, reason=why), id="-".join(v))
        for v, why in KNOWN.items()
    ],
)
def test_known_violation_is_gone(violation: tuple[str, ...]):
    """Fails (expected) while the violation exists; passes, and so fails strictly, once it is fixed:
    remove the entry from KNOWN then."""
    assert not any(violation in found for found in VIOLATIONS.values())


def test_exporter_doors_exist():
    """A door that no longer exists must not stay open in this list."""
    assert EXPORTER_DOORS <= set(MODULES)
