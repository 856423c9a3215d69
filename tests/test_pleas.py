"""PLeaS: permutation groups from the graph, the exactness anchors, target widths, and `merge run`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergekit_lite.cli import app
from mergekit_lite.pleas import PleasOptions, load_model, pleas_merge
from mergekit_lite.pleas.graph import check_groups, output_tensor, permutation_spec, permute_state
from mergekit_lite.pleas.method import reestimate_norm_statistics
from mergekit_lite.report import ENVELOPE_KEYS

runner = CliRunner()


def resnet(seed: int, name: str = "test_resnet") -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, in_chans=1, num_classes=10)
    with torch.no_grad():  # non-trivial batch-norm statistics
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 16, 16))
    return model.eval()


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 24), torch.nn.ReLU(),
                               torch.nn.Linear(24, 5)).eval()


def vit(seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=10, img_size=32).eval()


TOKENS, VOCAB = "tokens", 64


def llama(seed: int, tied: bool = True) -> torch.nn.Module:
    """A tiny Llama with grouped-query attention (4 query heads over 2 key/value heads) and rotary positions."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


FAMILIES = {
    "resnet (basic + bottleneck blocks)": (resnet, (1, 16, 16)),
    "mlp": (mlp, (12,)),
    "timm vit (heads, MLP units, residual stream)": (vit, (3, 32, 32)),
    "llama (heads with grouped-query attention, MLP units, residual stream, tied head)": (llama, TOKENS),
    "llama with its own head": (lambda seed: llama(seed, tied=False), TOKENS),
}


def _inputs(shape, size: int, gen: torch.Generator | None = None) -> torch.Tensor:
    if shape == TOKENS:
        return torch.randint(0, VOCAB, (size, 12), generator=gen)
    return torch.randn(size, *shape, generator=gen)


def _batches(shape, count=6, size=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [_inputs(shape, size, gen) for _ in range(count)]


def _run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return output_tensor(model(x))


def _permuted_copy(model: torch.nn.Module, build, seed: int = 3) -> torch.nn.Module:
    spec = permutation_spec(model)
    gen = torch.Generator().manual_seed(seed)
    order = [torch.randperm(g.width, generator=gen) for g in spec.groups]
    copy = build(0)
    copy.load_state_dict(permute_state(model.state_dict(), spec, order))
    return copy.eval()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_groups_of_timm_resnets_pass_the_random_permutation_check():
    import timm

    for name in ("test_resnet", "resnet18", "resnet50"):
        model = timm.create_model(name, num_classes=7).eval()
        spec = permutation_spec(model)
        assert len(spec.groups) >= 10
        # the stem's input and the classifier's output are frozen; everything between is permuted
        assert [l.input_group is None for l in spec.layers].count(True) == 1
        assert [l.output_group is None for l in spec.layers].count(True) == 1
        assert check_groups(model, spec, torch.randn(2, 3, 32, 32)) < 1e-4


def test_unknown_operations_freeze_their_axes_instead_of_breaking_them():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 8)
            self.b = torch.nn.Linear(8, 8)
            self.c = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = self.b(torch.relu(self.a(x)))
            return self.c(h.reshape(h.shape[0], 2, 4)[:, 0])  # a reshape the analysis does not follow

    model = Odd().eval()
    spec = permutation_spec(model)
    assert [g.width for g in spec.groups] == [8]  # only a's outputs / b's inputs may move
    check_groups(model, spec, torch.randn(5, 6))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merging_a_model_with_its_permuted_copy_gives_the_model_back(family):
    build, shape = FAMILIES[family]
    model = build(0)
    permuted = _permuted_copy(model, build)
    x = _inputs(shape, 20)
    with torch.no_grad():
        assert _relative(_run(permuted, x), _run(model, x)) < 1e-5  # same function, different unit order
        matrices = {k: v for k, v in model.state_dict().items() if v.dim() >= 2}
        moved = [k for k, v in permuted.state_dict().items() if k in matrices and not torch.equal(v, matrices[k])]
        assert len(moved) > len(matrices) // 2  # ... from different weights
        for least_squares in (True, False):
            merged = pleas_merge(model, permuted, _batches(shape),
                                 PleasOptions(norm_statistics="merge", least_squares=least_squares, ridge=1e-9))
            assert _relative(_run(merged.model, x), _run(model, x)) < 1e-4, least_squares
            assert merged.report["compute_ratio"] == pytest.approx(1.0)
            assert all(g["match_quality"] > 0.999 for g in merged.report["groups"])


