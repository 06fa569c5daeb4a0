"""The package's shape, checked: dependencies point one way, command-line code stays in cli/, no private reach-ins."""

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "crosslayer"

# lower layers never import higher ones (module level or inside a function); README's layout section
LAYERS = [
    {"errors", "device", "weights"},  # device: devices, dtype tables, sync; weights: checkpoint files a tensor at a time
    {"recipe"},
    {"config", "quant", "cpu_decode"},  # quant: 8-bit K/V and the producers-only QuantizedCache modeling's generate builds
    {"modeling", ""},  # "" is the package root: importing it registers the model classes
    {"kv", "decode", "checkpoint", "losses", "teacher_cache"},
    {"loading", "model_card"},  # any model source, its tokenizer and config; a model folder's README.md (Hub card)
    {"convert", "calibration", "data", "generate"},
    {"recover", "plan"},
    {"train"},
    {"eval", "bench", "sweep", "plot", "quickstart", "serving", "frontier"},  # frontier: a search + held-out ppl
    {"cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield path, parts


def top(parts: list[str]) -> str:
    return parts[0] if parts else ""


def imported(path: Path, parts: list[str]):
    """(top-level crosslayer module, imported names, line) of every import in a file."""
    package = parts if path.name == "__init__.py" else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "crosslayer":
                target = node.module.split(".")[1:]
            else:
                continue
            names = [a.name for a in node.names]
            if not node.module and node.level:  # `from . import x`: x is the module
                for name in names:
                    yield top(target + [name]), [], node.lineno
            else:
                yield top(target), names, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "crosslayer":
                    yield top(alias.name.split(".")[1:]), [], node.lineno


def test_every_module_has_a_layer():
    unknown = {top(parts) for _, parts in modules()} - set(RANK)
    assert not unknown, f"place {unknown} in LAYERS (and README's layout section)"


def test_dependencies_point_down():
    upward = []
    for path, parts in modules():
        me = top(parts)
        for target, _, line in imported(path, parts):
            if target != me and RANK.get(target, -1) > RANK[me]:
                upward.append(f"{path.relative_to(REPO)}:{line} ({me}) imports {target}")
    assert not upward, "\n".join(upward)


def test_no_private_names_across_modules():
    reach_ins = []
    for path, parts in modules():
        for target, names, line in imported(path, parts):
            if target != top(parts):
                reach_ins += [f"{path.relative_to(REPO)}:{line} imports {target}.{n}" for n in names
                              if n.startswith("_")]
    assert not reach_ins, "\n".join(reach_ins)


def test_command_line_code_lives_in_cli():
    offenders = []
    for path, parts in modules():
        if top(parts) in ("cli", "__main__"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports argparse")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} prints")
    assert not offenders, "\n".join(offenders)
