"""Small real models for the quality suite: timm ResNets (and, as a second family, ViTs) on digit images and
byte-level GPT-2s and Llamas on text.

Training, evaluation and saving in the layouts the merge tool reads (timm hub layout, Hugging Face layout).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from data import ImageSet

# ---- vision: timm's test_resnet (basic and bottleneck blocks) at a chosen width ----

VISION_ARCH = "test_resnet"
WIDTHS = {  # width multiplier -> timm model arguments
    0.5: {"channels": [16, 24, 24, 48], "stem_width": 8},
    1.0: {"channels": [32, 48, 48, 96], "stem_width": 16},
    2.0: {"channels": [64, 96, 96, 192], "stem_width": 32},
}


def vision_args(width: float = 1.0, classes: int = 10) -> dict:
    return {"in_chans": 1, "num_classes": classes, **WIDTHS[width]}


def new_vision_model(width: float = 1.0, seed: int = 0, classes: int = 10) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(VISION_ARCH, pretrained=False, **vision_args(width, classes))


def save_vision(model: torch.nn.Module, directory: Path, width: float = 1.0, args: dict | None = None) -> Path:
    """timm's hub layout; `args` are the model's timm arguments (default: test_resnet's at `width`)."""
    from timm.models._hub import save_for_hf

    classes = model.get_classifier().out_features
    save_for_hf(model, str(directory), model_args=args if args is not None else vision_args(width, classes),
                safe_serialization=True)
    return directory


def load_vision(directory: Path) -> torch.nn.Module:
    """A timm model from a hub-layout directory, built from its config.json alone."""
    import timm

    config = json.loads((directory / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config.get("model_args", {}))
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()


def _freeze_norm_statistics(model: torch.nn.Module) -> None:
    """Batch-norm layers keep the statistics they have (eval mode) while their weights still train."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def train_vision(model: torch.nn.Module, data: ImageSet, *, epochs: int, lr: float, seed: int,
                 batch: int = 64, weight_decay: float = 0.0, freeze_norm: bool = False) -> torch.nn.Module:
    """SGD with momentum and a cosine schedule, no augmentation (the domains are the point).

    Fine-tuning freezes the batch-norm statistics, as light fine-tuning of a pretrained network usually does:
    the experts then differ from the base in their weights only, and a task-vector merge never has to add up
    running variances (which it can push below zero)."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(data.labels) / batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    if freeze_norm:
        _freeze_norm_statistics(model)
    return _fit(model, data, optimizer, schedule, epochs, batch, gen)


def _fit(model, data: ImageSet, optimizer, schedule, epochs: int, batch: int, gen: torch.Generator) -> torch.nn.Module:
    """Cross-entropy epochs over shuffled batches, one schedule step per batch."""
    for _ in range(epochs):
        order = torch.randperm(len(data.labels), generator=gen)
        for start in range(0, len(order), batch):
            index = order[start: start + batch]
            loss = torch.nn.functional.cross_entropy(model(data.images[index]), data.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


# ---- vision, second family: timm's test_vit on 4x4 patches (another model type, used only to check defaults) ----

SECOND_VISION_ARCH = "test_vit"
SECOND_VISION_WIDTHS = {0.5: 32, 1.0: 64, 2.0: 128}  # width multiplier -> embedding size


def second_vision_args(width: float = 1.0) -> dict:
    return {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10, "depth": 4, "num_heads": 2,
            "embed_dim": SECOND_VISION_WIDTHS[width]}


def new_second_vision_model(width: float = 1.0, seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(SECOND_VISION_ARCH, pretrained=False, **second_vision_args(width))


def train_vision_adamw(model: torch.nn.Module, data: ImageSet, *, epochs: int, lr: float, seed: int,
                       batch: int = 64) -> torch.nn.Module:
    """AdamW with a one-cycle schedule, no augmentation: what a small ViT needs where SGD serves the ResNets."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(data.labels) / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    return _fit(model.train(), data, optimizer, schedule, epochs, batch, gen)


@torch.no_grad()
def vision_probabilities(model: torch.nn.Module, data: ImageSet, batch: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(data.images[i: i + batch]).softmax(-1) for i in range(0, len(data.labels), batch)])


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probabilities.argmax(-1) == labels).float().mean())


# ---- text: a byte-level GPT-2 of about a million parameters ----

TEXT_WIDTHS = {0.5: 64, 1.0: 128}
CONTEXT = 64


def new_text_model(width: float = 1.0, seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=257, n_embd=TEXT_WIDTHS[width], n_layer=4, n_head=4,
                                     n_positions=CONTEXT, bos_token_id=256, eos_token_id=256)
    return transformers.GPT2LMHeadModel(config)


def new_llama_text_model(seed: int = 0) -> torch.nn.Module:
    """A byte-level Llama (rotary positions, grouped-query attention, gated MLP) about the GPT-2 text model's size."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=257, hidden_size=TEXT_WIDTHS[1.0], num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=344,
                                      max_position_embeddings=CONTEXT, bos_token_id=256, eos_token_id=256,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def save_text(model: torch.nn.Module, directory: Path) -> Path:
    from mergekit_lite.examples import byte_tokenizer_files

    model.save_pretrained(directory)
    byte_tokenizer_files(directory)
    return directory


def load_text(directory: Path) -> torch.nn.Module:
    """Any of the text checkpoints, including PLeaS merges wider than their sources."""
    from mergekit_lite.pleas import load_model

    return load_model(directory, transformers_ok=True).eval()


def _windows(tokens: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - CONTEXT - 1, (count,), generator=gen)
    return torch.stack([tokens[s: s + CONTEXT + 1] for s in starts.tolist()])


def train_text(model: torch.nn.Module, streams: list[torch.Tensor], *, steps: int, lr: float, seed: int,
               batch: int = 16) -> torch.nn.Module:
    """AdamW on random windows, drawn evenly from each stream (domain) in the mix."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    per_stream = [batch // len(streams) + (1 if i < batch % len(streams) else 0) for i in range(len(streams))]
    for _ in range(steps):
        window = torch.cat([_windows(s, n, gen) for s, n in zip(streams, per_stream) if n])
        logits = model(window[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def evaluation_windows(tokens: torch.Tensor, count: int = 96, seed: int = 0) -> torch.Tensor:
    """Fixed, evenly spaced windows of a split (the same for every model scored on it)."""
    step = max(1, (len(tokens) - CONTEXT - 1) // count)
    return torch.stack([tokens[s: s + CONTEXT + 1] for s in range(0, step * count, step)])


@torch.no_grad()
def text_log_probabilities(model: torch.nn.Module, windows: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Per-position log-probabilities of the next byte, (windows, CONTEXT)."""
    model.eval()
    out = []
    for i in range(0, len(windows), batch):
        chunk = windows[i: i + batch]
        logits = model(chunk[:, :-1]).logits.log_softmax(-1)
        out.append(logits.gather(-1, chunk[:, 1:].unsqueeze(-1)).squeeze(-1))
    return torch.cat(out)


def loss_of(log_probabilities: torch.Tensor) -> float:
    """Mean cross-entropy in nats per byte."""
    return float(-log_probabilities.mean())
