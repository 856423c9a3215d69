"""`merge run` for a twin recipe: shared expert (streamed tensor-wise merge), exclusive knowledge as low-rank
factors, a router trained on the tasks' inputs, then a manifest and report; published atomically."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors.torch import save_file

from mergekit_lite.checkpoint import CheckpointWriter
from mergekit_lite.checkpoint.files import replace_file
from mergekit_lite.checkpoint.reader import run_fingerprint
from mergekit_lite.device import resolve_device
from mergekit_lite.errors import RecipeError
from mergekit_lite.methods import METHODS
from mergekit_lite.models.data import data_batches
from mergekit_lite.models.loading import load_model, read_config
from mergekit_lite.params import Parameterised, check_parameters
from mergekit_lite.pipeline import MergeOptions, Progress, SilentProgress
from mergekit_lite.recipe import ModelEntry, Recipe, SharedMerge, location
from mergekit_lite.report import (REPORT_NAME, envelope, model_card, output_files, report_bytes, write_description,
                                  write_report)
from mergekit_lite.tensorwise import merge_tensorwise
from mergekit_lite.twin.factoring import compress
from mergekit_lite.twin.router import (AUTO, FINAL, STEM, RouterTraining, SiteRouters, candidate_sites,
                                       pooled_features_at, split_indices, train_router)
from mergekit_lite.twin.store import (EXPERTS, FORMAT, MANIFEST, ROUTER, SHARED, TASK_NAME)

FACTOR_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def task_names(recipe: Recipe) -> list[str]:
    return [entry.task or Path(entry.model).name for entry in recipe.models]


def shared_recipe(recipe: Recipe) -> Recipe:
    """The tensor-wise recipe that makes the shared expert: same base and models (and the hub snapshots they
    resolved to), the shared method."""
    shared = recipe.shared_merge or SharedMerge()
    inner = Recipe(merge_method=shared.merge_method, base_model=recipe.base_model,
                   models=[ModelEntry(model=m.model, parameters=m.parameters) for m in recipe.models],
                   parameters=shared.parameters, dtype=recipe.dtype, out_dtype=recipe.out_dtype,
                   tokenizer_source=recipe.tokenizer_source, seed=recipe.seed, shard_size=recipe.shard_size,
                   device=recipe.device, chat_template=recipe.chat_template)
    inner.hub_sources.extend(recipe.hub_sources)
    return inner


def check_twin_recipe(recipe: Recipe, source: str, lines: dict, twin: Parameterised) -> None:
    """The recipe-wide parameters against `twin`'s specs; tasks named and unique, data for each, base given, and
    a valid tensor-wise shared merge."""
    where = lambda loc: location(source, lines, loc)  # noqa: E731
    check_parameters(recipe, source, lines, twin, per_model=False)
    if recipe.base_model is None:
        raise RecipeError(f"{source}: twin needs base_model (exclusive knowledge is measured against the shared expert "
                          "built from it)")
    names = task_names(recipe)
    for index, (entry, name) in enumerate(zip(recipe.models, names)):
        if not TASK_NAME.match(name):
            raise RecipeError(f"{where(('models', index, 'task'))}: models[{index}].task: {name!r} must be letters, "
                              "digits, _ or -")
        if entry.data is None or (entry.data.path is None and entry.data.kind != "generic"):
            raise RecipeError(f"{where(('models', index))}: models[{index}]: twin needs data: with this task's inputs "
                              "(the router learns from them)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecipeError(f"{where(('models',))}: task names must differ; {', '.join(duplicates)} repeats")
    shared = recipe.shared_merge or SharedMerge()
    if shared.merge_method not in METHODS:
        raise RecipeError(f"{where(('shared_merge', 'merge_method'))}: shared_merge: {shared.merge_method!r} is not "
                          f"tensor-wise; the shared expert is merged by one of {', '.join(sorted(METHODS))}")
    method = METHODS[shared.merge_method]
    shared_lines = {key: value for key, value in lines.items() if key[:1] == ("models",)}
    shared_lines.update({key[1:]: value for key, value in lines.items() if key[:1] == ("shared_merge",)})
    inner = shared_recipe(recipe)
    try:
        check_parameters(inner, source, shared_lines, method)
    except RecipeError as exc:
        raise RecipeError(f"shared_merge ({method.name}): {exc}") from None
    # what the shared merge ignores is dropped from the recipe too, and said
    for entry, checked in zip(recipe.models, inner.models):
        entry.parameters = checked.parameters
    if recipe.shared_merge is not None:
        recipe.shared_merge.parameters = inner.parameters
    recipe.warnings.extend(f"shared_merge ({method.name}): {w}" for w in inner.warnings)


def check_data_paths(recipe: Recipe) -> None:
    for task, entry in zip(task_names(recipe), recipe.models):
        if entry.data is not None and entry.data.path is not None and not Path(entry.data.path).exists():
            raise RecipeError(f"task {task}: data {entry.data.path} not found")


def _router_inputs(recipe: Recipe, tasks: list[str], params: dict, seed: int, allow_pickle: bool,
                   log) -> list[tuple[list[torch.Tensor], str]]:
    """Every task's router inputs, read and checked (kind, shape, range, a forward pass) on the base model before
    any merging: a bad data file is refused in a second, not after the shared merge and the compression. The
    shared model has the base's architecture and preprocessing, so the same inputs serve it."""
    base_dir = Path(recipe.base_model)
    model = load_model(base_dir, allow_pickle=allow_pickle, transformers_ok=True)
    config = read_config(base_dir)
    found = []
    for index, (task, entry) in enumerate(zip(tasks, recipe.models)):
        batches, text = data_batches(entry.data.model_dump(), model, config, int(params["router_samples"]),
                                     int(params["batch_size"]), seed + index, False,
                                     model_dir=base_dir if base_dir.is_dir() else base_dir.parent,
                                     allow_pickle=allow_pickle)
        found.append((batches, text))
        log(f"router data for {task}: {text}")
    return found