def test_reestimated_statistics_match_the_model_with_its_own_statistics_reestimated():
    model = resnet(0)
    permuted = _permuted_copy(model, resnet)
    batches = _batches((1, 16, 16))
    merged = pleas_merge(model, permuted, batches, PleasOptions(ridge=1e-9))
    reference = resnet(0)
    reference.load_state_dict(model.state_dict())
    reestimate_norm_statistics(reference, batches)
    x = torch.randn(20, 1, 16, 16)
    with torch.no_grad():
        assert _relative(merged.model(x), reference(x)) < 1e-4


@pytest.mark.parametrize("family", list(FAMILIES)[:2])
def test_width_two_with_every_group_unmerged_is_the_ensemble(family):
    """(A layer or RMS norm over a widened stream is not the two models' norms, so two different transformers
    are not quite an ensemble at width 2: see the next test.)"""
    build, shape = FAMILIES[family]
    a, b = build(0), build(7)
    merged = pleas_merge(a, b, _batches(shape), PleasOptions(target_width=2.0, norm_statistics="merge", ridge=1e-9))
    assert all(g["ratio"] == 1.0 for g in merged.report["groups"])
    assert merged.report["compute_ratio"] == pytest.approx(2.0, rel=0.02)
    x = torch.randn(20, *shape)
    with torch.no_grad():
        assert _relative(merged.model(x), (a(x) + b(x)) / 2) < 1e-3


@pytest.mark.parametrize("family", list(FAMILIES)[2:])
def test_transformers_at_width_two_keep_both_models_heads_side_by_side(family):
    """With a permuted copy of itself, the widened stream holds the same values twice, so its norms are the
    model's own and the width-2 merge (every head, MLP unit and stream unit of both copies kept) must give the
    model back; a tied output head must still average the two copies' logits, not add them."""
    build, shape = FAMILIES[family]
    model = build(0)
    permuted = _permuted_copy(model, build)
    x = _inputs(shape, 20)
    for least_squares in (True, False):
        merged = pleas_merge(model, permuted, _batches(shape), PleasOptions(
            target_width=2.0, norm_statistics="merge", least_squares=least_squares, ridge=1e-9))
        report = merged.report
        assert all(g["ratio"] == 1.0 and g["merged_width"] == 2 * g["width"] for g in report["groups"])
        assert report["compute_ratio"] == pytest.approx(2.0)
        with torch.no_grad():
            assert _relative(_run(merged.model, x), _run(model, x)) < 1e-4, least_squares


