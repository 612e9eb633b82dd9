"""The package's layers: each folder imports only the layers below it (the folder order is the pipeline)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "onp_fast"

# Bottom to top. A module may import its own layer and the layers below, never one above.
LAYERS = [
    {"errors", "atomic", "seed", "_ext", "torchutil", "progress", "memory", "distributed"},  # no knowledge of models
    {"ops"},  # thin wrappers of the C++/CUDA ops and their references
    {"models", "data", "attacks", "io", "metrics", "train", "poison", "evaluate"},  # what a user brings
    {"groups"},  # neuron units and coupled groups (fx tracing)
    {"reward"},  # the reward of masks and the batched masked-forward engine
    {"prepare"},  # the shared preparation: split, unlearned copy, trigger proxy, perturbations
    {"defenses"},  # ONP, FP, ANP, RNP, CLP: each ranks the groups
    {"repair"},  # the one entry point: depth rule, apply, fine-tune, compact, report
    {"compare", "bench"},  # evaluation of repairs against attacks; speed benchmarks of the ops
    {"cli"},  # parsing, loading, calling, writing
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module: Path) -> str:
    """onp_fast/<top>/... or onp_fast/<top>.py -> top."""
    return module.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The onp_fast top-level packages/modules a file imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PACKAGE).parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[:-1])[: len(rel) - node.level]
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts + [a.name] for a in node.names] if not parts else [parts]
            else:
                if not (node.module or "").startswith("onp_fast"):
                    continue
                parts = node.module.split(".")[1:]
                names = [parts] if parts else [[a.name] for a in node.names]
            out.update(p[0] for p in names if p)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("onp_fast."))
    return out


def _modules():
    return [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ("__init__.py", "__main__.py")]


def test_every_top_level_module_has_a_layer():
    tops = {_top(p) for p in _modules()}
    assert tops <= set(LEVEL), f"no layer for {sorted(tops - set(LEVEL))}: add it to LAYERS"


def test_no_module_imports_a_layer_above_it():
    bad = []
    for path in _modules():
        mine = LEVEL[_top(path)]
        for imported in _imports(path):
            if imported in LEVEL and LEVEL[imported] > mine:
                bad.append(f"{path.relative_to(PACKAGE)} imports {imported} (layer {LEVEL[imported]} > {mine})")
    assert not bad, "\n".join(bad)


def test_ops_import_nothing_of_the_package_but_the_extension_and_errors():
    for path in (PACKAGE / "ops").rglob("*.py"):
        assert _imports(path) <= {"_ext", "errors", "ops"}, path


def test_the_checker_sees_a_violation():
    """The rule is live: an import of a higher layer, written the ways the package writes imports, is found."""
    probe = PACKAGE / "groups" / "_probe_layers.py"
    probe.write_text("from ..repair import repair\nimport onp_fast.cli\nfrom onp_fast.defenses import get\n")
    try:
        assert _imports(probe) >= {"repair", "cli", "defenses"}
    finally:
        probe.unlink()
