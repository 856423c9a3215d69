"""The streaming writer: bit-exact round trips for every dtype, sharding, and atomic publishing."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from mergekit_lite.checkpoint import CheckpointWriter, TensorSpec, open_checkpoint
from mergekit_lite.checkpoint.writer import plan_shards
from mergekit_lite.errors import UserError


def _all_dtype_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen) * 3
    tensors = {
        "f32": base.clone(),
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "f64": base.double(),
        "i8": torch.randint(-128, 127, (4, 3), dtype=torch.int8, generator=gen),
        "u8": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=gen),
        "i16": torch.randint(-1000, 1000, (3, 3), dtype=torch.int16, generator=gen),
        "i32": torch.randint(-(2**30), 2**30, (5,), dtype=torch.int32, generator=gen),
        "i64": torch.randint(-(2**40), 2**40, (2, 2), dtype=torch.int64, generator=gen),
        "bool": torch.rand(7, generator=gen) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "nan_inf": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]),
    }
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            tensors[name] = base.to(getattr(torch, name))
    return tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


@pytest.mark.parametrize("max_shard_bytes", [10**9, 64])
def test_round_trip_is_bit_exact_for_every_dtype(tmp_path, max_shard_bytes):
    tensors = _all_dtype_tensors()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    out = tmp_path / "out"
    with CheckpointWriter(out, specs, max_shard_bytes=max_shard_bytes) as writer:
        for name in reversed(list(tensors)):  # any order is allowed
            writer.write(name, tensors[name])
    files = sorted(out.glob("*.safetensors"))
    assert (len(files) > 1) == (max_shard_bytes == 64)
    loaded = {}
    for file in files:
        loaded.update(load_file(str(file)))  # the reference library reads what we wrote
    assert set(loaded) == set(tensors)
    for name, original in tensors.items():
        assert loaded[name].dtype == original.dtype and loaded[name].shape == original.shape
        assert torch.equal(_bits(loaded[name]), _bits(original)), name
    if len(files) > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    reread = open_checkpoint(out)
    assert torch.equal(_bits(reread.get("bf16")), _bits(tensors["bf16"]))


def test_plan_shards_respects_limit_and_order():
    specs = [TensorSpec(f"t{i}", torch.float32, (n,)) for i, n in enumerate([10, 10, 30, 5, 5])]
    shards = plan_shards(specs, max_shard_bytes=80)
    assert [[s.name for s in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert all(sum(s.nbytes for s in shard) <= 120 for shard in shards)


def test_failure_leaves_nothing_at_target(tmp_path):
    specs = [TensorSpec("a", torch.float32, (4,)), TensorSpec("b", torch.float32, (4,))]
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(out, specs) as writer:
            writer.write("a", torch.ones(4))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_unwritten_tensor_is_an_error_and_nothing_published(tmp_path):
    specs = [TensorSpec("a", torch.float32, (4,)), TensorSpec("b", torch.float32, (4,))]
    with pytest.raises(RuntimeError, match="never written"):
        with CheckpointWriter(tmp_path / "out", specs) as writer:
            writer.write("a", torch.ones(4))
    assert list(tmp_path.iterdir()) == []


def test_wrong_shape_or_dtype_refused(tmp_path):
    specs = [TensorSpec("a", torch.float32, (4,))]
    with pytest.raises(ValueError, match="planned"):
        with CheckpointWriter(tmp_path / "out", specs) as writer:
            writer.write("a", torch.ones(5))


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    specs = [TensorSpec("a", torch.float32, (2,))]
    with pytest.raises(UserError, match="already exists"):
        CheckpointWriter(out, specs)
    assert (out / "keep.txt").read_text() == "mine"
    with CheckpointWriter(out, specs, force=True) as writer:
        writer.write("a", torch.ones(2))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_finished_shards_are_hashed_in_the_background_correctly(tmp_path):
    specs = [TensorSpec(f"t{i}", torch.float32, (64, 32)) for i in range(6)]
    out = tmp_path / "out"
    digests = {}
    with CheckpointWriter(out, specs, max_shard_bytes=20_000) as writer:
        assert len(writer.shard_names) == 3
        for i, spec in enumerate(reversed(specs)):  # any order: a shard seals when its last tensor lands
            writer.write(spec.name, torch.full(spec.shape, float(i)))
        digests = {name: writer.shard_digest(name) for name in writer.shard_names}
    for name, digest in digests.items():
        assert digest == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert writer.shard_digest("not-a-shard.safetensors") is None
