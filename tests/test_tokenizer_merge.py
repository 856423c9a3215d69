"""Merges that write their own tokenizer (`tokenizer_source`, `tokenizer:`) align embedding and output-head rows
by token, not by row index, with mergekit's rules for a token a model lacks; checked against a naive per-token
reference on models whose tokenizers order and choose their tokens differently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from typer.testing import CliRunner

from mergekit_lite import merge
from mergekit_lite.cli import app

runner = CliRunner()
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
VOCABS = {
    "base": ["<unk>", "a", "b", "c", "d", "e"],
    "expert1": ["<unk>", "b", "a", "c", "x", "e"],  # reordered, lacks d, has x
    "expert2": ["<unk>", "a", "b", "c", "d", "e", "y", "z"],  # two tokens more
}


def save_model(directory: Path, tokens: list[str], seed: int) -> Path:
    """A tiny Llama whose embedding rows follow `tokens`, with a word-level tokenizer of those tokens."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {name: save_model(root / name, tokens, seed) for seed, (name, tokens) in enumerate(VOCABS.items())}


def rows_by_token(directory: Path, name: str) -> dict[str, torch.Tensor]:
    tensors = load_file(str(directory / "model.safetensors"))
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    return {token: tensors[name][index] for token, index in vocab.items()}


def reference_rows(trio: dict[str, Path], output: list[str], name: str, settings: dict | None = None
                   ) -> dict[str, torch.Tensor]:
    """Each model's row per output token, by the rules written out one token at a time (base first)."""
    rows = {model: rows_by_token(path, name) for model, path in trio.items()}
    settings = settings or {}
    aligned = {model: [] for model in trio}
    for token in output:
        holders = [m for m in trio if token in rows[m]]
        setting = settings.get(token)
        if setting is not None and "row" in setting:
            stand_in = setting["row"]
        elif len(holders) == 1:
            stand_in = rows[holders[0]][token]
        elif not holders:
            stand_in = torch.zeros(16)
        elif "base" in holders:
            stand_in = rows["base"][token]
        else:
            stand_in = torch.stack([rows[m][token] for m in holders]).mean(0)
        forced = setting is not None and setting.get("force", False)
        for model in trio:
            own = token in rows[model] and not forced
            aligned[model].append(rows[model][token] if own else stand_in)
    return {model: torch.stack(values) for model, values in aligned.items()}


def task_arithmetic(aligned: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    base = aligned["base"]
    return base + sum(w * (aligned[m] - base) for m, w in weights.items())


def recipe(trio: dict[str, Path], **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(trio["base"]), "dtype": "float32",
            "models": [{"model": str(trio["expert1"]), "parameters": {"weight": 1.0}},
                       {"model": str(trio["expert2"]), "parameters": {"weight": 0.5}}], **extra}


def output_tokens(directory: Path) -> list[str]:
    vocab = transformers.AutoTokenizer.from_pretrained(directory).get_vocab()
    return sorted(vocab, key=vocab.get)


@pytest.mark.parametrize("source, expected_tokens", [
    ("union", VOCABS["base"] + ["x", "y", "z"]),
    ("base", VOCABS["base"]),
    ("expert2", VOCABS["expert2"]),
])
def test_rows_follow_the_output_vocabulary_by_token(tmp_path, trio, source, expected_tokens):
    chosen = str(trio[source]) if source in trio else source
    merge(recipe(trio, tokenizer_source=chosen), tmp_path / "out")
    out = tmp_path / "out"
    assert output_tokens(out) == expected_tokens
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(expected_tokens)
    tensors = load_file(str(out / "model.safetensors"))
    for name in EMBEDDINGS:
        expected = task_arithmetic(reference_rows(trio, expected_tokens, name), {"expert1": 1.0, "expert2": 0.5})
        torch.testing.assert_close(tensors[name], expected, rtol=0, atol=1e-6, msg=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = transformers.AutoTokenizer.from_pretrained(out)(" ".join(expected_tokens[1:]), return_tensors="pt").input_ids
    assert ids.max() == len(expected_tokens) - 1 and torch.isfinite(model(ids).logits).all()


def test_the_tokenizer_block_forces_names_rows_and_pads(tmp_path, trio):
    expert2 = str(trio["expert2"])
    block = {"source": "union", "pad_to_multiple_of": 4, "tokens": {
        "d": {"source": {"kind": "zero"}, "force": True},
        "q": {"source": {"kind": "model_token", "model": expert2, "token": "y"}},
        "x": {"source": str(trio["expert1"])},
    }}
    merge(recipe(trio, tokenizer=block), tmp_path / "out")
    out = tmp_path / "out"
    tokens = output_tokens(out)
    assert tokens == VOCABS["base"] + ["x", "y", "z", "q"]
    tensors = load_file(str(out / "model.safetensors"))
    y_row = {name: rows_by_token(trio["expert2"], name)["y"] for name in EMBEDDINGS}
    for name in EMBEDDINGS:
        settings = {"d": {"row": torch.zeros(16), "force": True}, "q": {"row": y_row[name]}}
        aligned = reference_rows(trio, tokens, name, settings)
        padding = 12 - len(tokens)  # rows past the vocabulary: each model's mean row
        aligned = {m: torch.cat([rows, rows.mean(0, keepdim=True).expand(padding, -1)]) for m, rows in aligned.items()}
        expected = task_arithmetic(aligned, {"expert1": 1.0, "expert2": 0.5})
        assert tensors[name].shape[0] == 12
        torch.testing.assert_close(tensors[name], expected, rtol=0, atol=1e-5)
        assert torch.count_nonzero(tensors[name][tokens.index("d")]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 12


def test_tokenizer_settings_that_cannot_hold_are_one_line(tmp_path, trio):
    text = (f"merge_method: linear\nmodels:\n  - model: {trio['base']}\n  - model: {trio['expert1']}\n"
            f"tokenizer_source: union\ntokenizer:\n  source: base\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "not both" in result.stderr
    block = {"source": "union", "tokens": {"w": {"source": str(trio["expert1"])}}}
    path.write_text(json.dumps(recipe(trio, tokenizer=block)))
    result = runner.invoke(app, ["run", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2 and "has no token 'w'" in result.stderr and not (tmp_path / "out").exists()
