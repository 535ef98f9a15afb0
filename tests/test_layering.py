"""The package's layers, checked from its imports (docs/architecture.md, "Layers").

A module may import modules of its own layer and of the layers below it, never above; only
``audit.pipeline`` imports Ray. Imports inside functions count too (a cycle hidden in a
function-level import is still a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "audit"

# Lowest first. A module belongs to the most specific entry naming it (a module or a package).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("audit", "audit.errors", "audit.ids", "audit.files", "audit.layout", "audit.schema",
                    "audit.progress", "audit.redact", "audit.provenance", "audit.similarity", "audit.batching",
                    "audit.step", "audit.weight_files")),
    ("config and locations", ("audit.config", "audit.config_sections", "audit.remote", "audit.location")),
    ("run storage", ("audit.store", "audit.run_mirror", "audit.shard_writer", "audit.lease")),
    ("models and inputs", ("audit.testbed", "audit.testbed.architectures", "audit.testbed.families",
                           "audit.testbed.tokenizer", "audit.testbed.t5_tokenizer",
                           "audit.testbed.checkpoints", "audit.testbed.dataset", "audit.testbed.descriptor",
                           "audit.testbed.train", "audit.testbed.lora", "audit.prompts", "audit.plan")),
    ("stage: embed", ("audit.embed",)),
    ("stage: generate", ("audit.generate",)),
    ("stage: screen", ("audit.screen",)),
    ("stage: reference", ("audit.reference",)),
    ("stage: detect", ("audit.detect",)),
    ("stage: serve", ("audit.serve",)),
    ("runs, readers and tools", ("audit.runs", "audit.report", "audit.reconcile", "audit.reconcile_plan", "audit.watch_state",
                                 "audit.testbed.evaluate", "audit.testbed.card", "audit.testbed.package",
                                 "audit.testbed.lora_package")),
    ("ray wiring", ("audit.pipeline",)),
    ("entry points", ("audit.cli", "audit.cli_reference", "audit.cli_report", "audit.cli_serve", "audit.cli_watch",
                      "audit.watch")),
]
RAY_LAYER = "ray wiring"


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific entry that is ``module`` or a package above it."""
    best, best_len = -1, -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = i, len(name)
    if best < 0:
        raise AssertionError(f"{module}: not in any layer; add it to LAYERS here and in docs/architecture.md")
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source``, at any depth; ``from audit import x`` names
    the submodule ``audit.x`` when x is one."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module.startswith("audit"):
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                          if _is_module(f"{node.module}.{alias.name}")]
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(module: str, source: str) -> list[str]:
    """What ``module`` (with this source) imports against the layering."""
    here = layer_of(module)
    found = []
    for line, imported in imports_of(source):
        if imported == "ray" or imported.startswith("ray."):
            if LAYERS[here][0] != RAY_LAYER:
                found.append(f"{module}:{line} imports {imported}; only audit.pipeline may import Ray")
        elif imported.startswith("audit") and _is_module(imported) and layer_of(imported) > here:
            found.append(f"{module}:{line} ({LAYERS[here][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]}), "
                         "a layer above it")
    return found


def test_no_module_imports_a_layer_above_it_and_only_the_pipeline_imports_ray() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        problems += violations(module_name(path), path.read_text())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("module", "source"), [
    ("audit.remote", "def f():\n    from audit.store import RunStore\n"),  # the old remote <-> store cycle
    ("audit.remote", "from audit.testbed.checkpoints import testbed_folder\n"),  # remote -> testbed
    ("audit.reference.locate", "from audit.pipeline.reference import embed_reference\n"),  # reference -> pipeline
    ("audit.embed.models", "from audit.generate.loading import resolve_model\n"),  # embed -> generate
    ("audit.prompts", "from audit.reference.dups import write_dups\n"),  # prompts -> reference
    ("audit.report.build", "import ray\n"),  # Ray outside the pipeline
])
def test_each_former_back_edge_would_be_caught(module: str, source: str) -> None:
    assert violations(module, source)


def test_imports_in_the_own_layer_and_below_pass() -> None:
    assert not violations("audit.detect.detect_step", "from audit.reference.index import load_manifest\nimport numpy\n")
    assert not violations("audit.pipeline.pool", "import ray\nfrom audit.step import StepReport\n")
