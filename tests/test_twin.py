"""Twin-Merging end to end: the recipe, the directory it writes, the routed runtime and the static collapse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergekit_lite.cli import app
from mergekit_lite.dispatch import merge_recipe_file
from mergekit_lite.errors import UserError
from mergekit_lite.examples import make_family
from mergekit_lite.models.loading import load_model
from mergekit_lite.pipeline import MergeOptions
from mergekit_lite.report import ENVELOPE_KEYS
from mergekit_lite.twin import TwinModel, collapse
from mergekit_lite.twin.build import PAIR_PREFERENCE
from mergekit_lite.twin.router import route_weights

runner = CliRunner()
TEXT = {"prose": "The river ran slowly past the old mill, and the evening light lay on the water. " * 60,
        "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, 2))\n" * 60}


def _data(root: Path, family: str) -> list[dict]:
    """Two tasks whose inputs differ plainly: prose vs code text, bright vs dark images, low vs high token ids."""
    if family == "test_resnet":
        gen = torch.Generator().manual_seed(0)
        images = {"bright": torch.rand(48, 3, 32, 32, generator=gen) + 1.0,
                  "dark": -torch.rand(48, 3, 32, 32, generator=gen) - 1.0}
        for task, tensor in images.items():
            save_file({"x": tensor}, str(root / f"{task}.safetensors"))
        return [{"task": t, "data": {"path": str(root / f"{t}.safetensors"), "key": "x"}} for t in images]
    if family == "bert":  # no tokenizer saved: token ids from a tensor file
        ids = {"low": torch.randint(0, 100, (48, 24)), "high": torch.randint(150, 256, (48, 24))}
        for task, tensor in ids.items():
            np.save(root / f"{task}.npy", tensor.numpy())
        return [{"task": t, "data": {"path": str(root / f"{t}.npy")}} for t in ids]
    for task, text in TEXT.items():
        (root / f"{task}.txt").write_text(text, encoding="utf-8")
    return [{"task": t, "data": {"path": str(root / f"{t}.txt"), "length": 24}} for t in TEXT]


def _recipe(root: Path, paths: dict, tasks: list[dict], parameters: dict, extra: str = "") -> Path:
    lines = ["merge_method: twin", f"base_model: {paths['base']}", "models:"]
    for index, task in enumerate(tasks):
        lines += [f"  - model: {paths[f'expert{index + 1}']}", f"    task: {task['task']}",
                  f"    data: {json.dumps(task['data'])}"]
    lines += ["parameters:"] + [f"  {k}: {v}" for k, v in parameters.items()]
    path = root / f"twin_{abs(hash((str(parameters), extra))) % 10**8}.yaml"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def _outputs(result) -> torch.Tensor:
    return result if isinstance(result, torch.Tensor) else result.logits


def _inputs(family: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    if family == "test_resnet":
        return torch.randn(6, 3, 32, 32, generator=gen)
    return torch.randint(0, 256, (6, 12), generator=gen)


FAMILIES = ["gpt2", "llama", "bert", "test_resnet"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_twin(request, tmp_path_factory):
    """A base, two experts (base + noise), and a full-rank twin directory built from them."""
    family = request.param
    root = tmp_path_factory.mktemp(f"twin_{family}")
    paths = make_family(root / "models", family, experts=2, scale=0.2)
    tasks = _data(root, family)
    recipe = _recipe(root, paths, tasks, {"rank": 1.0, "factor_dtype": "float32", "router_samples": 40,
                                          "router_epochs": 30})
    report = merge_recipe_file(recipe, root / "twin", MergeOptions())
    return family, root, paths, tasks, report


@pytest.mark.parametrize("budget", ["default", 0])
def test_full_rank_routing_to_a_task_gives_that_expert_back(family_twin, budget):
    """Per-task weights kept in the linear layers (the default budget holds all of these small models') or
    factors alone (budget 0): the same experts back."""
    family, root, paths, tasks, report = family_twin
    twin = TwinModel.load(root / "twin") if budget == "default" else TwinModel.load(root / "twin", task_weight_budget=budget)
    assert (twin.kept_task_weights["layers"] > 0) == (budget == "default")
    with pytest.raises(UserError, match="task_weight_budget"):
        TwinModel.load(root / "twin", task_weight_budget=-1)
    assert twin.unrouted == []  # every tensor with a delta is applied inside a routed layer
    x = _inputs(family)
    experts = [load_model(paths[f"expert{i}"], transformers_ok=True) for i in (1, 2)]
    with torch.no_grad():
        wanted = [_outputs(expert(x)) for expert in experts]
        for index, task in enumerate(tasks):
            got = _outputs(twin(x, weights={task["task"]: 1.0}))
            torch.testing.assert_close(got, wanted[index], rtol=1e-4, atol=1e-4)
        rows = torch.tensor([0, 1, 1, 0, 1, 0])
        routed = twin(x, weights=torch.nn.functional.one_hot(rows, 2).float())
        got = _outputs(routed)
        for row, task in enumerate(rows.tolist()):  # every row of one batch routed to its own expert
            torch.testing.assert_close(got[row], wanted[task][row], rtol=1e-4, atol=1e-4)
        cache = getattr(routed, "past_key_values", None)
        if cache is not None:  # rows run grouped by task inside; the key/value cache comes back in the caller's order
            caches = [expert(x).past_key_values for expert in experts]
            for row, task in enumerate(rows.tolist()):
                torch.testing.assert_close(cache.layers[0].keys[row], caches[task].layers[0].keys[row],
                                           rtol=1e-4, atol=1e-4)
    assert all(max(t.get("residual_energy", [0.0])) < 1e-4 for t in report["twin"]["tensors"])  # float32 SVD


def test_the_router_learns_which_task_an_input_is_from(family_twin):
    family, root, paths, tasks, report = family_twin
    router = report["twin"]["router"]
    assert router["accuracy_val"] == 1.0 and router["samples_val"] > 0
    twin = TwinModel.load(root / "twin")
    torch.manual_seed(0)  # the probe must not depend on which tests ran before in this process
    if family == "test_resnet":
        probe = torch.cat([torch.rand(3, 3, 32, 32) + 1.0, -torch.rand(3, 3, 32, 32) - 1.0])
    elif family == "bert":
        probe = torch.cat([torch.randint(0, 100, (3, 24)), torch.randint(150, 256, (3, 24))])
    else:
        tokens = {t: torch.tensor(list(text.encode()))[:24 * 40].view(40, 24) for t, text in TEXT.items()}
        probe = torch.cat([tokens["prose"][-3:], tokens["code"][-3:]])
    weights = twin.route(probe)
    assert weights.argmax(-1).tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(weights.sum(-1), torch.ones(6))


@pytest.fixture(scope="module")
def gpt2_twin(tmp_path_factory):
    """A twin directory at the default storage budget (truncated SVDs in bfloat16), router site chosen by the
    held-out split, top-1 routing."""
    root = tmp_path_factory.mktemp("twin_default")
    paths = make_family(root / "models", "gpt2", experts=2, scale=0.2)
    tasks = _data(root, "gpt2")
    recipe = _recipe(root, paths, tasks, {"router_samples": 40, "router_epochs": 30})
    result = runner.invoke(app, ["run", str(recipe), str(root / "twin"), "--quiet"])
    assert result.exit_code == 0, result.output
    return root, paths, json.loads((root / "twin" / "merge_report.json").read_text())


def test_factored_runtime_equals_the_dense_rebuild_row_by_row(gpt2_twin):
    root, _, _ = gpt2_twin
    twin = TwinModel.load(root / "twin")
    x = _inputs("gpt2")[:3]
    route = torch.tensor([[0.7, 0.3], [0.0, 1.0], [0.25, 0.75]])
    with torch.no_grad():
        routed = _outputs(twin(x, weights=route))
        for row in range(3):
            dense_dir = root / f"dense_{row}"
            collapse(root / "twin", dict(zip(twin.tasks, route[row].tolist())), dense_dir, force=True)
            dense = load_model(dense_dir, transformers_ok=True)
            torch.testing.assert_close(routed[row], _outputs(dense(x[row: row + 1]))[0], rtol=1e-4, atol=1e-4)


def test_collapse_command_equals_the_runtime_for_fixed_weights(gpt2_twin):
    import transformers

    root, _, _ = gpt2_twin
    out = root / "collapsed"
    result = runner.invoke(app, ["twin-collapse", str(root / "twin"), "--weights", "prose=0.6,code=0.4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # a normal checkpoint, tokenizer included
    assert (out / "tokenizer_config.json").is_file()
    twin = TwinModel.load(root / "twin")
    x = _inputs("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, twin(x, weights={"prose": 0.6, "code": 0.4}).logits,
                                   rtol=1e-4, atol=1e-4)
    assert json.loads((out / "twin_collapse.json").read_text())["weights"] == {"prose": 0.6, "code": 0.4}
    card = (out / "README.md").read_text()  # a model card naming the twin recipe's inputs, as every output has
    assert "base_model:" in card.split("---")[1] and "- mergekit" in card and "prose 0.6, code 0.4" in card


@pytest.mark.parametrize("weights, message", [("prose=1,poetry=1", "unknown task"), ("prose", "task=weight"),
                                              ("", "at least one task")])
def test_collapse_refuses_bad_weights(gpt2_twin, tmp_path, weights, message):
    root, _, _ = gpt2_twin
    result = runner.invoke(app, ["twin-collapse", str(root / "twin"), "--weights", weights, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "o").exists()


def test_the_directory_and_report_describe_what_was_stored(gpt2_twin):
    import transformers

    root, _, report = gpt2_twin
    twin_dir = root / "twin"
    for name in ("twin.json", "router.safetensors", "experts/model.safetensors", "shared/config.json", "README.md"):
        assert (twin_dir / name).is_file(), name
    assert tuple(report)[: len(ENVELOPE_KEYS)] == ENVELOPE_KEYS  # the envelope every pipeline writes
    assert report["kind_schema"] == "mergekit_lite.report.twin/1"
    assert (twin_dir / "mergekit_config.yml").read_text() == (twin_dir / "merge_recipe.yaml").read_text()
    assert "base_model:" in (twin_dir / "README.md").read_text().split("---")[1]
    files = {f["name"]: f for f in report["output"]["files"]}
    assert {"router.safetensors", "experts/model.safetensors"} <= set(files)
    assert all(len(f["sha256"]) == 64 and f["bytes"] == (twin_dir / n).stat().st_size for n, f in files.items())
    transformers.AutoModelForCausalLM.from_pretrained(twin_dir / "shared")  # the shared expert is a normal checkpoint
    twin = report["twin"]
    assert twin["storage_budget"] == 0.2 and twin["shared_merge"]["method"] == "task_arithmetic"
    assert twin["shared_merge"]["parameters"] == {"lambda": 0.3}
    storage = twin["storage"]
    stored = sum(f.stat().st_size for f in (twin_dir / "experts").glob("*.safetensors"))
    assert storage["stored_bytes"] <= stored and 0.15 < storage["ratio"] <= 0.2
    assert storage["factor_dtype"] == "bfloat16" and storage["rank_ratio"] == twin["rank"] < 1.0
    factored = [t for t in twin["tensors"] if t["kind"] == "factors"]
    assert factored and all(0.0 < e < 1.0 for t in factored for e in t["residual_energy"])
    assert all(t["rank"] == max(1, round(twin["rank"] * min(t["shape"][0], math.prod(t["shape"][1:]))))
               for t in factored)
    with safe_open(str(twin_dir / "experts" / "model.safetensors"), "pt") as experts:
        dtypes = {name: experts.get_slice(name).get_dtype() for name in experts.keys()}
    assert {d for n, d in dtypes.items() if n.endswith((".left", ".right"))} == {"BF16"}
    assert {d for n, d in dtypes.items() if n.endswith(".delta")} == {"F32"}  # 1-D deltas keep the model's dtype
    router = twin["router"]
    assert 0.0 <= router["accuracy_val"] <= 1.0 and router["top_k"] == 1
    blocks = [f"transformer.h.{i}" for i in range(2)]  # the first half of the test GPT-2's blocks
    searched = list(router["feature_search"])
    assert searched[:3] == ["stem", *blocks[:1], "final"] and searched[3].startswith("stem+")  # + the stem's pair
    # the stem-and-block pair is kept unless a single site beats it on the held-out split by over a point
    bonus = {site: acc + (PAIR_PREFERENCE if "+" in site else 0.0) for site, acc in router["feature_search"].items()}
    chosen = max(bonus, key=lambda site: (bonus[site], -site.count("+")))
    assert router["feature"] == (chosen if "+" not in chosen else chosen.split("+"))
    assert router["accuracy_val"] == router["feature_search"][chosen]
    shown = runner.invoke(app, ["report", str(twin_dir)])
    assert shown.exit_code == 0 and "router" in shown.output


def test_routers_on_two_sites_average_their_probabilities(gpt2_twin, tmp_path):
    """A directory whose manifest names two router sites loads both and routes on their mean probability."""
    import shutil

    from safetensors.torch import save_file

    from mergekit_lite.twin.router import Router, SiteRouters, pooled_features

    root, _, _ = gpt2_twin
    copy = tmp_path / "twin"
    shutil.copytree(root / "twin", copy)
    manifest = json.loads((copy / "twin.json").read_text())
    sites = ["stem", "transformer.h.0"]
    torch.manual_seed(0)
    routers = [Router(96, 2), Router(96, 2)]
    for router in routers:  # away from the initialisation, so the two disagree
        router.net[-1].weight.data.normal_()
    save_file({k: v.contiguous() for k, v in SiteRouters(sites, routers).state_dict().items()}, str(copy / "router.safetensors"))
    manifest["router"].update(feature=sites, features=[96, 96], top_k=0)
    (copy / "twin.json").write_text(json.dumps(manifest))
    twin = TwinModel.load(copy)
    x = _inputs("gpt2")[:4]
    with torch.no_grad():
        shared = load_model(copy / "shared", transformers_ok=True).eval()
        wanted = sum(r.eval()(pooled_features(shared, s, x, sequence_max=True)).softmax(-1) for s, r in zip(sites, routers)) / 2
        torch.testing.assert_close(twin.route(x), wanted, rtol=1e-5, atol=1e-6)
    manifest["router"].update(features=[96])  # a list that does not match the sites
    (copy / "twin.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="router settings are malformed"):
        TwinModel.load(copy)


def test_top_k_keeps_the_largest_weights_renormalised():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 2.5, 0.0]])
    top2 = route_weights(logits, 2)
    assert (top2 > 0).sum(-1).tolist() == [2, 2]
    assert torch.allclose(top2.sum(-1), torch.ones(2))
    assert top2[1, 1] > top2[1, 2] > 0 and top2[0, 0] > top2[0, 1] > 0
    torch.testing.assert_close(route_weights(logits, 0), logits.softmax(-1))


def _bad(tmp_path, gpt2_twin, text: str) -> tuple[int, str]:
    root, paths, _ = gpt2_twin
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text.format(base=paths["base"], a=paths["expert1"], b=paths["expert2"], data=root / "prose.txt"))
    result = runner.invoke(app, ["run", str(recipe), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    return result.exit_code, result.output


TWO = """merge_method: {method}
base_model: {{base}}
models:
  - model: {{a}}
    task: {task_a}
    {data_a}
  - model: {{b}}
    task: b
    data: {{{{path: {{data}}}}}}
"""


@pytest.mark.parametrize("text, message", [
    (TWO.format(method="twin", task_a="a", data_a=""), "twin needs data"),
    (TWO.format(method="twin", task_a="b", data_a="data: {{path: {data}}}"), "task names must differ"),
    (TWO.format(method="twin", task_a="a b", data_a="data: {{path: {data}}}"), "must be letters"),
    (TWO.format(method="twin", task_a="a", data_a="data: {{path: {data}}}") + "shared_merge: {{merge_method: pleas}}",
     "not tensor-wise"),
    (TWO.format(method="twin", task_a="a", data_a="data: {{path: {data}}}")
     + "shared_merge: {{merge_method: task_arithmetic, parameters: {{wombat: 0.5}}}}", "shared_merge (task_arithmetic)"),
    (TWO.format(method="ties", task_a="a", data_a="data: {{path: {data}}}"), "only twin recipes"),
    (TWO.format(method="twin", task_a="a", data_a="data: {{path: /nonexistent/a.txt}}"), "task a: data /nonexistent/a.txt not found"),
])
def test_bad_twin_recipes_are_refused_and_leave_nothing(tmp_path, gpt2_twin, text, message):
    code, output = _bad(tmp_path, gpt2_twin, text)
    assert code == 2 and message in output, output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_twin_built_and_run_on_cuda_matches_the_cpu_one(tmp_path):
    paths = make_family(tmp_path / "models", "gpt2", experts=2, scale=0.2)
    recipe = _recipe(tmp_path, paths, _data(tmp_path, "gpt2"), {"router_samples": 40, "router_epochs": 30})
    report = merge_recipe_file(recipe, tmp_path / "cuda", MergeOptions(device="cuda"))
    assert report["device"].startswith("cuda")
    merge_recipe_file(recipe, tmp_path / "cpu", MergeOptions(device="cpu"))
    on_gpu, on_cpu = TwinModel.load(tmp_path / "cuda", device="cuda"), TwinModel.load(tmp_path / "cpu")
    x = _inputs("gpt2")
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [0.2, 0.8], [1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(x.cuda(), weights=weights.cuda()).logits.cpu(), on_cpu(x, weights=weights).logits,
                                   rtol=2e-3, atol=2e-3)
        assert on_gpu.route(x.cuda()).argmax(-1).device.type == "cuda"
