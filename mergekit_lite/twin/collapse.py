"""`merge twin-collapse`: one fixed task mix of a Twin-Merging directory folded into a plain checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergekit_lite.checkpoint import CheckpointWriter, TensorSpec, open_checkpoint
from mergekit_lite.checkpoint.files import read_limited, refuse_overlap, roots_of
from mergekit_lite.checkpoint.lock import output_lock
from mergekit_lite.checkpoint.writer import check_output_path
from mergekit_lite.errors import UserError
from mergekit_lite.layers import must_stay_positive
from mergekit_lite.recipe import MAX_RECIPE_BYTES, parse_recipe_text
from mergekit_lite.report import RECIPE_NAME, model_card
from mergekit_lite.twin.store import EXPERTS, SHARED, dense_name, left_name, read_manifest, right_name, task_weights


def collapse(directory: str | Path, weights: dict[str, float], out: str | Path, force: bool = False) -> dict:
    """A plain checkpoint for one fixed task mix: shared + sum_t w_t V_t, streamed tensor by tensor, in the shared
    checkpoint's layout (config and tokenizer copied), so it loads like the source models."""
    directory, out = Path(directory), Path(out)
    manifest = read_manifest(directory)
    vector = task_weights(manifest["tasks"], weights)
    check_output_path(out, force)
    refuse_overlap(out, [directory], "output")
    with output_lock(out):
        return _collapse(directory, manifest, weights, vector, out, force)


def _collapse(directory: Path, manifest: dict, weights: dict[str, float], vector: torch.Tensor, out: Path,
              force: bool) -> dict:
    shared = open_checkpoint(directory / SHARED)
    experts = open_checkpoint(directory / EXPERTS)
    kept: list[str] = []
    try:
        specs = [TensorSpec(name, info.dtype, tuple(info.shape)) for name, info in shared.tensors.items()]
        with CheckpointWriter(out, specs, force=force, metadata={"merged_with": "mergekit_lite twin-collapse"}) as writer:
            for name in shared.tensors:
                tensor = shared.get(name)
                entry = manifest["tensors"].get(name)
                if entry is not None:
                    mix = torch.zeros(tensor.shape, dtype=torch.float32)
                    for task, w in zip(manifest["tasks"], vector.tolist()):
                        if w == 0.0:
                            continue
                        if entry["kind"] == "dense":
                            mix += w * experts.get(dense_name(task, name)).float()
                        else:
                            left, right = experts.get(left_name(task, name)).float(), experts.get(right_name(task, name)).float()
                            mix += w * (left @ right).view(tensor.shape)
                    mixed = tensor.float() + mix
                    if must_stay_positive(name) and not bool((mixed > 0).all()):
                        kept.append(name)  # the shared expert's variances: the mix would make the model compute NaN
                    else:
                        tensor = mixed.to(tensor.dtype)
                writer.write(name, tensor)
            writer.copy_config(directory / SHARED)
            writer.copy_support_files(directory / SHARED)
            mix_record = {"twin": str(directory), "weights": {t: float(weights.get(t, 0.0)) for t in manifest["tasks"]}}
            writer.add_file("twin_collapse.json", json.dumps(mix_record, indent=2) + "\n")
            writer.add_file("README.md", _card(directory, mix_record["weights"]))
    finally:
        shared.close()
        experts.close()
    warnings = [f"{len(kept)} batch-norm variance tensor(s) would come out zero or negative under this mix and were "
                f"kept from the shared expert, e.g. {kept[0]!r}"] if kept else []
    return {"path": str(out), "tensors": len(specs), "weights": mix_record["weights"], "warnings": warnings}


def _card(directory: Path, weights: dict[str, float]) -> str:
    """The collapsed checkpoint's model card: the mix, and the twin recipe's inputs as `base_model` when the
    directory still holds its recipe."""
    try:  # a regular file inside the directory only (never a FIFO or a link out), and at most a recipe's size
        data = read_limited(directory / RECIPE_NAME, roots_of(directory), "recipe", MAX_RECIPE_BYTES)
        recipe_text = data.decode("utf-8")
        recipe, _ = parse_recipe_text(recipe_text, str(directory / RECIPE_NAME))
        models = ([recipe.base_model] if recipe.base_model else []) + [entry.model for entry in recipe.models]
    except (UserError, OSError, UnicodeDecodeError):
        recipe_text, models = "# the Twin-Merging directory's recipe was not found", []
    mix = ", ".join(f"{task} {weight:g}" for task, weight in weights.items())
    return model_card(title="Twin-Merging directory, one fixed task mix", tags=["twin-merging"], library=None,
                      intro=f"the shared expert of `{directory}` plus each task's exclusive knowledge at the weights "
                            f"{mix} (`merge twin-collapse`).", body=[], recipe_text=recipe_text, base_models=models)
