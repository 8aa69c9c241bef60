"""The import graph runs one way (docs/development.md): every module sits in a layer and imports only
from layers below it, function-level (lazy) imports included. A new module must be placed here;
an import that points up, or a cycle, fails."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "parityrl"

# layer -> modules (dotted, below `parityrl.`; "" is the package itself), lowest first
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves: no parityrl imports", (
        "", "parity", "train", "errors", "progress", "metric_registry", "metrics", "batch", "decoding",
        "engines.vllm_worker", "engines.orphan_guard", "engines.vllm_host", "engines.vllm_compat", "parity.matrix",
    )),
    ("rewards", ("rewards",)),
    ("environments", ("environments", "environments.addition", "environments.calculator")),
    ("config schema", ("config.schema",)),
    ("config loading and reference", ("config.loading", "config.reference")),
    ("config", ("config",)),
    ("definitions: tasks and prompts, processed logprobs, hardware", (
        "tasks", "policy", "hardware", "rundir", "reward_pool", "train.objectives", "parity.compare_stats",
    )),
    ("computations on them", (
        "preflight", "scoring", "evaluate", "episodes", "pretrained", "train.checkpoint", "train.fsdp", "parity.compare", "parity.ablate", "plot",
    )),
    ("resources: memory estimate, assets, the engine protocol", ("memory", "assets", "engines.base", "parity.lint")),
    ("engines and the trainer", ("engines.reference", "engines.supervisor", "engines.vllm", "train.trainer")),
    ("the V0 engine (vLLM V1's engine with what V0 changes)", ("engines.vllm_v0",)),
    ("compositions: engine choice, trainer ranks, rollouts", ("engines", "train.distributed", "rollouts")),
    ("engine replicas (made by the engine choice) and the parity check", ("engines.ray_replicas", "parity.check")),
    ("the cluster", ("cluster",)),
    ("where engine and trainer run (local or Ray)", ("backend",)),
    ("the loop", ("pipeline",)),
    ("the CLI", ("cli",)),
]
LAYER_OF = {f"parityrl.{name}".rstrip("."): index for index, (_, names) in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    dotted = path.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", ".")
    return dotted.removesuffix(".__init__")


def parityrl_imports(path: Path, modules: set[str]) -> set[str]:
    """parityrl modules `path` imports anywhere in it (module level, in functions, under TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("parityrl"):
            for alias in node.names:  # `from parityrl.engines import vllm` imports the submodule
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("parityrl"))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: parityrl_imports(path, set(paths)) - {name} for name, path in paths.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} (layer {LAYER_OF[module]}) imports {target} (layer {LAYER_OF[target]})"
        for module, targets in sorted(graph.items()) for target in sorted(targets)
        if target in LAYER_OF and module in LAYER_OF and LAYER_OF[target] >= LAYER_OF[module]
    ]


def test_every_module_has_a_layer():
    unplaced = sorted(set(import_graph()) - set(LAYER_OF))
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"
    assert not sorted(set(LAYER_OF) - set(import_graph())), "LAYERS names modules that no longer exist"


def test_imports_point_down_only():
    assert upward_imports(import_graph()) == []


def test_an_upward_import_is_caught(tmp_path):
    """The check itself: the trainer importing the pipeline (a lazy import inside a function) fails it."""
    graph = import_graph()
    graph["parityrl.train.trainer"] = graph["parityrl.train.trainer"] | {"parityrl.pipeline"}
    trainer, pipeline = LAYER_OF["parityrl.train.trainer"], LAYER_OF["parityrl.pipeline"]
    assert upward_imports(graph) == [f"parityrl.train.trainer (layer {trainer}) imports parityrl.pipeline (layer {pipeline})"]
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from parityrl.pipeline import run_training\n")
    assert parityrl_imports(lazy, set(graph)) == {"parityrl.pipeline"}


def test_readme_is_short_and_its_links_resolve():
    """README: ~150 lines a newcomer reads (details live in docs/), every local link and image exists,
    and every figure says which command made it."""
    import re

    root = PACKAGE.parents[1]
    readme = (root / "README.md").read_text()
    assert len(readme.splitlines()) <= 170
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    missing = [t for t in targets if "://" not in t and not (root / t).exists()]
    assert targets and not missing, missing
    for match in re.finditer(r"!\[[^\]]*\]\(([^)]+)\)", readme):  # a figure, then its caption naming the command
        caption = readme[match.end() : match.end() + 800]
        assert "`parityrl " in caption, f"figure {match.group(1)} has no command that made it"
