"""mergekit's own recipes, run here unchanged: its `examples/`, the recipes of its README, and the configurations
of its tests (`tests/test_basic_merges.py`, `test_tokenizer.py`, `test_chat_template.py`, written out as YAML),
all in `tests/mergekit_corpus/`. Model references are tiny checkpoints made under the names the recipes use
(hub ids are local directories of the same name, which win over the hub). Each recipe either runs and its output
loads and generates, or is refused where mergekit refuses it too; recipes that use a method or `slices` this
tool does not have yet are listed in PENDING and must say so in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer
from typer.testing import CliRunner

from mergekit_lite.chat_templates import NAMED_TEMPLATES
from mergekit_lite.cli import app

CORPUS = Path(__file__).parent / "mergekit_corpus"
RECIPES = sorted(path.stem for path in CORPUS.glob("*.yml"))
runner = CliRunner()

# Recipes whose method or layout is not here yet, with the word the refusal names (none left).
PENDING: dict[str, str] = {}
# Recipes mergekit refuses too (its test expects the error).
REFUSED = {"tests_della_invalid_epsilon": "epsilon"}

HIDDEN = 16
BASE_TOKENS = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, 64)]
LLAMA3_TEMPLATE = NAMED_TEMPLATES["llama3"]


def save_llama(directory: Path, added: tuple[str, ...] = (), rows: int | None = None, seed: int = 0,
               family: str = "llama", template: str | None = None, layers: int = 2) -> None:
    """A tiny model with a BPE tokenizer of 64 tokens plus `added` special ones; `rows` embedding rows (default:
    one per token)."""
    torch.manual_seed(seed)
    rows = rows or len(BASE_TOKENS) + len(added)
    common = dict(vocab_size=rows, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    config = transformers.MistralConfig(**common) if family == "mistral" else transformers.LlamaConfig(**common)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    data = {"version": "1.0", "added_tokens": [],
            "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(BASE_TOKENS)}, "merges": []}}
    core = Tokenizer.from_str(json.dumps(data))
    core.add_special_tokens([AddedToken(t, special=True) for t in added])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>")
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Every model the corpus names, under that name."""
    root = tmp_path_factory.mktemp("corpus")
    plain = ["model_a", "model_b", "model_c", "granite_a", "granite_b", "model_base", "psmathur/orca_mini_v3_13b",
             "garage-bAInd/Platypus2-13B", "WizardLM/WizardLM-13B-V1.2", "WizardLM/WizardMath-13B-V1.0",
             "TheBloke/Llama-2-13B-fp16"]
    deep = [name for name in plain if "13B" in name or "13b" in name]  # 40 layers, as the examples slice them
    for seed, name in enumerate(plain):
        save_llama(root / name, seed=seed, layers=40 if name in deep else 2)
    for seed, name in enumerate(["mistralai/Mistral-7B-Instruct-v0.2", "BioMistral/BioMistral-7B",
                                 "mistralai/Mistral-7B-v0.1"]):
        save_llama(root / name, seed=20 + seed, family="mistral")
    save_llama(root / "model_padded", ("<UNUSED_0>", "<UNUSED_1>", "<UNUSED_2>", "<UNUSED_3>"), rows=64, seed=30)
    save_llama(root / "model_chatml", ("<|im_start|>", "<|im_end|>"), seed=31)
    save_llama(root / "path/to/chatml/model", ("<|im_start|>", "<|im_end|>"), seed=32)
    save_llama(root / "path/to/model", ("<|special|>", "<|original_token|>"), seed=33)
    save_llama(root / "chatml_model", ("<|im_start|>", "<|im_end|>"), seed=34, template=NAMED_TEMPLATES["chatml"])
    save_llama(root / "llama3_model", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), seed=35,
               template=LLAMA3_TEMPLATE)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=HIDDEN, n_layer=2, n_head=2,
                                                         n_positions=64)).save_pretrained(root / "gpt2_like")
    return root


def embedding(directory: Path) -> tuple[torch.Tensor, dict[str, int]]:
    tensors = load_file(str(directory / "model.safetensors"))
    vocab = transformers.AutoTokenizer.from_pretrained(directory).get_vocab()
    return tensors["model.embed_tokens.weight"].float(), vocab


def row(directory: Path, token: str) -> torch.Tensor:
    weights, vocab = embedding(directory)
    return weights[vocab[token]]


