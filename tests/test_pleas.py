"""PLeaS: permutation groups from the graph, the exactness anchors, target widths, and `merge run`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergekit_lite.cli import app
from mergekit_lite.pleas import PleasOptions, load_model, pleas_merge
from mergekit_lite.pleas.graph import check_groups, permutation_spec, permute_state
from mergekit_lite.pleas.method import reestimate_norm_statistics

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


FAMILIES = {
    "resnet (basic + bottleneck blocks)": (resnet, (1, 16, 16)),
    "mlp": (mlp, (12,)),
}


def _batches(shape, count=6, size=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *shape, generator=gen) for _ in range(count)]


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
    x = torch.randn(20, *shape)
    with torch.no_grad():
        assert _relative(permuted(x), model(x)) < 1e-5  # same function, different unit order
        for least_squares in (True, False):
            merged = pleas_merge(model, permuted, _batches(shape),
                                 PleasOptions(norm_statistics="merge", least_squares=least_squares, ridge=1e-9))
            assert _relative(merged.model(x), model(x)) < 1e-4, least_squares
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


@pytest.mark.parametrize("family", list(FAMILIES))
def test_width_two_with_every_group_unmerged_is_the_ensemble(family):
    build, shape = FAMILIES[family]
    a, b = build(0), build(7)
    merged = pleas_merge(a, b, _batches(shape), PleasOptions(target_width=2.0, norm_statistics="merge", ridge=1e-9))
    assert all(g["ratio"] == 1.0 for g in merged.report["groups"])
    assert merged.report["compute_ratio"] == pytest.approx(2.0, rel=0.02)
    x = torch.randn(20, *shape)
    with torch.no_grad():
        assert _relative(merged.model(x), (a(x) + b(x)) / 2) < 1e-3


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
    assert report["pleas"]["compute_ratio"] >= 1.5
    assert all("residual" in layer for layer in report["pleas"]["layers"])
    assert all("match_quality" in group and "ratio" in group for group in report["pleas"]["groups"])


def test_merge_run_data_free_uses_generic_inputs(tmp_path, pleas_inputs):
    a, b, _ = pleas_inputs
    recipe = _recipe(tmp_path, a, b, "data: {kind: generic, shape: [1, 16, 16]}\n",
                     "data_free: true, samples: 100, batch_size: 50")
    result = runner.invoke(app, ["run", recipe, str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert "generic" in report["data"]["source"]
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


def test_transformers_checkpoints_are_refused_clearly(tmp_path, llama_family):
    recipe = _recipe(tmp_path, llama_family["expert1"], llama_family["expert2"], "", "data_free: true, samples: 10")
    result = runner.invoke(app, ["run", recipe, str(tmp_path / "merged")])
    assert result.exit_code == 2
    assert "not supported yet" in result.output


def test_merge_run_reads_an_image_folder_with_the_models_preprocessing(tmp_path):
    from PIL import Image

    from mergekit_lite import examples

    family = examples.make_family(tmp_path / "models", "test_resnet", experts=1)
    folder = tmp_path / "images" / "unlabeled"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    recipe = _recipe(tmp_path, family["base"], family["expert1"], f"data: {{path: {tmp_path / 'images'}}}\n",
                     "samples: 12, batch_size: 6")
    result = runner.invoke(app, ["run", recipe, str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["data"]["samples"] == 12 and "images from" in report["data"]["source"]
    model = load_model(tmp_path / "merged")
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def _mlp_head(seed: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 24), torch.nn.ReLU(),
                               torch.nn.Linear(24, classes)).eval()


def test_different_label_spaces_give_a_head_over_the_union():
    a, b = _mlp_head(0, 5), _mlp_head(4, 3)
    batches = _batches((12,))
    x = torch.randn(20, 12)
    wide = pleas_merge(a, b, batches, PleasOptions(target_width=2.0, ridge=1e-9))
    with torch.no_grad():
        assert _relative(wide.model(x), torch.cat([a(x), b(x)], dim=1)) < 1e-3  # both models side by side
    narrow = pleas_merge(a, b, batches, PleasOptions(target_width=1.0))
    assert narrow.report["outputs"] == {"from_a": 5, "from_b": 3, "label_spaces": "separate"}
    with torch.no_grad():
        assert narrow.model(x).shape == (20, 8)
    same_size = pleas_merge(_mlp_head(0, 4), _mlp_head(4, 4), batches, PleasOptions(label_spaces="separate"))
    assert same_size.report["outputs"]["label_spaces"] == "separate"


def test_merge_run_with_different_heads_records_the_union(tmp_path):
    root = tmp_path / "models"
    a = _save_timm_classes(resnet(0), root / "a", 10)
    b = _save_timm_classes(_resnet_classes(5, 4), root / "b", 4)
    recipe = _recipe(tmp_path, a, b, "data: {kind: generic, shape: [1, 16, 16]}\n", "data_free: true, samples: 64, batch_size: 32")
    result = runner.invoke(app, ["run", recipe, str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["num_classes"] == 14 and config["model_args"]["num_classes"] == 14
    with torch.no_grad():
        assert load_model(tmp_path / "merged")(torch.randn(2, 1, 16, 16)).shape == (2, 14)


def _resnet_classes(seed: int, classes: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_resnet", in_chans=1, num_classes=classes).eval()


def _save_timm_classes(model: torch.nn.Module, directory, classes: int):
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(directory), model_args={"in_chans": 1, "num_classes": classes}, safe_serialization=True)
    return directory


def test_timm_vit_mlp_units_are_matched_and_the_rest_is_frozen():
    """timm's ViT traces with timm's own opaque functions; its MLP units form groups, while attention heads and
    the residual stream stay frozen (no head-level spec yet), and a permuted copy still comes back exactly."""
    import timm

    def vit(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return timm.create_model("test_vit", num_classes=10, img_size=32).eval()

    model = vit(0)
    spec = permutation_spec(model)
    assert len(spec.groups) == len(model.blocks)
    assert all({name.rsplit(".", 1)[0] for name, _ in g.members} == {f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"}
               for i, g in enumerate(spec.groups))
    assert all(layer.output_group is None for layer in spec.layers if ".attn." in layer.name)
    permuted = _permuted_copy(model, vit)
    x = torch.randn(6, 3, 32, 32)
    merged = pleas_merge(model, permuted, _batches((3, 32, 32), count=3, size=32),
                         PleasOptions(norm_statistics="merge", ridge=1e-9))
    with torch.no_grad():
        assert _relative(merged.model(x), model(x)) < 1e-4


def test_data_free_inputs_are_refined_toward_the_models_batch_norm_statistics():
    from mergekit_lite.pleas.sources import generic_inputs
    from mergekit_lite.pleas.synthetic import statistics_loss, statistics_matched

    models = [resnet(0), resnet(1)]
    start = generic_inputs((1, 16, 16), 16, seed=0)
    refined = statistics_matched(models, start, steps=40)
    assert refined.shape == start.shape
    before, after = float(statistics_loss(models, start).detach()), float(statistics_loss(models, refined).detach())
    assert after < 0.8 * before, (before, after)
    assert all(not p.requires_grad or p.grad is None for m in models for p in m.parameters())


def test_validate_builds_both_models_and_checks_their_groups(tmp_path, pleas_inputs):
    a, b, _ = pleas_inputs
    recipe = _recipe(tmp_path, a, b, "data: {kind: generic, shape: [1, 16, 16]}\n", "data_free: true")
    result = runner.invoke(app, ["validate", recipe])
    assert result.exit_code == 0, result.output
    assert "permutation groups" in result.output and "both models build" in result.output
    missing = _recipe(tmp_path, a, b, "data: {path: /nonexistent/x.pt}\n", "samples: 10")
    result = runner.invoke(app, ["validate", missing])
    assert result.exit_code == 2 and "not found" in result.output