def _train(directory: Path, inputs: list[tuple[list[torch.Tensor], str]], tasks: list[str], params: dict, seed: int,
           device: torch.device, progress, log) -> tuple[torch.nn.Module, dict]:
    """Pooled shared-model features of every task's inputs -> a router trained on task identity. With
    router_feature auto, one router per candidate site and the best on the held-out split is kept."""
    model = load_model(directory / SHARED, transformers_ok=True).to(device)
    wanted = str(params["router_feature"])
    sites = candidate_sites(model) if wanted == AUTO else [wanted]
    features: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    labels, described = [], []
    total = sum(len(batches) for batches, _ in inputs)
    log(f"router: {total} batches of {len(tasks)} tasks' inputs through the shared model, then "
        f"{len(sites)} router(s) of {int(params['router_epochs'])} epochs ({', '.join(sites)})")
    progress.start(total, 0, "router features (batches)")
    for index, (task, (batches, text)) in enumerate(zip(tasks, inputs)):
        for batch in batches:
            pooled = pooled_features_at(model, sites, batch.to(device), sequence_max=True)
            for site in sites:
                features[site].append(pooled[site])
            labels.append(torch.full((len(batch),), index, dtype=torch.long))
            progress.advance(0)
        described.append({"task": task, "source": text, "samples": sum(len(b) for b in batches)})
    progress.stop()
    labels_all = torch.cat(labels).to(device)
    pooled = {site: torch.cat(features[site]) for site in sites}
    trained = {site: train_router(pooled[site], labels_all, len(tasks), epochs=int(params["router_epochs"]), seed=seed)
               for site in sites}
    choices = [(site,) for site in sites]
    deeper = [site for site in sites if site not in (STEM, FINAL)]  # blocks: routing stops there, final costs a pass
    if wanted == AUTO and STEM in sites and deeper:  # the stem with the best block, probabilities averaged
        choices.append((STEM, max(deeper, key=lambda site: (trained[site][1].accuracy_val, -sites.index(site)))))
    scored = {choice: _choice_training(choice, trained, pooled, labels_all, len(tasks), seed) for choice in choices}
    best = max(choices, key=lambda c: (scored[c].accuracy_val + (PAIR_PREFERENCE if len(c) > 1 else 0.0),
                                       -len(c), -choices.index(c)))
    router = SiteRouters(list(best), [trained[site][0] for site in best])
    training = scored[best]
    single = len(best) == 1
    info = {"feature": best[0] if single else list(best),
            "features": int(pooled[best[0]].shape[1]) if single else [int(pooled[site].shape[1]) for site in best],
            "sequence_max": True,
            "top_k": int(params["router_top_k"]), "dropout": 0.1, "epochs": int(params["router_epochs"]),
            "accuracy_train": training.accuracy_train, "accuracy_val": training.accuracy_val,
            "accuracy_val_per_task": dict(zip(tasks, training.per_task_val)),
            "samples_train": training.samples_train, "samples_val": training.samples_val, "data": described}
    if len(choices) > 1:
        info["feature_search"] = {"+".join(choice): scored[choice].accuracy_val for choice in choices}
    return (router.routers[0] if single else router), info


