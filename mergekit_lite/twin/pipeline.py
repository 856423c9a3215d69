"""Twin-Merging as a Pipeline: its recipe parameters and checks, `merge validate` (the shared merge's plan and
every task's data), `merge run`, what its report section says, and what `merge inspect` shows of a Twin
directory. Building is in `build.py`, the runtime in `runtime.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_lite.params import ParamSpec, recipe_params
from mergekit_lite.pipeline import DirectorySummary, MergeOptions, MethodFacts, Progress, Validation
from mergekit_lite.recipe import Recipe
from mergekit_lite.tensorwise import plan_text, validate_tensorwise
from mergekit_lite.twin.build import check_data_paths, check_twin_recipe, run_recipe, shared_recipe
from mergekit_lite.twin.store import EXPERTS, MANIFEST, SHARED, read_manifest
from mergekit_lite.units import human_bytes

PARAMS = (
    ParamSpec("storage", float, 0.2, "bytes the exclusive knowledge may take, as a share of the dense deltas "
              "(in the checkpoint's dtype): every matrix gets the largest rank ratio that fits", scope="global",
              minimum=0.0, exclusive_minimum=True),
    ParamSpec("factor_dtype", str, "bfloat16", "dtype the factors are stored in (1-D deltas keep the "
              "checkpoint's); 16 bits cost nothing measurable on a delta and halve a float32 model's factors",
              scope="global", choices=("bfloat16", "float16", "float32")),
    ParamSpec("rank", float, None, "the rank ratio itself instead of the storage budget (auto: from storage): a ratio of "
              "min(m, n) when at most 1 (1.0 keeps full rank), else a fixed rank", scope="global", minimum=0.0,
              exclusive_minimum=True),
    ParamSpec("router_samples", int, 1024, "inputs per task for the router (a fifth held out for validation)",
              scope="global", minimum=2),
    ParamSpec("router_epochs", int, 60, "router training epochs", scope="global", minimum=1),
    ParamSpec("router_feature", str, "auto", "what the router reads: auto (the stem's router averaged with the best "
              "block's, unless one site among stem, the first half of a transformer's blocks and final is over a "
              "point better on held-out inputs), stem (pooled output of the first layer, almost free at "
              "inference), final (pooled last hidden state, one extra forward pass), or a module name",
              scope="global"),
    ParamSpec("router_top_k", int, 1, "tasks mixed per input (the largest router weights, renormalised); 0 mixes "
              "all tasks by the softmax", scope="global", minimum=0),
    ParamSpec("batch_size", int, 64, "inputs per forward pass when computing router features", scope="global",
              minimum=1),
)


def sites_text(feature: Any) -> str:
    """The router's feature site, or its sites joined ('stem + model.layers.0')."""
    return " + ".join(map(str, feature)) if isinstance(feature, list) else str(feature)


def rank_text(twin: dict[str, Any]) -> str:
    """'rank 0.1', and the storage budget that chose it when one did."""
    rank, budget = twin.get("rank"), twin.get("storage_budget")
    text = f"rank {rank:.3g}" if isinstance(rank, (int, float)) else "rank unknown"
    return text + (f" (the most that fits {budget:.0%} storage)" if isinstance(budget, (int, float)) else "")


SUMMARY = ("shared expert (a tensor-wise merge) + each task's exclusive knowledge as low-rank factors + a router "
           "that mixes them per input; writes a Twin-Merging directory")


@dataclass(frozen=True)
class TwinPipeline(MethodFacts):
    """A shared expert, each task's exclusive knowledge as low-rank factors, and a router."""

    def check(self, recipe: Recipe, source: str, lines: dict[tuple, int]) -> None:
        check_twin_recipe(recipe, source, lines, self)

    def validate(self, recipe: Recipe, allow_pickle: bool = False) -> Validation:
        """The shared expert's tensor-wise plan from headers, and every task's data file."""
        check_data_paths(recipe)
        inner = shared_recipe(recipe)
        plan = validate_tensorwise(inner, allow_pickle)
        return Validation([f"twin (shared expert by {inner.merge_method}) over {plan_text(plan)}"], list(plan.warnings))

    def run(self, recipe: Recipe, recipe_text: str, out: Path, options: MergeOptions,
            progress: Progress) -> dict[str, Any]:
        return run_recipe(recipe, recipe_text, out, recipe_params(recipe, self, None, "", None, 0), options, progress)

    def describe(self, report: dict[str, Any]) -> list[str]:
        twin = report["twin"]
        return [f"twin   tasks {', '.join(twin['tasks'])}; {rank_text(twin)}; factors "
                f"{human_bytes(twin['storage']['stored_bytes'])} = {twin['storage']['ratio']:.1%} of dense deltas; "
                f"router ({sites_text(twin['router']['feature'])}) validation accuracy {twin['router']['accuracy_val']:.1%}"]

    def summarise_directory(self, path: Path) -> DirectorySummary | None:
        """A Twin directory: its tasks, ranks and router, and its shared expert as the checkpoint to show."""
        if not (path.is_dir() and (path / MANIFEST).is_file()):
            return None
        manifest = read_manifest(path)
        kinds = [entry["kind"] for entry in manifest["tensors"].values()]
        facts = {"tasks": manifest["tasks"], "rank": manifest["rank"], "storage_budget": manifest.get("storage_budget"),
                 "router": manifest["router"], "factored_tensors": kinds.count("factors"),
                 "dense_tensors": kinds.count("dense"),
                 "experts_bytes": sum(f.stat().st_size for f in (path / EXPERTS).glob("*.safetensors"))}
        line = (f"Twin-Merging directory: tasks {', '.join(facts['tasks'])}; {rank_text(facts)}; "
                f"{facts['factored_tensors']} tensors as factors, {facts['dense_tensors']} dense; router reads "
                f"{sites_text(facts['router']['feature'])}, mixes top {facts['router']['top_k'] or 'all'}; exclusive "
                f"knowledge {human_bytes(facts['experts_bytes'])}. The shared expert:")
        return DirectorySummary(key="twin", facts=facts, line=line, checkpoint=path / SHARED)


PIPELINE = TwinPipeline("twin", SUMMARY, PARAMS, needs_base=True, min_models=2, streams_tensors=False)
