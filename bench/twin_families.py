"""Twin-Merging and the tensor-wise methods on model families their defaults were not chosen on.

The quality suite's rows use byte-level GPT-2s on prose, Python code and Unicode names, and timm ResNets on eight
transforms of digit images. This builds a second family of each:
- text: byte-level Llamas (rotary positions, grouped-query attention, gated MLP), a base trained on two domains
  and four experts fine-tuned on C++ headers, package descriptions (Markdown / reStructuredText), CSV tables and
  JSON documents (all text that ships with the installed packages);
- vision: timm ViTs on 4x4 patches (another model type, optimiser and seed), a base on clean digits and a few of
  each domain, and six experts on transforms the first family does not have (mirrored, low contrast, shifted,
  edges, zoomed out, salt-and-pepper).
Then `merge run` on a twin recipe at the README's defaults, with each domain's validation split as router data,
scored on one shuffled test set that mixes every domain (each row routed on its own): the normalised score
(text: the fraction of the base-to-expert loss gap closed; vision: accuracy over the expert's), routed and with
the true task given, the router's accuracy on that mix, and the storage the factors take. Task arithmetic and
full rank are the reference rows. `--methods` adds every tensor-wise method at the suite's defaults (its
experiment 1), `--scaling` the vision methods against the number of experts and the width (its experiment 2).

    python bench/twin_families.py [--modality text|vision] [--family first|second] [--workdir DIR]
                                  [--methods] [--scaling] [--set rank=0.2 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "quality"))
sys.path.insert(1, str(ROOT / "bench"))

import data  # noqa: E402
import models  # noqa: E402
import suite  # noqa: E402
import twin_rows  # noqa: E402

SECOND = ("cpp", "markdown", "csv", "json")
FIRST = tuple(data.TEXT_DOMAINS)
PRETRAIN = ("markdown", "cpp")  # the base's domains; the experts still move far from it on each
BASE_STEPS, EXPERT_STEPS = 600, 200
SECOND_VISION = tuple(data.SECOND_IMAGE_DOMAINS)
FIRST_VISION = tuple(d for d in data.IMAGE_DOMAINS if d != data.HOME_DOMAIN)
VISION_BASE_EPOCHS, VISION_EXPERT_EPOCHS = 40, 8
EXPERT_COUNTS, WIDTHS, WIDTH_EXPERTS = (2, 4, 6), (0.5, 1.0, 2.0), 4


def first_family(work: Path) -> dict[str, Path]:
    """The quality suite's text models (GPT-2, prose / code / Unicode names), built as the full suite builds them."""
    return suite.text_models(suite.Workspace(work, suite.Plan.full()))


def second_family(work: Path) -> dict[str, Path]:
    """Base and experts, trained once and cached in `work`."""
    train = {d: data.text_domain(d, "train") for d in SECOND}

    def base_model() -> torch.nn.Module:
        return models.train_text(models.new_llama_text_model(seed=5), [train[d] for d in PRETRAIN],
                                 steps=BASE_STEPS, lr=3e-3, seed=5)

    paths = {"base": suite.trained(work / "base", base_model, models.save_text, print)}
    for index, d in enumerate(SECOND):
        def expert(d=d, index=index) -> torch.nn.Module:
            return models.train_text(models.load_text(paths["base"]).train(), [train[d]], steps=EXPERT_STEPS,
                                     lr=1e-3, seed=20 + index)
        paths[d] = suite.trained(work / f"expert_{d}", expert, models.save_text, print)
    return paths


def first_vision_family(work: Path, width: float = 1.0) -> dict[str, Path]:
    """The quality suite's vision models (test_resnet, eight digit transforms), built as the full suite builds them."""
    return suite.vision_models(suite.Workspace(work, suite.Plan.full()), width)