# The averaged pair is kept unless a single site beats it on the held-out split by more than this: the split is
# drawn from the same text as the training split, so it ranks sites within about a point of each other no better
# than chance, while the pair was right more often on both text families' test sets (bench/RESULTS.md).
PAIR_PREFERENCE = 0.01


@torch.no_grad()
def _choice_training(choice: tuple[str, ...], trained: dict, pooled: dict[str, torch.Tensor], labels: torch.Tensor,
                     tasks: int, seed: int) -> RouterTraining:
    """A site's own training figures, or those of several sites' routers averaged (on the same split)."""
    if len(choice) == 1:
        return trained[choice[0]][1]
    train, val = split_indices(labels.cpu(), 0.2, seed)
    ensemble = SiteRouters(list(choice), [trained[site][0] for site in choice])
    correct = ensemble({site: pooled[site] for site in choice}).argmax(-1).cpu() == labels.cpu()
    per_task = [float(correct[val][labels.cpu()[val] == t].float().mean()) if bool((labels.cpu()[val] == t).any())
                else float("nan") for t in range(tasks)]
    return RouterTraining(float(correct[train].float().mean()), float(correct[val].float().mean()) if len(val)
                          else float("nan"), per_task, len(train), len(val))


def run_recipe(recipe: Recipe, recipe_text: str, out: Path, params: dict[str, Any], options: MergeOptions,
               progress: Progress | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Shared merge, compression, router; each stage of an interrupted run is kept for --resume."""
    progress = progress or SilentProgress()
    log = log if log is not None else getattr(progress, "note", lambda message: None)
    started = time.perf_counter()
    tasks = task_names(recipe)
    check_data_paths(recipe)
    seed = options.seed if options.seed is not None else (recipe.seed if recipe.seed is not None else 0)
    device = resolve_device(options.device if options.device != "auto" or recipe.device is None else recipe.device)
    rank = None if params["rank"] is None else float(params["rank"])
    storage_share = float(params["storage"])
    factor_dtype = FACTOR_DTYPES[str(params["factor_dtype"])]
    fingerprint = run_fingerprint(recipe.model_dump(mode="json"), f"{seed}|{options.shard_size}",
                                  [recipe.base_model] + [entry.model for entry in recipe.models], options.allow_pickle)
    router_inputs = _router_inputs(recipe, tasks, params, seed, options.allow_pickle, log)
    with CheckpointWriter(out, [], force=options.force, resume=options.resume, fingerprint=fingerprint) as staging:
        directory = staging.tmp_dir
        stages = _read_stages(directory) if staging.resumed else {}
        inner = shared_recipe(recipe)
        shared_report = stages.get("shared")
        if shared_report is None:
            shared_text = yaml.safe_dump(inner.model_dump(mode="json", exclude_none=True), sort_keys=False)
            shared_report = merge_tensorwise(
                inner, shared_text, directory / SHARED,
                MergeOptions(device=str(device), seed=seed, shard_size=options.shard_size,
                             shard_parameters=options.shard_parameters, allow_pickle=options.allow_pickle,
                             resume=staging.resumed, force=staging.resumed, copy_tokenizer=options.copy_tokenizer,
                             allow_crimes=options.allow_crimes, ray=options.ray),
                progress)
            stages["shared"] = {"timings_seconds": shared_report["timings_seconds"], "tensors": len(shared_report["tensors"]),
                                "ray_nodes": shared_report.get("ray", {}).get("nodes", [])}
            _write_stages(directory, stages)
        merged_at = time.perf_counter()
        if "compress" not in stages:
            layout, stats, storage, nodes = compress(
                directory, recipe, tasks, rank, storage_share, factor_dtype, seed,
                device, progress, options.allow_pickle, staging.resumed, fingerprint, log, ray_address=options.ray)
            stages["compress"] = {"layout": layout, "stats": stats, "storage": storage, "ray_nodes": nodes}
            _write_stages(directory, stages)
        layout, stats, storage = (stages["compress"][key] for key in ("layout", "stats", "storage"))
        ray_nodes = stages["shared"].get("ray_nodes", []) + stages["compress"].get("ray_nodes", [])
        compressed_at = time.perf_counter()
        router, router_info = _train(directory, router_inputs, tasks, params, seed, device, progress, log)
        save_file({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}, str(directory / ROUTER))
        trained_at = time.perf_counter()
        (directory / STAGES).unlink()
        manifest = {"format": FORMAT, "tasks": tasks, "shared": SHARED, "experts": EXPERTS, "rank": storage["rank_ratio"],
                    "storage_budget": None if rank is not None else storage_share,
                    "router": {k: router_info[k] for k in ("feature", "features", "sequence_max", "top_k", "dropout")},
                    "tensors": layout}
        staging.add_file(MANIFEST, json.dumps(manifest, indent=2) + "\n")
        write_description(staging, recipe_text, _card(recipe, tasks, storage, router_info, recipe_text)
                          if options.write_model_card else None)
        shared_digests = {f"{SHARED}/{f['name']}": f["sha256"] for f in shared_report.get("output", {}).get("files", [])}
        names = sorted(str(f.relative_to(directory)) for f in directory.rglob("*.safetensors"))
        report = envelope(
            kind="twin", method="twin", recipe=recipe.as_written(), seed=seed, device=device,
            inputs=[{"role": "base", "path": recipe.base_model}] + [
                {"role": "model", "task": t, "path": m.model} for t, m in zip(tasks, recipe.models)],
            output_path=out, files=output_files(directory, names, shared_digests.get),
            tensors=shared_report["tensors"] if isinstance(shared_report["tensors"], int) else len(shared_report["tensors"]),
            timings={"shared_merge": merged_at - started, "compress": compressed_at - merged_at,
                     "router": trained_at - compressed_at, "total": time.perf_counter() - started},
            warnings=list(recipe.warnings) + _warnings(router_info),
            sections={"twin": {"tasks": tasks, "rank": storage["rank_ratio"],
                               "storage_budget": None if rank is not None else storage_share,
                               "storage": storage, "router": router_info,
                               "shared_merge": {"method": inner.merge_method,
                                                "parameters": inner.model_dump(mode="json")["parameters"],
                                                "seconds": shared_report["timings_seconds"]["total"]},
                               "tensors": stats},
                      **({"ray": {"tasks": len(ray_nodes), "nodes": sorted(set(ray_nodes))}} if ray_nodes else {})},
            hub_sources=recipe.hub_sources)
        if staging.resumed:
            report["warnings"].append("resumed: stages and tensors of an interrupted run were kept (checksums verified)")
        if options.report_path is None:
            staging.add_file(REPORT_NAME, report_bytes(report).decode())
    if options.report_path is not None:
        write_report(options.report_path, report)
    return report


STAGES = ".twin_stages.json"  # in the partial directory: what an interrupted run finished


def _read_stages(directory: Path) -> dict[str, Any]:
    try:
        stages = json.loads((directory / STAGES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stages if isinstance(stages, dict) else {}


def _write_stages(directory: Path, stages: dict[str, Any]) -> None:
    replace_file(directory / STAGES, json.dumps(stages).encode())


def _warnings(router_info: dict) -> list[str]:
    weak = [task for task, acc in router_info["accuracy_val_per_task"].items() if acc == acc and acc < 0.8]
    if weak:
        return [f"the router recognises {', '.join(weak)} on fewer than 80 % of validation inputs; try "
                "router_feature: final or more router_samples"]
    return []


def _card(recipe: Recipe, tasks: list[str], storage: dict, router_info: dict, recipe_text: str) -> str:
    body = [f"Base model: `{recipe.base_model}`", "", "Tasks:", ""]
    body += [f"- `{task}`: `{entry.model}`" for task, entry in zip(tasks, recipe.models)]
    body += ["", f"Stored exclusive knowledge: {storage['stored_bytes']:,} bytes, {storage['ratio']:.1%} of the dense "
             f"deltas; router validation accuracy {router_info['accuracy_val']:.1%}.", "",
             "```python", "from mergekit_lite.twin import TwinModel", "twin = TwinModel.load(PATH)",
             "outputs = twin(inputs)  # every row routed on its own", "```", "",
             "A plain checkpoint for a fixed mix: `merge twin-collapse PATH --weights task=1.0 --out OUT`."]
    return model_card(title="Twin-Merging directory", tags=["twin-merging"], library=None,
                      intro="a shared expert (`shared/`, a normal checkpoint), each task's exclusive knowledge as "
                            "low-rank factors (`experts/`), and a router (`router.safetensors`).",
                      body=body, recipe_text=recipe_text,
                      base_models=[recipe.reference_of(m) for m in [recipe.base_model] + [e.model for e in recipe.models]])
