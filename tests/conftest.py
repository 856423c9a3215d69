"""Tiny real checkpoints made once per test session with transformers' and timm's own save functions."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from mergekit_lite import examples

if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers share the cores instead of each taking them all
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


# With --dist loadfile --no-loadscope-reorder (`make test`), pytest-xdist hands whole files to the workers in
# collection order: the longest go first, so that no long file is handed out last to keep one worker busy while
# the other has nothing left to run. (Without the flag it hands out the files with the most tests first.)
LONGEST_FIRST = ("test_quality_quick.py", "test_ray.py", "test_pleas.py", "test_hostile.py", "test_recipes_dir.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files and tests keep their order


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_family(models_dir) -> dict[str, Path]:
    """A tiny Llama base and three experts (base + small noise)."""
    return examples.make_family(models_dir / "llama", "llama", experts=3)


@pytest.fixture(scope="session")
def llama_sharded(models_dir) -> Path:
    model = examples.tiny_transformers_model("llama", seed=1)
    return examples.save_transformers(model, models_dir / "llama_sharded", max_shard_size="20KB")


@pytest.fixture(scope="session")
def gpt2_dir(models_dir) -> Path:
    return examples.save_transformers(examples.tiny_transformers_model("gpt2"), models_dir / "gpt2")


@pytest.fixture(scope="session")
def bert_dir(models_dir) -> Path:
    return examples.save_transformers(examples.tiny_transformers_model("bert"), models_dir / "bert")


@pytest.fixture(scope="session")
def resnet_dir(models_dir) -> Path:
    return examples.save_timm(examples.tiny_timm_model("test_resnet"), models_dir / "resnet")


@pytest.fixture(scope="session")
def vit_dir(models_dir) -> Path:
    return examples.save_timm(examples.tiny_timm_model("test_vit"), models_dir / "vit")


def tree_digest(path: Path) -> str:
    """A hash of every file's name and bytes under path: proves inputs were not modified."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def state_dict_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}
