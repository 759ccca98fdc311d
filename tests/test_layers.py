"""The layers, written once: a module never imports a higher layer (not even lazily, inside a function),
grpo and eval never import each other, and the packages form no cycle. docs/architecture.md shows the
same order. A new top-level package or module must be given its layer here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first; units in one layer may import each other (no cycles), except SIBLINGS
LAYERS = (
    ("echoink", "echoink.config", "echoink.choices", "echoink.io", "echoink.compat", "echoink.problem_types",
     "echoink.user_code", "echoink.run_lock", "echoink.hub_ids"),
    ("echoink.data",),
    ("echoink.prompts", "echoink.rewards"),
    ("echoink.model",),
    ("echoink.grpo", "echoink.eval"),
    ("echoink.analysis", "echoink.export"),
    ("echoink.cli", "echoink.demo", "echoink.lmms_eval_plugin"),
)
SIBLINGS = {frozenset({"echoink.grpo", "echoink.eval"})}
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    """The layer unit a module belongs to: echoink.<first part>, or the package itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _imports(path: Path, module: str) -> set[str]:
    """Every echoink module `path` imports, at any depth of the file (functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "echoink" or name.startswith("echoink.")}


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted((SRC / "echoink").rglob("*.py")):
        module = _module_name(path)
        edges[module] = _imports(path, module)
    return edges


def test_every_unit_has_a_layer():
    units = {_unit(module) for module in _graph()}
    assert units <= set(LAYER_OF), f"give these a layer in tests/test_layers.py: {sorted(units - set(LAYER_OF))}"


def test_no_module_imports_a_higher_layer_or_its_sibling():
    problems = []
    for module, imported in _graph().items():
        unit = _unit(module)
        for name in imported:
            target = _unit(name)
            if target == "echoink" or target == unit:
                continue
            if LAYER_OF.get(target, -1) > LAYER_OF[unit]:
                problems.append(f"{module} imports {name} (layer {LAYER_OF[target]} > {LAYER_OF[unit]})")
            if frozenset({unit, target}) in SIBLINGS:
                problems.append(f"{module} imports its sibling {name}")
    assert not problems, "\n".join(problems)


def test_units_form_no_cycle():
    unit_edges: dict[str, set[str]] = {}
    for module, imported in _graph().items():
        unit = _unit(module)
        unit_edges.setdefault(unit, set()).update(
            _unit(name) for name in imported if _unit(name) not in (unit, "echoink"))
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(unit_edges.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for unit in sorted(unit_edges):
        if unit not in state:
            visit(unit, [])


def test_the_checker_sees_lazy_imports(tmp_path):
    """The rule covers imports inside functions (the old trainer imported eval lazily)."""
    path = tmp_path / "echoink" / "grpo" / "x.py"
    path.parent.mkdir(parents=True)
    path.write_text("def f():\n    from echoink.eval.run import evaluate_loaded\n")
    global SRC
    saved, SRC = SRC, tmp_path
    try:
        assert "echoink.eval.run" in _imports(path, _module_name(path))
    finally:
        SRC = saved


NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}  # public despite the underscore


def test_private_library_attributes_only_in_the_compatibility_module():
    """`._name` access on a library object lives in echoink/compat.py, where it is probed at import."""
    import re

    pattern = re.compile(r"\b(?!self\b|cls\b)[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\._[a-z][a-z0-9_]*\b")
    offenders = []
    for path in sorted((SRC / "echoink").rglob("*.py")):
        if path.name == "compat.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = re.sub(r"``[^`]*``", "", line.split("#", 1)[0])  # docstring literals name, not access
            if '"' in code or "'" in code:
                code = re.sub(r"(\"[^\"]*\"|'[^']*')", "", code)
            for match in pattern.finditer(code):
                if match.group(0).rsplit(".", 1)[1] in NAMEDTUPLE_API:
                    continue
                offenders.append(f"{path.relative_to(SRC)}:{number}: {match.group(0)}")
    assert not offenders, "\n".join(offenders)
