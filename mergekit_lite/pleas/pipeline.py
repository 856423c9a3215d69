"""PLeaS as a Pipeline: its recipe parameters, `merge validate`'s model check, `merge run`, and what its report
section says. The algorithm is in `method.py`; loading, data and writing in `run.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_lite.params import ParamSpec, check_parameters, recipe_params
from mergekit_lite.pipeline import DirectorySummary, MergeOptions, MethodFacts, Progress, Validation
from mergekit_lite.pleas.run import check_models, run_recipe
from mergekit_lite.recipe import Recipe

PARAMS = (
    ParamSpec("target_width", float, 1.0, "compute of the merged model relative to one source model",
              scope="global", minimum=1.0, maximum=2.0),
    ParamSpec("samples", int, None, "inputs used for matching, least squares and tuning (auto: 1000 with task "
              "data, 256 data-free, where each input is refined at the cost of passes through both models)",
              scope="global", minimum=1),
    ParamSpec("batch_size", int, 100, "inputs per forward pass", scope="global", minimum=1),
    ParamSpec("ridge", float, 1e-2, "least-squares ridge, relative to the mean Gram diagonal", scope="global",
              minimum=0.0),
    ParamSpec("norm_statistics", str, "reestimate", "batch-norm statistics: re-estimated on the data, or merged",
              scope="global", choices=("reestimate", "merge")),
    ParamSpec("least_squares", bool, True, "false: permutation-only merge (matched weights averaged)",
              scope="global"),
    ParamSpec("label_spaces", str, "shared", "separate: the two heads predict different classes; the merged head "
              "predicts over their union (heads of different sizes always are)", scope="global",
              choices=("shared", "separate")),
    ParamSpec("data_free", bool, False, "no task data: generic inputs, or data.path from another domain",
              scope="global"),
    ParamSpec("data_free_steps", int, 200, "data-free images (generic or data.path) are refined for this "
              "many Adam steps so both models' batch-norm layers see their stored statistics (more steps: better "
              "merges, each step a forward and backward pass of both models; 0 keeps the inputs as they are)",
              scope="global", minimum=0),
    ParamSpec("tune_steps", int, None, "Adam steps tuning the whole merged model toward the two models' "
              "combined outputs on the same inputs, no labels; needs about 4x the model's memory "
              "(auto: 300 when data_free, else 0)",
              scope="global", minimum=0),
    ParamSpec("tune_lr", float, 3e-4, "Adam step size of that tuning", scope="global", minimum=0.0,
              exclusive_minimum=True),
)


SUMMARY = ("two models from any initialisation: match units on data, partial merge to a target width, "
           "least squares per layer (timm models, Llama-style decoders, plain MLPs)")


@dataclass(frozen=True)
class PleasPipeline(MethodFacts):
    """Two models from any initialisation, matched on data and merged to a target width."""

    def check(self, recipe: Recipe, source: str, lines: dict[tuple, int]) -> None:
        check_parameters(recipe, source, lines, self)

    def validate(self, recipe: Recipe, allow_pickle: bool = False) -> Validation:
        """Both models build, have the same permutation groups, and permuting every group at random leaves the
        first model's outputs unchanged."""
        found = check_models(recipe, allow_pickle=allow_pickle)
        heads = f", {found['heads']} attention-head blocks" if found.get("heads") else ""
        return Validation([
            f"pleas over {len(recipe.models)} models",
            f"both models build; {found['groups']} permutation groups ({found['units']} units{heads}) over "
            f"{found['layers']} layers; permuting them all changes the outputs by {found['self_check']:.1e} (relative)"])

    def run(self, recipe: Recipe, recipe_text: str, out: Path, options: MergeOptions,
            progress: Progress) -> dict[str, Any]:
        return run_recipe(recipe, recipe_text, out, recipe_params(recipe, self, None, "", None, 0), options, progress)

    def describe(self, report: dict[str, Any]) -> list[str]:
        pleas = report["pleas"]
        units = [g for g in pleas["groups"] if g.get("kind", "units") == "units"]
        heads = [g for g in pleas["groups"] if g.get("kind") == "heads"]
        widths = f"{sum(g['width'] for g in units)} -> {sum(g['merged_width'] for g in units)} units"
        if heads:
            widths += f", {sum(g['width'] for g in heads)} -> {sum(g['merged_width'] for g in heads)} heads"
        quality = sum(g["match_quality"] for g in pleas["groups"]) / max(len(pleas["groups"]), 1)
        lines = [f"pleas  compute {pleas['compute_ratio']:.3f}x (target {pleas['target_width']:g}), parameters "
                 f"{pleas['parameter_ratio']:.3f}x; {widths}; mean match quality {quality:.3f}"]
        if pleas.get("tuning"):
            tuning = pleas["tuning"]
            lines.append(f"tuned  {tuning['steps']} steps toward the combined outputs: relative output gap "
                         f"{tuning['output_gap_before']:.4f} -> {tuning['output_gap_after']:.4f} "
                         f"({tuning['seconds']:.1f} s)")
        return lines

    def summarise_directory(self, path: Path) -> DirectorySummary | None:
        return None


PIPELINE = PleasPipeline("pleas", SUMMARY, PARAMS, needs_base=False, min_models=2, max_models=2,
                         streams_tensors=False, runs_on_ray=False)
