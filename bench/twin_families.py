"""Twin-Merging on a model family its defaults were not chosen on.

The quality suite's Twin rows use byte-level GPT-2s on prose, Python code and Unicode names. This builds another
family: byte-level Llamas (rotary positions, grouped-query attention, gated MLP), a base trained on two domains
and four experts fine-tuned on C++ headers, package descriptions (Markdown / reStructuredText), CSV tables and
JSON documents (all text that ships with the installed packages). Then `merge run` on a twin recipe at the
README's defaults, with each domain's validation windows as router data, scored on one shuffled test set that
mixes every domain (each row routed on its own): the fraction of the base-to-expert loss gap closed, routed and
with the true task given, the router's accuracy on that mix, and the storage the factors take. Task arithmetic
and full rank are the reference rows.

    python bench/twin_families.py [--family first] [--workdir DIR] [--methods] [--set rank=0.2 ...]
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


def first_family(work: Path) -> dict[str, Path]:
    """The quality suite's text models (GPT-2, prose / code / Unicode names), built as the full suite builds them."""
    return suite.text_models(suite.Workspace(work, suite.Plan.full()))


def second_family(work: Path) -> dict[str, Path]:
    """Base and experts, trained once and cached in `work`."""
    train = {d: data.text_domain(d, "train") for d in SECOND}

    def base_model() -> torch.nn.Module:
        return models.train_text(models.new_llama_text_model(seed=5), [train[d] for d in PRETRAIN],
                                 steps=BASE_STEPS, lr=3e-3, seed=5)

    paths = {"base": suite._trained(work / "base", base_model, models.save_text, print)}
    for index, d in enumerate(SECOND):
        def expert(d=d, index=index) -> torch.nn.Module:
            return models.train_text(models.load_text(paths["base"]).train(), [train[d]], steps=EXPERT_STEPS,
                                     lr=1e-3, seed=20 + index)
        paths[d] = suite._trained(work / f"expert_{d}", expert, models.save_text, print)
    return paths


def router_files(work: Path, domains: tuple[str, ...], windows: int) -> dict[str, Path]:
    """Each domain's validation split as context-length byte windows (the router's data)."""
    files = {}
    for index, d in enumerate(domains):
        path = work / "router_data" / f"{d}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tokens = data.text_domain(d, "val")
            gen = torch.Generator().manual_seed(100 + index)
            starts = torch.randint(0, len(tokens) - models.CONTEXT, (windows,), generator=gen)
            save_file({"inputs": torch.stack([tokens[s: s + models.CONTEXT] for s in starts.tolist()])}, str(path))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("first", "second"), default="second",
                        help="second (default): the Llamas built here; first: the quality suite's GPT-2s")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a twin parameter for the default row (to compare settings)")
    parser.add_argument("--router-windows", type=int, default=1024, help="validation windows per domain")
    parser.add_argument("--methods", action="store_true",
                        help="also every tensor-wise method at the quality suite's defaults (its experiment 1)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="twin_second_family_"))
    work.mkdir(parents=True, exist_ok=True)
    domains = SECOND if args.family == "second" else FIRST
    paths = (second_family if args.family == "second" else first_family)(work)
    task = suite.text_task(domains)
    base = task.score(paths["base"], "test")
    own = {d: task.score(paths[d], "test")[d] for d in domains}
    print("test loss (nats/byte), base / own expert: " + ", ".join(f"{d} {base[d]:.3f} / {own[d]:.3f}" for d in domains))

    def closed(scores: dict[str, float]) -> float:
        return suite._mean(suite.normalised(task, scores, base, own))

    settings = [("task_arithmetic", {"lambda": lam}) for lam in (0.3, 0.5, 1.0)]
    if args.methods:  # the quality suite's experiment-1 rows: every tensor-wise method at its papers' defaults
        settings += [(method, setting) for method, setting in suite.DEFAULTS.items() if method != "task_arithmetic"]
    for method, setting in settings:
        recipe = suite.write_recipe(work / "tw.yaml", method, paths["base"], [paths[d] for d in domains], setting)
        suite.merge_run(recipe, work / "tw")
        print(f"  {method} {json.dumps(setting)}: gap closed {closed(task.score(work / 'tw', 'test')):6.1%}", flush=True)
        shutil.rmtree(work / "tw")
    files = router_files(work, domains, args.router_windows)
    chosen = {key: _value(value) for key, value in (item.split("=", 1) for item in args.set)}
    rows = [("defaults" + (f" {chosen}" if chosen else ""), chosen), ("full rank", {**chosen, "rank": 1.0})]
    for label, params in rows:
        out = work / "twin"
        started = time.perf_counter()
        suite.merge_run(twin_recipe(work / "twin.yaml", paths, files, params), out)
        seconds = time.perf_counter() - started
        report = json.loads((out / "merge_report.json").read_text())
        routed = twin_rows.evaluate(task, out, domains, None, 32)
        true_task = twin_rows.evaluate(task, out, domains, "oracle", 32)
        storage = report["twin"]["storage"]["ratio"]
        print(f"  twin, {label}: routed {closed(routed['scores']):6.1%}, true task {closed(true_task['scores']):6.1%}, "
              f"router on the test mix {routed['router_test_accuracy']:6.1%} (validation "
              f"{report['twin']['router']['accuracy_val']:.1%}), storage {storage:6.1%}, {seconds:.1f} s, "
              f"inference {routed['overhead']['ratio']:.2f}x the shared model")
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
