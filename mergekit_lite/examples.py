"""Tiny real checkpoints, saved the way transformers and timm save them, for the demo, tests and benchmarks.

`python -m mergekit_lite.examples OUT_DIR` writes a base model and fine-tune-like experts (base plus small
noise) so that every recipe under recipes/ has something to merge without downloading anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mergekit_lite.checkpoint import CheckpointWriter, TensorSpec

VOCAB = 257  # 256 byte tokens and an end-of-text token


def byte_tokenizer_files(directory: Path) -> None:
    """A byte-level GPT-2 tokenizer (no merges) that AutoTokenizer loads offline."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    vocab = {chr(c): b for b, c in zip(printable, codes)}
    vocab["<|endoftext|>"] = 256
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 512,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")


def tiny_transformers_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised 2-layer model of a transformers family: llama, gpt2, bert or mistral."""
    import transformers

    torch.manual_seed(seed)
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=256, eos_token_id=256,
        )
        return transformers.LlamaForCausalLM(config)
    if family == "mistral":
        config = transformers.MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=256, eos_token_id=256,
        )
        return transformers.MistralForCausalLM(config)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=256, eos_token_id=256
        )
        return transformers.GPT2LMHeadModel(config)
    if family == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64,
        )
        return transformers.BertForMaskedLM(config)
    raise ValueError(f"unknown transformers family {family!r}")


def tiny_timm_model(name: str = "test_resnet", num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """The model's state with Gaussian noise of `scale` times each float tensor's std added: a mock fine-tune."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            spread = tensor.float().std().clamp_min(1e-3)
            noise = torch.randn(tensor.shape, generator=gen) * spread * scale
            state[name] = (tensor.float() + noise).to(tensor.dtype)
        else:
            state[name] = tensor.clone()
    return state


def save_transformers(model: torch.nn.Module, directory: Path, state: dict | None = None, max_shard_size: str | None = None) -> Path:
    """Save with the library's own save_pretrained (sharded when max_shard_size is given), plus a tokenizer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if state is not None:
        model.load_state_dict(state)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if model.config.model_type != "bert":
        byte_tokenizer_files(directory)
    return directory


def save_timm(model: torch.nn.Module, directory: Path, state: dict | None = None) -> Path:
    """Save in timm's hub layout: config.json with an `architecture` key and model.safetensors."""
    from timm.models._hub import save_for_hf

    if state is not None:
        model.load_state_dict(state)
    save_for_hf(model, str(directory), safe_serialization=True)
    return directory


def make_family(out_dir: Path, family: str = "llama", experts: int = 3, scale: float = 0.05, seed: int = 0) -> dict[str, Path]:
    """A base checkpoint and `experts` fine-tune-like variants of it; returns their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    is_timm = family.startswith("test_")
    model = tiny_timm_model(family, seed=seed) if is_timm else tiny_transformers_model(family, seed=seed)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    save = save_timm if is_timm else save_transformers
    paths = {"base": save(model, out_dir / "base", base_state)}
    for i in range(1, experts + 1):
        model.load_state_dict(base_state)
        paths[f"expert{i}"] = save(model, out_dir / f"expert{i}", perturbed(model, scale, seed=seed * 100 + i))
    return paths


def task_texts(out_dir: Path) -> dict[str, Path]:
    """Three small text domains from what ships with Python (prose, source code, Unicode character names), as
    task data for recipes that train on inputs (twin's router)."""
    import inspect
    import json as json_module
    import unicodedata

    from pydoc_data.topics import topics

    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "prose": "\n\n".join(topics[k] for k in sorted(topics)[:40]),
        "code": inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder),
        "names": "\n".join(unicodedata.name(chr(c), "") for c in range(0x2200, 0x2a00) if unicodedata.name(chr(c), "")),
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = out_dir / f"{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    return paths


# Synthetic Llama-shaped checkpoints of any size, written tensor by tensor (for benchmarks and crash tests).
LLAMA_BENCH = {"hidden": 1024, "layers": 16, "intermediate": 2816, "vocab": 32000, "heads": 16}
LLAMA_SMALL = {"hidden": 256, "layers": 4, "intermediate": 704, "vocab": 8000, "heads": 8}


def llama_specs(dims: dict, dtype: torch.dtype) -> list[TensorSpec]:
    h, i, v = dims["hidden"], dims["intermediate"], dims["vocab"]
    specs = [TensorSpec("model.embed_tokens.weight", dtype, (v, h))]
    for layer in range(dims["layers"]):
        prefix = f"model.layers.{layer}."
        specs += [TensorSpec(prefix + f"self_attn.{p}_proj.weight", dtype, (h, h)) for p in "qkvo"]
        specs += [TensorSpec(prefix + "mlp.gate_proj.weight", dtype, (i, h)), TensorSpec(prefix + "mlp.up_proj.weight", dtype, (i, h)),
                  TensorSpec(prefix + "mlp.down_proj.weight", dtype, (h, i))]
        specs += [TensorSpec(prefix + "input_layernorm.weight", dtype, (h,)),
                  TensorSpec(prefix + "post_attention_layernorm.weight", dtype, (h,))]
    specs += [TensorSpec("model.norm.weight", dtype, (h,)), TensorSpec("lm_head.weight", dtype, (v, h))]
    return specs


def llama_config(dims: dict, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"], "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"], "num_key_value_heads": dims["heads"], "vocab_size": dims["vocab"],
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": dtype,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    }


def llama_shaped_checkpoints(workdir: Path, dims: dict, experts: int, dtype: torch.dtype) -> list[Path]:
    """Base (index 0) and experts: base + noise of 1/10 the base's scale, streamed tensor by tensor."""
    specs = llama_specs(dims, dtype)
    total = sum(s.nbytes for s in specs)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(experts + 1):
        path = workdir / ("base" if index == 0 else f"expert{index}")
        paths.append(path)
        if (path / "model.safetensors.index.json").is_file():
            continue
        with CheckpointWriter(path, specs, max_shard_bytes=total // 2 + 1, force=True) as writer:
            for number, spec in enumerate(specs):
                gen = torch.Generator().manual_seed(number)
                tensor = torch.randn(spec.shape, generator=gen) * 0.02
                if index:
                    gen.manual_seed(number * 1000 + index)
                    tensor += torch.randn(spec.shape, generator=gen) * 0.002
                writer.write(spec.name, tensor.to(dtype))
            writer.add_file("config.json", json.dumps(llama_config(dims, str(dtype).removeprefix("torch.")), indent=2))
    return paths



def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mergekit_lite.examples OUT_DIR [FAMILY] [EXPERTS]\n"
              "FAMILY: llama (default), mistral, gpt2, bert, test_resnet, test_vit")
        return
    out_dir = Path(argv[0])
    family = argv[1] if len(argv) > 1 else "llama"
    experts = int(argv[2]) if len(argv) > 2 else 3
    for name, path in make_family(out_dir, family, experts).items():
        print(f"{name}: {path}")
    if not family.startswith("test_"):
        for name, path in task_texts(out_dir / "data").items():
            print(f"data {name}: {path}")


if __name__ == "__main__":
    main()
