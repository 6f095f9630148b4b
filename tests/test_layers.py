"""The package's layers (ARCHITECTURE.md): a module imports only its own layer or the ones below,
and no two modules import each other, directly or round a loop. Function-level imports count too."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmllm"

# Bottom to top. A module's layer is the first pattern it matches; every module must match one.
LAYERS = [
    ("foundation", ["mmllm", "mmllm.config", "mmllm.progress", "mmllm.interrupt", "mmllm.file_lock", "mmllm.host_memory", "mmllm.openmp", "mmllm.catalog", "mmllm.images", "mmllm.evidence",
                    "mmllm.bag_of_words", "mmllm.applicability", "mmllm.metrics",
                    "mmllm.schema", "mmllm.schema_infer", "mmllm.taxonomies", "mmllm.output_paths", "mmllm.confidence", "mmllm.class_prior", "mmllm.tiny"]),
    ("model inputs", ["mmllm.prompts", "mmllm.augment", "mmllm.constrained", "mmllm.collator"]),
    ("contracts", ["mmllm.predictor", "mmllm.training", "mmllm.grounding"]),
    ("models", ["mmllm.models", "mmllm.models.*"]),
    ("model folders", ["mmllm.model_dir"]),
    ("jobs", ["mmllm.labelling", "mmllm.labelling.*", "mmllm.evaluate", "mmllm.report", "mmllm.search", "mmllm.validate",
              "mmllm.finetune", "mmllm.recipes", "mmllm.recipes.*"]),
    ("entry points", ["mmllm.label", "mmllm.cli", "mmllm.__main__", "mmllm.demo", "mmllm.review_tab", "mmllm.record_view"]),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(module: str) -> int:
    for number, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return number
    raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to ARCHITECTURE.md")


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports anywhere in its file."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in graph().items() for t in targets
              if layer_of(t) > layer_of(m) and not (m == "mmllm" or t == "mmllm")]
    assert not upward, "\n".join(upward)


def test_no_import_loops():
    edges, loops = graph(), []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                loops.append(" -> ".join(stack[stack.index(t):] + [m, t]) if t in stack else f"{m} -> {t}")
            elif t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert not loops, "\n".join(loops)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "mmllm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import x\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from mmllm.b import y\n")
    (pkg / "b.py").write_text("")
    known = {"mmllm": pkg / "__init__.py", "mmllm.sub": pkg / "sub" / "__init__.py", "mmllm.sub.a": pkg / "sub" / "a.py",
             "mmllm.b": pkg / "b.py"}
    assert imports("mmllm.sub", known["mmllm.sub"], known) == {"mmllm.sub.a"}
    assert imports("mmllm.sub.a", known["mmllm.sub.a"], known) == {"mmllm.b"}