def check_tokens(size: int, *must_contain: str):
    def check(out: Path, root: Path) -> None:
        vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
        assert len(vocab) == size and all(token in vocab for token in must_contain)
    return check


def check_union(out: Path, root: Path) -> None:
    check_tokens(66, "<|im_start|>", "<|im_end|>")(out, root)
    for token in ("<|im_start|>", "<|im_end|>"):  # only model_chatml has them: every model's row is its row
        torch.testing.assert_close(row(out, token), row(root / "model_chatml", token))


def check_forced(out: Path, root: Path) -> None:
    check_tokens(66, "<|im_start|>")(out, root)
    torch.testing.assert_close(row(out, "_tok_10"), row(root / "model_chatml", "_tok_10"))
    torch.testing.assert_close(row(out, "_tok_11"), row(root / "model_base", "_tok_11"))


def check_model_token(out: Path, root: Path) -> None:
    check_tokens(64, "_tok_10")(out, root)
    torch.testing.assert_close(row(out, "_tok_20"), embedding(root / "model_chatml")[0][64])
    torch.testing.assert_close(row(out, "_tok_21"), row(root / "model_base", "<s>"))


def check_padded(out: Path, root: Path) -> None:
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 80
    check_tokens(66, "<|im_start|>", "<|im_end|>")(out, root)
    assert embedding(out)[0].shape[0] == 80


def check_template(needle: str):
    def check(out: Path, root: Path) -> None:
        assert needle in transformers.AutoTokenizer.from_pretrained(out).chat_template
    return check


def check_readme_tokens(out: Path, root: Path) -> None:
    torch.testing.assert_close(row(out, "<|im_start|>"), row(root / "path/to/chatml/model", "<|im_start|>"), rtol=0,
                               atol=1e-2)
    torch.testing.assert_close(row(out, "<|special|>"), row(root / "path/to/model", "<|special|>"), rtol=0, atol=1e-2)
    torch.testing.assert_close(row(out, "<|renamed_token|>"), row(root / "path/to/model", "<|original_token|>"),
                               rtol=0, atol=1e-2)
    assert torch.count_nonzero(row(out, "<|unused|>")) == 0


def check_readme_chat_tokens(out: Path, root: Path) -> None:
    for token in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        torch.testing.assert_close(row(out, token), row(root / "llama3_model", token), rtol=0, atol=1e-2)
    torch.testing.assert_close(row(out, "<|im_start|>"), row(root / "chatml_model", "<|im_start|>"), rtol=0, atol=1e-2)


CHECKS = {
    "tests_tokenizer_legacy": check_tokens(64), "tests_tokenizer_source_base": check_tokens(64),
    "tests_tokenizer_source_union": check_union, "tests_tokenizer_source_model": check_tokens(66, "<|im_start|>"),
    "tests_tokenizer_slerp_union": check_tokens(66, "<|im_start|>"), "tests_tokenizer_force_token": check_forced,
    "tests_tokenizer_model_token_id": check_model_token, "tests_tokenizer_pad_to_multiple_of": check_padded,
    "tests_chat_template_chatml": check_template("<|im_start|>"),
    "tests_chat_template_literal": check_template("{{messages[0]['content']}}"),
    "readme_tokenizer_tokens": check_readme_tokens, "readme_tokenizer_chat_tokens": check_readme_chat_tokens,
    "readme_tokenizer_source_chat_template": check_template("<|im_start|>"),
}


LAYERS = {"examples_orcamini-platy-44layer": 44, "examples_gradient-slerp": 40, "tests_gpt2_stack": 4}


def generates(out: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 12]])
    generated = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7) and torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("name", RECIPES)
def test_mergekit_recipe_runs_unchanged(workspace, tmp_path, monkeypatch, name):
    monkeypatch.chdir(workspace)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(CORPUS / f"{name}.yml"), str(out), "--quiet"])
    if name in PENDING or name in REFUSED:
        needle = PENDING.get(name) or REFUSED[name]
        assert result.exit_code == 2 and needle in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
        return
    assert result.exit_code == 0, result.stderr
    generates(out)
    if name in CHECKS:
        CHECKS[name](out, workspace)
    if name in LAYERS:
        assert transformers.AutoConfig.from_pretrained(out).num_hidden_layers == LAYERS[name]


def test_every_pending_or_refused_recipe_is_in_the_corpus():
    assert set(PENDING) | set(REFUSED) <= set(RECIPES)