def second_vision_family(work: Path, width: float = 1.0) -> dict[str, Path]:
    """A ViT base on clean digits and 2 % of each domain, an expert fine-tuned on each domain; cached in `work`."""
    root = work / f"vit_w{width}"
    train = {d: data.image_domain(d, "train") for d in SECOND_VISION}
    save = lambda m, p: models.save_vision(m, p, args=models.second_vision_args(width))  # noqa: E731

    def base_model() -> torch.nn.Module:
        home = data.image_domain(data.HOME_DOMAIN, "train")
        mix = data.concat([home] + [data.subsample(train[d], 0.02, seed=i) for i, d in enumerate(SECOND_VISION)])
        return models.train_vision_adamw(models.new_second_vision_model(width, seed=3), mix,
                                         epochs=VISION_BASE_EPOCHS, lr=2e-3, seed=3)

    paths = {"base": suite.trained(root / "base", base_model, save, print)}
    for index, d in enumerate(SECOND_VISION):
        def expert(d=d, index=index) -> torch.nn.Module:
            return models.train_vision_adamw(models.load_vision(paths["base"]).train(), train[d],
                                             epochs=VISION_EXPERT_EPOCHS, lr=5e-4, seed=30 + index)
        paths[d] = suite.trained(root / f"expert_{d}", expert, save, print)
    return paths


FAMILIES = {  # (modality, family) -> (domains, models, task)
    ("text", "first"): (FIRST, first_family, suite.text_task),
    ("text", "second"): (SECOND, second_family, suite.text_task),
    ("vision", "first"): (FIRST_VISION, first_vision_family, suite.vision_task),
    ("vision", "second"): (SECOND_VISION, second_vision_family, suite.vision_task),
}


def router_files(work: Path, task: suite.Task, domains: tuple[str, ...], windows: int) -> dict[str, Path]:
    """Each domain's validation split as the router's data: its images, or context-length byte windows."""
    files = {}
    for index, d in enumerate(domains):
        path = work / ("router_data" if not task.higher_is_better else "router_data_vision") / f"{d}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            if task.higher_is_better:
                inputs = data.image_domain(d, "val").images
            else:
                tokens = data.text_domain(d, "val")
                gen = torch.Generator().manual_seed(100 + index)
                starts = torch.randint(0, len(tokens) - models.CONTEXT, (windows,), generator=gen)
                inputs = torch.stack([tokens[s: s + models.CONTEXT] for s in starts.tolist()])
            save_file({"inputs": inputs.contiguous()}, str(path))
        files[d] = path
    return files


