"""Hand-written permutation specs for the families torch.fx cannot trace through.

Each spec names the same three kinds of groups: the residual stream (every tensor that reads or writes it,
norms included: layer and RMS norms treat features alike, so a shared permutation of the stream commutes
with them), each block's MLP units, and each block's attention heads as whole blocks. Heads move as a
whole: their query, key and value rows and the output projection's columns, in the same order. Units inside
a head keep their order, which rotary position embeddings require. With grouped-query attention a block is
one key/value head with the query heads that share it. A merge wider than its sources may keep heads of
both models side by side: the attention then has more heads of the same size. Activations are read with
forward hooks.
"""

from __future__ import annotations

import torch

from mergekit_lite.pleas.spec import Group, Layer, Spec


class _Builder:
    """Collects groups and layers by name, then numbers them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.state = dict(model.state_dict(keep_vars=True))
        self.groups: list[Group] = []
        self.layers: list[tuple[str, str | None, str | None]] = []
        self.by_name: dict[str, Group] = {}

    def group(self, key: str, width: int, blocks: bool = False) -> Group:
        group = Group(len(self.groups), width, blocks=blocks)
        self.groups.append(group)
        self.by_name[key] = group
        return group

    def member(self, key: str, tensor: str, axis: int, segments: int = 1) -> None:
        """Add `tensor`'s `axis` to group `key`, if the model has that tensor."""
        if tensor in self.state:
            group = self.by_name[key]
            group.members.append((tensor, axis))
            if segments != 1:
                group.segments[tensor] = segments

    def linear(self, module: str, input_group: str | None, output_group: str | None) -> None:
        """A linear (or conv) layer reading one group and writing another (None: a frozen space)."""
        if input_group:
            self.member(input_group, f"{module}.weight", 1)
        if output_group:
            self.member(output_group, f"{module}.weight", 0)
            self.member(output_group, f"{module}.bias", 0)
        self.layers.append((module, input_group, output_group))

    def norm(self, module: str, group: str) -> None:
        for tensor in ("weight", "bias"):
            self.member(group, f"{module}.{tensor}", 0)

    def spec(self) -> Spec:
        index = {key: group.index for key, group in self.by_name.items()}
        layers = [Layer(name, self.model.get_submodule(name), f"{name}:out",
                        index.get(src) if src else None, index.get(out) if out else None)
                  for name, src, out in self.layers]
        return Spec(self.groups, layers, None, self.model)


def hand_written_spec(model: torch.nn.Module) -> Spec | None:
    for build in (_decoder_spec, _vit_spec):
        spec = build(model)
        if spec is not None:
            return spec
    return None


def _has(module: torch.nn.Module, *paths: str) -> bool:
    for path in paths:
        try:
            module.get_submodule(path)
        except AttributeError:
            return False
    return True


