"""Reading checkpoints saved by transformers and timm, sharded and not, lazily and exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mergekit_lite import examples
from mergekit_lite.checkpoint import open_checkpoint
from mergekit_lite.errors import CheckpointError
from mergekit_lite.inspect import compare, summarize


def _reference(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in directory.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize("fixture", ["llama_sharded", "gpt2_dir", "bert_dir", "resnet_dir", "vit_dir"])
def test_reads_every_tensor_exactly(request, fixture):
    directory = request.getfixturevalue(fixture)
    ckpt = open_checkpoint(directory)
    reference = _reference(directory)
    assert set(ckpt.tensors) == set(reference)
    for name, tensor in reference.items():
        info = ckpt.tensors[name]
        assert info.shape == tuple(tensor.shape) and info.dtype == tensor.dtype
        assert torch.equal(ckpt.get(name), tensor)


def test_sharded_checkpoint_uses_index(llama_sharded):
    ckpt = open_checkpoint(llama_sharded)
    assert ckpt.format == "safetensors-sharded"
    assert len(ckpt.shards) > 1
    index = json.loads((llama_sharded / "model.safetensors.index.json").read_text())
    assert {n: i.file.name for n, i in ckpt.tensors.items()} == index["weight_map"]


def test_kind_and_layers_from_config(llama_family, resnet_dir, vit_dir):
    llama = summarize(open_checkpoint(llama_family["base"]))
    assert (llama["kind"], llama["architecture"], llama["layers"]) == ("transformers", "LlamaForCausalLM", 2)
    resnet = summarize(open_checkpoint(resnet_dir))
    assert (resnet["kind"], resnet["architecture"]) == ("timm", "test_resnet")
    model = examples.tiny_timm_model("test_vit")
    vit = summarize(open_checkpoint(vit_dir))
    assert vit["parameter_count"] == sum(t.numel() for t in model.state_dict().values())
    assert vit["layers"] == len(model.blocks)


def test_single_file_checkpoint(llama_family):
    ckpt = open_checkpoint(llama_family["base"] / "model.safetensors")
    assert ckpt.format == "safetensors" and ckpt.kind == "transformers"


def test_pickled_weights_need_flag_and_load_weights_only(tmp_path):
    state = {"w": torch.randn(3, 3), "b": torch.zeros(3)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_checkpoint(tmp_path)
    ckpt = open_checkpoint(tmp_path, allow_pickle=True)
    assert torch.equal(ckpt.get("w"), state["w"])


class _Payload:
    """An object a pickle would have to construct by running code."""

    def __init__(self):
        self.x = 1


def test_pickle_with_code_is_refused_even_with_flag(tmp_path):
    torch.save({"w": torch.ones(2), "evil": _Payload()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="cannot load pickled weights safely"):
        open_checkpoint(tmp_path / "model.pt", allow_pickle=True)


def test_compare_self_is_zero_and_expert_is_small(llama_family):
    base = open_checkpoint(llama_family["base"])
    same = compare(base, base)
    assert same["relative_diff"] == 0.0
    assert all(abs(row["cosine"] - 1) < 1e-5 for row in same["tensors"] if row["relative_diff"] == 0)
    other = compare(base, open_checkpoint(llama_family["expert1"]))
    assert 0.01 < other["relative_diff"] < 0.2  # the experts are base + 5 % noise
    assert [row["layer"] for row in other["layers"]] == ["0", "1", "other"]
