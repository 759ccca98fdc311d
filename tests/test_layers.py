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


# ---- the model seam: only the model layer knows a thinker's insides ----------------------------------------

#: Thinker attributes, processor media keys and chat-template tokens that only the model layer may name.
MODEL_INTERNALS = {"language_model", "lm_head", "rope_deltas", "get_rope_index", "audio_tower", "get_input_embeddings"}
MEDIA_KEYS = {"input_features", "feature_attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
              "video_grid_thw", "video_second_per_grid"}
CHAT_TOKEN = r"<\|[A-Za-z_]+\|>"
ABOVE_THE_MODEL = ("grpo", "eval", "analysis", "demo", "lmms_eval_plugin")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _model_internals_named(source: str) -> list[str]:
    """What a module names of a thinker's insides: attributes, keyword arguments, and strings (getattr,
    dict keys) — docstrings aside."""
    import re

    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    named = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in MODEL_INTERNALS | MEDIA_KEYS:
            named.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg in MEDIA_KEYS:
            named.append(f"line {node.value.lineno}: {node.arg}=")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in MODEL_INTERNALS | MEDIA_KEYS or re.search(CHAT_TOKEN, node.value):
                named.append(f"line {node.lineno}: {node.value!r}")
    return named


def test_only_the_model_layer_names_a_thinker_internal():
    offenders = []
    for package in ABOVE_THE_MODEL:
        for path in sorted((SRC / "echoink" / package).rglob("*.py")):
            offenders += [f"{path.relative_to(SRC)} {what}" for what in _model_internals_named(path.read_text("utf-8"))]
    assert not offenders, "ask the family (OmniFamily) instead:\n" + "\n".join(offenders)


def test_the_internals_check_sees_attributes_getattr_strings_and_chat_tokens():
    source = ('def f(model, tok):\n    """Docstrings may say <|im_end|> and lm_head."""\n'
              '    a = model.model.language_model\n    b = getattr(model, "lm_head")\n'
              '    c = tok.convert_tokens_to_ids("<|im_end|>")\n    return model(pixel_values=a)\n')
    named = " ".join(_model_internals_named(source))
    assert ".language_model" in named and "'lm_head'" in named and "<|im_end|>" in named
    assert "pixel_values=" in named and "Docstrings" not in named


def _module_graph() -> dict[str, set[str]]:
    """module -> the echoink modules importing it loads: the named ones and their packages (an `__init__`
    runs when a submodule is imported), except packages the importer lives in (already loading)."""
    edges = _graph()
    modules = set(edges)
    graph: dict[str, set[str]] = {}
    for module, imported in edges.items():
        targets = set()
        for name in imported:
            parts = name.split(".")
            for end in range(2, len(parts) + 1):
                candidate = ".".join(parts[:end])
                if candidate in modules and not (module + ".").startswith(candidate + ".") and candidate != module:
                    targets.add(candidate)
        graph[module] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in state:
                found = visit(nxt, trail + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_modules_inside_a_package_form_no_cycle():
    """Not even one closed by a function-level import (the model families, loading and tiny builders were)."""
    graph = _module_graph()
    inside = {m: {t for t in targets if _unit(t) == _unit(m)} for m, targets in graph.items()}
    cycle = _cycle(inside)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_analysis_reads_files_only():
    """analysis/ loads neither torch nor transformers nor the model layer, not even through the eval modules it
    reads (`eval.metrics`, `eval.run_files`): checked in a fresh interpreter."""
    import os
    import subprocess
    import sys

    modules = sorted(_module_name(path) for path in (SRC / "echoink" / "analysis").rglob("*.py"))
    script = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
              + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
                " or m.startswith(('echoink.model', 'echoink.grpo')) or m in ('echoink.eval.run', 'echoink.eval.generation')))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.stdout.strip() == "[]", result.stdout[:500]