def _decoder_spec(model: torch.nn.Module) -> Spec | None:
    """Llama-style decoders (Llama, Mistral, Qwen2 and others with the same module names): embeddings, then
    blocks of RMS norm -> q/k/v/o attention -> RMS norm -> gated MLP (gate, up, down), a final norm, a head."""
    config = getattr(model, "config", None)
    core = getattr(model, "model", None)
    blocks = getattr(core, "layers", None)
    if config is None or blocks is None or not _has(model, "model.embed_tokens", "model.norm"):
        return None
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    if not all(_has(block, *parts) for block in blocks):
        return None
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    builder = _Builder(model)
    stream = "stream"
    builder.group(stream, config.hidden_size)
    builder.member(stream, "model.embed_tokens.weight", 1)
    stream_nodes = []
    for i, block in enumerate(blocks):
        prefix = f"model.layers.{i}"
        attn, mlp, heads_key = f"{prefix}.self_attn", f"{prefix}.mlp", f"heads.{i}"
        builder.norm(f"{prefix}.input_layernorm", stream)
        group = builder.group(heads_key, kv_heads, blocks=True)
        group.nodes.append(f"{attn}.o_proj:in")
        group.attention = (f"{attn}.q_proj", block.self_attn.q_proj.out_features // kv_heads)
        for name in ("q_proj", "k_proj", "v_proj"):
            builder.linear(f"{attn}.{name}", stream, heads_key)
        builder.linear(f"{attn}.o_proj", heads_key, stream)
        builder.norm(f"{prefix}.post_attention_layernorm", stream)
        units = f"mlp.{i}"
        builder.group(units, block.mlp.gate_proj.out_features).nodes.append(f"{mlp}.down_proj:in")
        builder.linear(f"{mlp}.gate_proj", stream, units)
        builder.linear(f"{mlp}.up_proj", stream, units)
        builder.linear(f"{mlp}.down_proj", units, stream)
        stream_nodes += [f"{prefix}.input_layernorm:out", f"{prefix}.post_attention_layernorm:out"]
    builder.norm("model.norm", stream)
    stream_nodes.append("model.norm:out")
    builder.by_name[stream].nodes.extend(stream_nodes)
    head = getattr(model, "lm_head", None) or getattr(model, "score", None)
    if isinstance(head, torch.nn.Linear):
        name = "lm_head" if getattr(model, "lm_head", None) is head else "score"
        if head.weight is core.embed_tokens.weight:
            builder.member(stream, f"{name}.weight", 1)  # tied to the embeddings: merged with them, not solved
            spec = builder.spec()
            spec.halve_private = ["model.norm.weight"]
            return spec
        builder.linear(name, stream, None)
    return builder.spec()


def _vit_spec(model: torch.nn.Module) -> Spec | None:
    """timm VisionTransformer: patch embedding, class token and position embedding on the stream, blocks of
    norm -> fused qkv attention -> (layer scale) -> norm -> MLP (fc1, fc2), final norm, head."""
    blocks = getattr(model, "blocks", None)
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if blocks is None or not isinstance(proj, torch.nn.Conv2d) or not hasattr(model, "pos_embed"):
        return None
    parts = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    plain = lambda block, name: isinstance(getattr(block.attn, name, None), (torch.nn.Identity, type(None)))  # noqa: E731
    if not all(_has(block, *parts) and all(plain(block, n) for n in ("norm", "gate"))
               for block in blocks):
        return None  # a norm or gate on the attention output (over all heads): not covered
    if getattr(model, "global_pool", "token") not in ("token", "avg", "") or getattr(model, "attn_pool", None):
        return None
    builder = _Builder(model)
    stream = "stream"
    builder.group(stream, model.embed_dim)
    builder.linear("patch_embed.proj", None, stream)
    for tensor in ("cls_token", "reg_token", "pos_embed"):
        builder.member(stream, tensor, 2)
    if _has(model, "norm_pre"):
        builder.norm("norm_pre", stream)
    stream_nodes = []
    for i, block in enumerate(blocks):
        prefix = f"blocks.{i}"
        heads_key, units = f"heads.{i}", f"mlp.{i}"
        builder.norm(f"{prefix}.norm1", stream)
        group = builder.group(heads_key, block.attn.num_heads, blocks=True)
        group.nodes.append(f"{prefix}.attn.proj:in")
        group.attention = (f"{prefix}.attn.qkv", block.attn.head_dim)
        builder.member(heads_key, f"{prefix}.attn.qkv.weight", 0, segments=3)
        builder.member(heads_key, f"{prefix}.attn.qkv.bias", 0, segments=3)
        builder.member(stream, f"{prefix}.attn.qkv.weight", 1)
        builder.layers.append((f"{prefix}.attn.qkv", stream, heads_key))
        builder.linear(f"{prefix}.attn.proj", heads_key, stream)
        for scale in ("ls1.gamma", "ls2.gamma"):
            builder.member(stream, f"{prefix}.{scale}", 0)
        builder.norm(f"{prefix}.norm2", stream)
        builder.group(units, block.mlp.fc1.out_features).nodes.append(f"{prefix}.mlp.fc2:in")
        builder.linear(f"{prefix}.mlp.fc1", stream, units)
        builder.linear(f"{prefix}.mlp.fc2", units, stream)
        stream_nodes += [f"{prefix}.norm1:out", f"{prefix}.norm2:out"]
    for name in ("norm", "fc_norm"):
        if _has(model, name) and isinstance(model.get_submodule(name), torch.nn.LayerNorm):
            builder.norm(name, stream)
            stream_nodes.append(f"{name}:out")
    builder.by_name[stream].nodes.extend(stream_nodes)
    if isinstance(getattr(model, "head", None), torch.nn.Linear):
        builder.linear("head", stream, None)
    return builder.spec()
