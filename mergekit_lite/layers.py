"""What a tensor is, from its name: its layer (for gradient parameters and per-layer statistics), whether it is an
embedding or output head, whether its entries must stay positive."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_LAYER_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
CONFIG_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "depth")


def layer_index(name: str) -> int | None:
    """The first integer path component of a tensor name (`model.layers.7.mlp...` -> 7), or None."""
    match = _LAYER_NUMBER.search(name)
    return int(match.group(1)) if match else None


def split_layer(name: str) -> tuple[str, int, str] | None:
    """(before, layer number, after) for a layer tensor (`model.layers.7.mlp.up.weight` -> (`model.layers.`, 7,
    `.mlp.up.weight`)), so that the same tensor of another layer is before + str(n) + after; None outside the
    layers."""
    match = _LAYER_NUMBER.search(name)
    if match is None:
        return None
    return name[:match.start(1)], int(match.group(1)), name[match.end(1):]


def count_layers(config: dict[str, Any] | None, names: Iterable[str]) -> int:
    """Layer count from config.json when it says, else one more than the largest layer index in the names."""
    for key in CONFIG_LAYER_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


# Statistics whose entries must stay positive: a batch norm's running variance. A weighted combination of them
# (task arithmetic at lambda >= 0.5, DARE's rescaling, extrapolating slerp) can reach zero or below, and the
# model then divides by the square root of a negative number.
_POSITIVE_SUFFIXES = ("running_var", "running_variance", "moving_variance")


def must_stay_positive(name: str) -> bool:
    return name.endswith(_POSITIVE_SUFFIXES)


def is_input_embedding(tensor_name: str) -> bool:
    lowered = tensor_name.lower()
    return any(key in lowered for key in ("embed", "wte", "wpe"))


def is_embedding(tensor_name: str) -> bool:
    """Input embeddings and output heads: the tensors whose rows follow the vocabulary."""
    return is_input_embedding(tensor_name) or "lm_head" in tensor_name.lower()


def is_token_embedding(tensor_name: str) -> bool:
    """An embedding or output head indexed by token (not by position)."""
    lowered = tensor_name.lower()
    return is_embedding(tensor_name) and "position" not in lowered and "wpe" not in lowered
