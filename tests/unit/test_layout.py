"""The layout's rules, enforced: imports go one way (models below the simulator and the worker,
those below the CLI and the tooling), and the product stays apart from its tooling."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

# The worker's side of stream/: the simulator may share the wire format, the config and the
# metrics with it, never its processing.
WORKER_MODULES = (
    "stream.worker",
    "stream.processor",
    "stream.engine",
    "stream.model_process",
    "stream.state",
    "stream.rhythm_stage",
    "stream.checkpoint",
    "stream.publishing",
    "stream.takeover",
    "stream.health",
    "stream.intake",
    "stream.retry",
    "stream.model_api",
)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def product_sources() -> list[Path]:
    """The product: models, simulator and stream without its tooling and the CLI above it."""
    stream = [
        p
        for p in sources("stream")
        if "tooling" not in p.relative_to(ROOT).parts and p.name != "cli.py"
    ]
    return sources("models") + sources("simulator") + stream


def offending(paths: list[Path], forbidden: tuple[str, ...], root: Path = ROOT) -> dict:
    """{file: [forbidden modules it imports]}."""
    found = {}
    for path in paths:
        bad = sorted(
            name
            for name in imported_modules(path)
            if any(name == f or name.startswith(f + ".") for f in forbidden)
        )
        if bad:
            found[str(path.relative_to(root))] = bad
    return found


def test_the_product_never_imports_the_tooling():
    assert len(product_sources()) > 20, "the product's sources were not found"
    assert offending(product_sources(), ("stream.tooling", "stream.cli")) == {}


def test_the_simulator_never_imports_the_worker():
    assert offending(sources("simulator"), WORKER_MODULES) == {}


def test_models_know_nothing_of_kafka_or_the_stream():
    assert offending(sources("models"), ("stream", "simulator", "kafka")) == {}


def test_a_broken_rule_is_named_even_inside_a_function(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from stream.tooling.demo import run_demo\n")
    assert offending([probe], ("stream.tooling",), root=tmp_path) == {
        "probe.py": ["stream.tooling.demo", "stream.tooling.demo.run_demo"]
    }


def test_no_class_in_the_product_is_longer_than_200_lines():
    long = {}
    for path in product_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= 200:
                long[f"{path.relative_to(ROOT)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}