def test_heads_unmerge_whole_and_count_in_the_compute_target(tmp_path):
    """Between 1 and 2, head groups move a whole head at a time; the merged attention runs with the head count
    its projections have (also once saved and loaded back), and attention's own multiply-adds count toward the
    target."""
    from safetensors.torch import save_file

    a, b = vit(0), vit(5)
    batches = _batches((3, 32, 32))
    merged = pleas_merge(a, b, batches, PleasOptions(target_width=1.3))
    report = merged.report
    heads = [g for g in report["groups"] if g["width"] == a.blocks[0].attn.num_heads]
    assert any(g["merged_width"] > g["width"] for g in heads)
    for block, group in zip(merged.model.blocks, heads):
        assert block.attn.num_heads == group["merged_width"]
        assert block.attn.qkv.out_features == 3 * block.attn.num_heads * block.attn.head_dim
    assert 1.3 <= report["compute_ratio"] < 1.45
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "test_vit", "model_args": {"num_classes": 10, "img_size": 32}}))
    save_file({k: v.contiguous() for k, v in merged.model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = load_model(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _relative(loaded(x), merged.model(x)) < 1e-6


def test_intermediate_width_meets_the_target_and_unmerges_worst_groups_first():
    a, b = resnet(0), resnet(9)
    merged = pleas_merge(a, b, _batches((1, 16, 16)), PleasOptions(target_width=1.4))
    report = merged.report
    assert 1.4 <= report["compute_ratio"] < 1.55
    assert 1.0 < report["parameter_ratio"] < 4.0
    unmerged = [g for g in report["groups"] if g["ratio"] > 0]
    kept = [g for g in report["groups"] if g["ratio"] == 0]
    assert unmerged and kept
    assert min(g["match_quality"] for g in unmerged) <= min(g["match_quality"] for g in kept)
    with torch.no_grad():
        assert merged.model(torch.randn(4, 1, 16, 16)).shape == (4, 10)


def test_least_squares_beats_permutation_only_on_the_layer_targets():
    a, b = resnet(0), resnet(9)
    batches = _batches((1, 16, 16))
    x = torch.cat(batches[:2])
    plain = pleas_merge(a, b, batches, PleasOptions(least_squares=False, norm_statistics="merge")).model
    fitted = pleas_merge(a, b, batches, PleasOptions(norm_statistics="merge")).model
    with torch.no_grad():
        target = (a(x) + b(x)) / 2
        assert (fitted(x) - target).pow(2).mean() < (plain(x) - target).pow(2).mean()


# ---- through the command line ----

def _save_timm(model: torch.nn.Module, directory):
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(directory), model_args={"in_chans": 1, "num_classes": 10}, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def pleas_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pleas")
    a = _save_timm(resnet(0), root / "a")
    b = _save_timm(resnet(5), root / "b")
    data = root / "inputs.safetensors"
    save_file({"images": torch.randn(300, 1, 16, 16)}, str(data))
    return a, b, data


def _recipe(tmp_path, a, b, data_lines: str, params: str = "") -> str:
    text = f"merge_method: pleas\nmodels:\n  - model: {a}\n  - model: {b}\n{data_lines}"
    if params:
        text += f"parameters: {{{params}}}\n"
    path = tmp_path / "pleas.yaml"
    path.write_text(text)
    return str(path)


def test_merge_run_writes_a_wider_checkpoint_that_loads(tmp_path, pleas_inputs):
    a, b, data = pleas_inputs
    recipe = _recipe(tmp_path, a, b, f"data: {{path: {data}, key: images}}\n", "target_width: 1.5, samples: 200, batch_size: 50")
    out = tmp_path / "merged"
    result = runner.invoke(app, ["run", recipe, str(out)])
    assert result.exit_code == 0, result.output
    model = load_model(out)
    with torch.no_grad():
        assert model(torch.randn(3, 1, 16, 16)).shape == (3, 10)
    config = json.loads((out / "config.json").read_text())
    assert config["pleas"]["target_width"] == 1.5
    assert sum(config["pleas"]["group_widths"]) > sum(config["pleas"]["source_group_widths"])
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "pleas" and report["data"]["samples"] == 200
    shown = runner.invoke(app, ["report", str(out)])
    assert shown.exit_code == 0 and "pleas merge" in shown.output
    assert f"compute {report['pleas']['compute_ratio']:.3f}x (target 1.5)" in shown.output
    assert report["pleas"]["compute_ratio"] >= 1.5
    assert all("residual" in layer for layer in report["pleas"]["layers"])
    assert all("match_quality" in group and "ratio" in group for group in report["pleas"]["groups"])


def test_merge_run_data_free_uses_generic_inputs(tmp_path, pleas_inputs, monkeypatch):
    import mergekit_lite.pleas.run as pleas_run

    # the data-free default is tuned (its number, 300, is checked in test_tuning_closes_the_output_gap_the_layer_wise_fit_leaves);
    # a few steps show the default path runs without paying for 300 of them here
    monkeypatch.setattr(pleas_run, "DATA_FREE_TUNE_STEPS", 12)
    a, b, _ = pleas_inputs
    recipe = _recipe(tmp_path, a, b, "data: {kind: generic, shape: [1, 16, 16]}\n",
                     "data_free: true, data_free_steps: 20, samples: 100, batch_size: 50")
    result = runner.invoke(app, ["run", recipe, str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert tuple(report)[: len(ENVELOPE_KEYS)] == ENVELOPE_KEYS  # the envelope every pipeline writes
    assert report["kind_schema"] == "mergekit_lite.report.pleas/1" and report["output"]["files"]
    assert (tmp_path / "merged" / "mergekit_config.yml").is_file()
    assert "base_model:" in (tmp_path / "merged" / "README.md").read_text().split("---")[1]
    assert "generic" in report["data"]["source"]
    # every data-free report warns that its figures are measured on synthetic inputs; refinement is its own phase
    assert any(w.startswith("data-free:") for w in report["warnings"]) and "data-free:" in result.stderr
    timings = report["timings_seconds"]
    assert timings["refine"] > 0 and timings["read"] >= 0
    assert abs(timings["read"] + timings["refine"] + timings["compute"] + timings["write"] - timings["total"]) < 0.5
    tuning = report["pleas"]["tuning"]  # data-free merges are tuned by default
    assert tuning["steps"] == 12 and tuning["output_gap_after"] < tuning["output_gap_before"]
    shown = runner.invoke(app, ["report", str(tmp_path / "merged")])
    assert "tuned  12 steps" in shown.output
    with torch.no_grad():
        assert load_model(tmp_path / "merged")(torch.randn(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("params, data_lines, needle", [
    ("target_width: 2.5", "", "at most 2"),
    ("", "", "PLeaS needs data"),
    ("", "data: {path: /nonexistent/x.safetensors}\n", "data not found"),
])
def test_merge_run_refuses_bad_pleas_recipes(tmp_path, pleas_inputs, params, data_lines, needle):
    a, b, _ = pleas_inputs
    recipe = _recipe(tmp_path, a, b, data_lines, params)
    result = runner.invoke(app, ["run", recipe, str(tmp_path / "merged")])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not (tmp_path / "merged").exists()


def test_transformers_families_without_a_spec_are_refused_clearly(tmp_path, gpt2_dir):
    recipe = _recipe(tmp_path, gpt2_dir, gpt2_dir, "", "data_free: true, samples: 10")
    result = runner.invoke(app, ["run", recipe, str(tmp_path / "merged")])
    assert result.exit_code == 2
    assert "GPT2LMHeadModel is not supported yet" in result.output and "Llama" in result.output


def test_llama_merges_from_text_through_merge_run_and_loads_back(tmp_path):
    """Width 1.0 with a permuted copy: the checkpoint loads with from_pretrained and gives the model back.
    Width 1.5 with another model: wider MLPs and stream, loaded by mergekit_lite at those widths."""
    import transformers

    from mergekit_lite import examples

    model = examples.tiny_transformers_model("llama", seed=0)
    a = examples.save_transformers(model, tmp_path / "a")
    spec = permutation_spec(model)
    order = [torch.randperm(g.width, generator=torch.Generator().manual_seed(g.index)) for g in spec.groups]
    permuted = examples.save_transformers(model, tmp_path / "permuted", state=permute_state(model.state_dict(), spec, order))
    other = examples.save_transformers(examples.tiny_transformers_model("llama", seed=1), tmp_path / "other")
    text = examples.task_texts(tmp_path / "texts")["prose"]
    x = torch.randint(0, model.config.vocab_size, (3, 10))

    recipe = _recipe(tmp_path, a, permuted, f"data: {{path: {text}, length: 24}}\n", "samples: 48, batch_size: 16, ridge: 1e-9")
    result = runner.invoke(app, ["run", recipe, str(tmp_path / "same")])
    assert result.exit_code == 0, result.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "same")
    with torch.no_grad():
        assert _relative(loaded(x).logits, model(x).logits) < 1e-4
    assert (tmp_path / "same" / "tokenizer_config.json").is_file()
    report = json.loads((tmp_path / "same" / "merge_report.json").read_text())
    assert "text from" in report["data"]["source"]
    heads = [g for g in report["pleas"]["groups"] if g["width"] == model.config.num_key_value_heads]
    assert len(heads) == model.config.num_hidden_layers and all(g["match_quality"] > 0.999 for g in heads)

    recipe = _recipe(tmp_path, a, other, f"data: {{path: {text}, length: 24}}\n", "samples: 48, batch_size: 16, target_width: 1.5")
    result = runner.invoke(app, ["run", recipe, str(tmp_path / "wide")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "wide" / "merge_report.json").read_text())["pleas"]
    assert report["compute_ratio"] >= 1.5
    wide = load_model(tmp_path / "wide", transformers_ok=True)
    assert wide.model.layers[0].mlp.up_proj.out_features + wide.model.embed_tokens.embedding_dim > \
        model.config.intermediate_size + model.config.hidden_size
    with torch.no_grad():
        assert torch.isfinite(wide(x).logits).all() and wide(x).logits.shape == (3, 10, model.config.vocab_size)


def test_llama_data_free_merges_on_random_token_ids(tmp_path, llama_family):
    """Token models have no batch-norm statistics to refine toward: their data-free inputs are random token ids
    (a few tuning steps here; the default number is checked on its own)."""
    recipe = _recipe(tmp_path, llama_family["expert1"], llama_family["expert2"], "",
                     "data_free: true, samples: 16, batch_size: 8, tune_steps: 10")
    result = runner.invoke(app, ["run", recipe, str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert "random token ids" in report["data"]["source"]
    assert report["pleas"]["tuning"]["steps"] == 10


def _save_timm_classes(model: torch.nn.Module, directory, classes: int):
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(directory), model_args={"in_chans": 1, "num_classes": classes}, safe_serialization=True)
    return directory


def test_vit_and_llama_specs_hold_the_stream_heads_and_mlp_units():
    """Hand-written specs: one residual-stream group (embeddings, norms, every layer reading or writing it), per
    block a head group that moves whole heads (fused q/k/v rows in three sections; query heads with the
    key/value head they share) and an MLP-unit group."""
    model = vit(0)
    spec = permutation_spec(model)
    stream = {name for name, _ in spec.groups[0].members}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"} <= stream
    heads = [g for g in spec.groups if g.blocks]
    assert [g.width for g in heads] == [b.attn.num_heads for b in model.blocks]
    assert all(g.segments.get(f"blocks.{i}.attn.qkv.weight") == 3 for i, g in enumerate(heads))
    assert sum(not g.blocks for g in spec.groups) == 1 + len(model.blocks)
    assert check_groups(model, spec, torch.randn(2, 3, 32, 32)) < 1e-4

    decoder = llama(0)
    spec = permutation_spec(decoder)
    heads = [g for g in spec.groups if g.blocks]
    assert [g.width for g in heads] == [2, 2]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= {n for n, _ in spec.groups[0].members}
    assert "lm_head" not in {layer.name for layer in spec.layers}  # tied: merged with the embeddings
    assert check_groups(decoder, spec, _inputs(TOKENS, 2)) < 1e-4


def test_data_free_inputs_are_refined_toward_the_models_batch_norm_statistics():
    from mergekit_lite.models.data import generic_inputs
    from mergekit_lite.models.synthetic import statistics_loss, statistics_matched

    models = [resnet(0), resnet(1)]
    start = generic_inputs((1, 16, 16), 16, seed=0)
    refined = statistics_matched(models, start, steps=40)
    assert refined.shape == start.shape
    before, after = float(statistics_loss(models, start).detach()), float(statistics_loss(models, refined).detach())
    assert after < 0.8 * before, (before, after)
    timid = float(statistics_loss(models, statistics_matched(models, start, steps=40, lr=0.05)).detach())
    assert after < timid  # the default step size gets further in the same number of steps
    assert all(not p.requires_grad or p.grad is None for m in models for p in m.parameters())


def test_data_free_images_from_another_domain_are_refined_too(tmp_path):
    """A user's other-domain images are refined toward the statistics like generic ones; the same file given
    as task data is used as it is."""
    from mergekit_lite.models.data import data_batches
    from mergekit_lite.models.synthetic import statistics_loss

    models = [resnet(0), resnet(1)]
    path = tmp_path / "other.safetensors"
    images = torch.rand(24, 1, 16, 16) * 3.0
    save_file({"images": images}, str(path))
    config = {"architecture": "test_resnet"}
    load = lambda data_free: data_batches({"path": str(path)}, models[0], config, 24, 12, 0, data_free,  # noqa: E731
                                          statistics_of=models, statistics_steps=30)
    as_data, described_data = load(False)
    refined, described_free = load(True)
    as_data, refined = torch.cat(as_data), torch.cat(refined)
    assert "refined" not in described_data and "another domain" in described_free and "refined" in described_free
    assert sorted(as_data.flatten().tolist()) == sorted(images.flatten().tolist())
    before, after = float(statistics_loss(models, as_data).detach()), float(statistics_loss(models, refined).detach())
    assert after < 0.5 * before, (before, after)


def test_output_target_averages_shared_classes_and_keeps_separate_ones_side_by_side():
    from mergekit_lite.pleas.method import _head_layout
    from mergekit_lite.pleas.tuning import output_target

    out_a, out_b = torch.randn(3, 7, 4), torch.randn(3, 7, 4)
    assert torch.allclose(output_target(out_a, out_b, _head_layout(4, 4, "shared")), (out_a + out_b) / 2)
    assert torch.equal(output_target(out_a, out_b, _head_layout(4, 4, "separate")), torch.cat([out_a, out_b], -1))


def test_tuning_closes_the_output_gap_the_layer_wise_fit_leaves(tmp_path, pleas_inputs):
    """Two differently initialised models merged at 1.0 on a few inputs: tuning brings the merged outputs
    closer to the mean of the sources' on those inputs, and on inputs it never saw; the report says by how
    much. The data-free default tunes; with data the default does not."""
    a, b, data = pleas_inputs
    source_a, source_b = load_model(a), load_model(b)
    inputs = torch.randn(200, 1, 16, 16)
    batches = [inputs[i: i + 50] for i in range(0, 200, 50)]
    plain = pleas_merge(copy.deepcopy(source_a), copy.deepcopy(source_b), batches, PleasOptions()).model
    result = pleas_merge(copy.deepcopy(source_a), copy.deepcopy(source_b), batches, PleasOptions(tune_steps=30))
    tuning = result.report["tuning"]
    assert tuning["steps"] == 30 and tuning["output_gap_after"] < 0.8 * tuning["output_gap_before"], tuning
    unseen = torch.randn(100, 1, 16, 16)
    with torch.no_grad():
        target = (source_a(unseen) + source_b(unseen)) / 2
        gap = lambda model: float((model(unseen) - target).pow(2).sum() / target.pow(2).sum())  # noqa: E731
        assert gap(result.model) < gap(plain)
    assert all(p.grad is None for p in result.model.parameters())
    again = pleas_merge(copy.deepcopy(source_a), copy.deepcopy(source_b), batches, PleasOptions(tune_steps=30)).model
    assert all(torch.equal(x, y) for x, y in zip(result.model.state_dict().values(), again.state_dict().values()))
    from mergekit_lite.pleas.run import tune_steps
    assert tune_steps({"data_free": True}) == 300 and tune_steps({"data_free": False}) == 0
    assert tune_steps({"data_free": True, "tune_steps": 0}) == 0


def test_validate_builds_both_models_and_checks_their_groups(tmp_path, pleas_inputs):
    a, b, _ = pleas_inputs
    recipe = _recipe(tmp_path, a, b, "data: {kind: generic, shape: [1, 16, 16]}\n", "data_free: true")
    result = runner.invoke(app, ["validate", recipe])
    assert result.exit_code == 0, result.output
    assert "permutation groups" in result.output and "both models build" in result.output
    missing = _recipe(tmp_path, a, b, "data: {path: /nonexistent/x.pt}\n", "samples: 10")
    result = runner.invoke(app, ["validate", missing])
    assert result.exit_code == 2 and "not found" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pleas_on_cuda_equals_pleas_on_cpu(tmp_path, pleas_inputs):
    """The models run and the statistics and least squares accumulate on the GPU; the merge matches the CPU's
    (cuDNN's TF32 convolutions move activations by about 1e-3, which can flip near-tied matches, so the match
    qualities agree closely and the outputs within a few percent)."""
    a, b, data = pleas_inputs
    recipe = _recipe(tmp_path, a, b, f"data: {{path: {data}}}\n", "samples: 200, target_width: 1.25")
    reports = {}
    for device in ("cpu", "cuda"):
        result = runner.invoke(app, ["run", recipe, str(tmp_path / device), "--device", device])
        assert result.exit_code == 0, result.output
        reports[device] = json.loads((tmp_path / device / "merge_report.json").read_text())
        assert reports[device]["device"].startswith(device)
    qualities = [[g["match_quality"] for g in reports[d]["pleas"]["groups"]] for d in ("cpu", "cuda")]
    assert qualities[1] == pytest.approx(qualities[0], abs=5e-3)
    x = torch.randn(16, 1, 16, 16)
    with torch.no_grad():
        on_cpu, on_gpu = load_model(tmp_path / "cpu"), load_model(tmp_path / "cuda")
        assert _relative(on_gpu(x), on_cpu(x)) < 5e-2


def test_long_pleas_phases_show_step_progress(tmp_path, pleas_inputs, monkeypatch):
    """Every long phase (refinement, features, matching, least squares, tuning) reports its steps to the progress
    bar, which shows an ETA from them, and says how much work it is before it starts."""
    import mergekit_lite.cli as cli

    calls = []

    class Recorder(cli.RichProgress):
        def start(self, tensors, nbytes, label):
            calls.append((label, tensors, nbytes))
            super().start(tensors, nbytes, label)

        def advance(self, nbytes):
            calls.append(("advance", nbytes))
            super().advance(nbytes)

    monkeypatch.setattr(cli, "RichProgress", lambda enabled: Recorder(True))
    a, b, _ = pleas_inputs
    recipe = _recipe(tmp_path, a, b, "data: {kind: generic, shape: [1, 16, 16]}\n",
                     "data_free: true, samples: 32, batch_size: 32, data_free_steps: 4, tune_steps: 6")
    result = runner.invoke(app, ["run", recipe, str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    starts = [c for c in calls if c[0] != "advance"]
    labels = [s[0].split(" ")[0] for s in starts]
    assert labels == ["refining", "features", "matching", "least", "least", "tuning"], starts
    assert all(s[2] == 0 for s in starts)  # step counts, not bytes
    steps = dict(zip(labels, [s[1] for s in starts]))
    assert steps["refining"] == 4 and steps["features"] == 1 and steps["tuning"] == 6
    assert sum(1 for c in calls if c[0] == "advance") == sum(s[1] for s in starts)
    for announced in ("refining 32 data-free inputs", "features: 1 batches", "matching:", "least squares:",
                      "tuning: 6 Adam steps"):
        assert announced in result.output
