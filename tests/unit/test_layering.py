"""The dependency arrows docs/architecture.md draws, checked on every import in megaopsd/.

Each package (or top-level module) of megaopsd sits in a layer; an import may point to its own
layer's units or to a lower layer, never up. Imports inside functions count too: a lazy import
defers loading a heavy library, it does not make an upward arrow acceptable.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megaopsd"

# Lowest first. Keep in step with "Packages and dependencies" in docs/architecture.md.
LAYERS: list[set[str]] = [
    {"stages", "progress"},  # leaf helpers: pipeline-stage arithmetic, progress bars
    {"config"},  # schema, loading, validation, the HF config parser
    {"runtime"},  # launch environment, process groups, CPU emulation, RNG, signals
    {"models", "loss"},  # Megatron GPTModel chunks; vocab-parallel divergences
    {"convert"},  # HF <-> Megatron mapping, streaming import/export
    {"data"},  # datasets, prompt templates, the prompt stream
    {"rollout"},  # vLLM engines, fleet, weight sync, reason-first rationales
    {"eval"},  # grading, metrics over samples, evaluators
    {"algorithm"},  # paired batches, forward/train step, teachers, the methods
    {"checkpoint", "flops", "metrics", "dry_run"},
    {"checkpoint_manager", "components"},
    {"trainer"},
    {"train"},  # the Hydra entry point
]


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "megaopsd"


def _edges() -> list[tuple[str, str, str]]:
    """(from unit, to unit, where) for every import of a megaopsd module by another unit."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        source = _unit(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("megaopsd.") and _unit(target) != source:
                    edges.append((source, _unit(target), f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"))
    return edges


def _layer_of() -> dict[str, int]:
    return {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def test_every_unit_has_a_layer():
    units = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    units |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert units == set(_layer_of()), units ^ set(_layer_of())


def test_no_import_points_up():
    layer = _layer_of()
    upward = [f"{a} -> {b} ({where})" for a, b, where in _edges() if layer[b] > layer[a]]
    assert upward == [], "\n".join(upward)


def test_no_import_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for a, b, _ in _edges():
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            unit = todo.pop()
            if unit == goal:
                return True
            if unit not in seen:
                seen.add(unit)
                todo.extend(graph.get(unit, ()))
        return False

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert cycles == [], cycles


def test_the_layering_test_sees_an_upward_import(tmp_path, monkeypatch):
    """Positive control: an import of the trainer from the loss package is reported."""
    fake = tmp_path / "megaopsd"
    for path in PACKAGE.rglob("*.py"):
        target = fake / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (fake / "loss" / "bad.py").write_text("from megaopsd.trainer import Trainer\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    layer = _layer_of()
    assert any(a == "loss" and b == "trainer" and layer[b] > layer[a] for a, b, _ in _edges())
