"""The package's layering (docs/design.md §12.1): cli -> train | sample | eval | aot -> components / port / data ->
models -> nn -> parallel. Nothing imports upward, and project imports sit at the top of a module (a cycle then
fails at import instead of hiding inside a function)."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bifrost_jax")

# package (or top-level module) -> layer; a module may import its own layer and every lower one
LAYERS = {
    "configs": 0, "parallel": 0,
    "nn": 1,
    "models": 2,
    "port": 3, "data": 3, "checkpoint": 3,
    "components": 4,
    "sample": 5,
    "train": 6,
    "eval": 7, "aot": 7,
    "cli": 8, "generate": 8, "chat": 8, "demo": 8, "demo_phases": 8, "demo_summary": 8, "__init__": 8,
}


def _modules():
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)
                yield rel, path


def _unit(rel: str) -> str:
    """The layer unit of a path relative to the package: its first component (without .py)."""
    return rel.split(os.sep)[0].removesuffix(".py")


def _project_imports(tree):
    """(module name, lineno, at top level?) of every bifrost_jax import."""
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bifrost_jax"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("bifrost_jax")]
        for name in names[:1]:
            yield name, names, node.lineno, id(node) in top


def _target_unit(names):
    """The unit an import reaches: ``bifrost_jax.X...`` -> X; ``from bifrost_jax import X`` -> X."""
    module = names[0]
    parts = module.split(".")
    if len(parts) >= 2:
        return parts[1]
    return names[1].split(".")[1] if len(names) > 1 else "__init__"


@pytest.mark.parametrize("rel,path", sorted(_modules()))
def test_imports_are_at_the_top_and_point_down(rel, path):
    with open(path) as fh:
        tree = ast.parse(fh.read(), path)
    unit = _unit(rel)
    assert unit in LAYERS, f"{rel}: package {unit!r} has no layer in tests/test_layering.py"
    for module, names, lineno, at_top in _project_imports(tree):
        assert at_top, f"{rel}:{lineno}: project import of {module} inside a function or block"
        target = _target_unit(names)
        assert target in LAYERS, f"{rel}:{lineno}: imports {module}, a package with no layer"
        assert LAYERS[target] <= LAYERS[unit], (f"{rel}:{lineno}: {unit} (layer {LAYERS[unit]}) imports {module} "
                                                f"({target}, layer {LAYERS[target]}): upward")