def twin_recipe(path: Path, paths: dict[str, Path], files: dict[str, Path], params: dict) -> Path:
    lines = ["merge_method: twin", f"base_model: {paths['base']}", "models:"]
    for d in files:
        lines += [f"  - model: {paths[d]}", f"    task: {d}", f"    data: {{path: {files[d]}}}"]
    if params:
        lines.append(f"parameters: {json.dumps(params)}")
    path.write_text("\n".join(lines + ["dtype: float32"]) + "\n")
    return path


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def scaling(work: Path, family: str, build) -> None:
    """The suite's experiment 2 on this family: each scaling method at its defaults against the number of experts
    (width 1) and against the width (the first WIDTH_EXPERTS experts); normalised test accuracy."""
    domains = FAMILIES[("vision", family)][0]

    def point(paths: dict[str, Path], chosen: tuple[str, ...], where: str) -> None:
        task = suite.vision_task(chosen)
        base = task.score(paths["base"], "test")
        own = {d: task.score(paths[d], "test")[d] for d in chosen}
        cells = [f"base {suite.mean(suite.normalised(task, base, base, own)):6.1%}"]
        for method in suite.SCALING_METHODS:
            recipe = suite.write_recipe(work / "scale.yaml", method, paths["base"] if method != "linear" else None,
                                        [paths[d] for d in chosen], suite.DEFAULTS[method])
            suite.merge_run(recipe, work / "scale")
            cells.append(f"{method} {suite.mean(suite.normalised(task, task.score(work / 'scale', 'test'), base, own)):6.1%}")
            shutil.rmtree(work / "scale")
        print(f"  {where}: " + ", ".join(cells), flush=True)

    at_one = build(work, 1.0)
    for count in EXPERT_COUNTS:
        point(at_one, domains[:count], f"{count} experts, width 1.0")
    for width in WIDTHS:
        point(build(work, width) if width != 1.0 else at_one, domains[:WIDTH_EXPERTS],
              f"{WIDTH_EXPERTS} experts, width {width}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", choices=("text", "vision"), default="text")
    parser.add_argument("--family", choices=("first", "second"), default="second",
                        help="second (default): the models built here; first: the quality suite's")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a twin parameter for the default row (to compare settings)")
    parser.add_argument("--router-windows", type=int, default=1024, help="validation windows per text domain")
    parser.add_argument("--methods", action="store_true",
                        help="also every tensor-wise method at the quality suite's defaults (its experiment 1)")
    parser.add_argument("--scaling", action="store_true",
                        help="vision: also the methods against the number of experts and the width (experiment 2)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="twin_families_"))
    work.mkdir(parents=True, exist_ok=True)
    domains, build, make_task = FAMILIES[(args.modality, args.family)]
    paths = build(work)
    task = make_task(domains)
    base = task.score(paths["base"], "test")
    own = {d: task.score(paths[d], "test")[d] for d in domains}
    unit = "accuracy" if task.higher_is_better else "loss (nats/byte)"
    print(f"test {unit}, base / own expert: " + ", ".join(f"{d} {base[d]:.3f} / {own[d]:.3f}" for d in domains))
    measure = "normalised" if task.higher_is_better else "gap closed"

    def closed(scores: dict[str, float]) -> float:
        return suite.mean(suite.normalised(task, scores, base, own))

    print(f"  base: {measure} {closed(base):6.1%}")
    settings = [("task_arithmetic", {"lambda": lam}) for lam in (0.3, 0.5, 1.0)]
    if args.methods:  # the quality suite's experiment-1 rows: every tensor-wise method at its papers' defaults
        settings += [(method, setting) for method, setting in suite.DEFAULTS.items() if method != "task_arithmetic"]
    for method, setting in settings:
        recipe = suite.write_recipe(work / "tw.yaml", method, paths["base"] if method != "linear" else None,
                                    [paths[d] for d in domains], setting)
        suite.merge_run(recipe, work / "tw")
        print(f"  {method} {json.dumps(setting)}: {measure} {closed(task.score(work / 'tw', 'test')):6.1%}", flush=True)
        shutil.rmtree(work / "tw")
    if args.scaling:
        if args.modality != "vision":
            parser.error("--scaling is a vision experiment")
        scaling(work, args.family, build)
    files = router_files(work, task, domains, args.router_windows)
    chosen = {key: _value(value) for key, value in (item.split("=", 1) for item in args.set)}
    rows = [("defaults" + (f" {chosen}" if chosen else ""), chosen), ("full rank", {**chosen, "rank": 1.0})]
    batch = 256 if task.higher_is_better else 32
    for label, params in rows:
        out = work / "twin"
        started = time.perf_counter()
        suite.merge_run(twin_recipe(work / "twin.yaml", paths, files, params), out)
        seconds = time.perf_counter() - started
        report = json.loads((out / "merge_report.json").read_text())
        routed = twin_rows.evaluate(task, out, domains, None, batch)
        true_task = twin_rows.evaluate(task, out, domains, "oracle", batch)
        storage = report["twin"]["storage"]["ratio"]
        print(f"  twin, {label}: routed {closed(routed['scores']):6.1%}, true task {closed(true_task['scores']):6.1%}, "
              f"router on the test mix {routed['router_test_accuracy']:6.1%} (validation "
              f"{report['twin']['router']['accuracy_val']:.1%}, sites {report['twin']['router'].get('feature')}), "
              f"storage {storage:6.1%}, {seconds:.1f} s, inference {routed['overhead']['ratio']:.2f}x the shared model",
              flush=True)
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
