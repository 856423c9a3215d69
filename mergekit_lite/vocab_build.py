"""The output tokenizer of a merge that writes its own (`tokenizer_source`, `tokenizer:`), built with transformers
from the inputs' tokenizers, and every input's vocabulary, for aligning embedding rows by token (`vocab.py`).

`base` is the base model's tokenizer (the first model's without a base), a model reference that model's, and
`union` the base's with every other input's tokens added after it: regular tokens first, by input and then by id,
then special (added) tokens. (mergekit adds them in its tokenizers' hash-map order, which varies between runs;
ordering by id makes the output's ids the same on every run.) Tokenizers are loaded with `trust_remote_code` off, after their files are checked to lie
inside their checkpoint.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_lite.checkpoint.files import load_json, roots_of, same_path
from mergekit_lite.checkpoint.lora import split_lora_reference
from mergekit_lite.checkpoint.writer import support_files
from mergekit_lite.errors import RecipeError, UserError, one_line
from mergekit_lite.recipe import Recipe, TokenSource
from mergekit_lite.vocab import DEFAULT, FROM_MODEL, MODEL_TOKEN, ZERO, TokenSetting


@dataclass
class Vocabularies:
    """The output vocabulary, each input directory's vocabulary, and the recipe's token settings by token."""

    tokenizer: Any  # transformers PreTrainedTokenizerBase, saved into the output
    output: dict[str, int]
    of_directory: dict[str, dict[str, int]] = field(default_factory=dict)
    tokens: dict[str, Any] = field(default_factory=dict)  # token -> TokenEntry
    pad_to_multiple_of: int | None = None

    def vocabulary_of(self, directory: Path) -> dict[str, int]:
        return self.of_directory[str(directory)]


def model_directory(reference: str) -> Path:
    """The directory holding a reference's tokenizer (a base+adapter reference's base)."""
    lora = split_lora_reference(reference)
    path = Path(lora[0] if lora is not None else reference)
    return path if path.is_dir() else path.parent


def load_tokenizer(directory: Path) -> Any:
    """A checkpoint's tokenizer, through transformers, never running code from the checkpoint."""
    import transformers
    from transformers.utils import logging as hf_logging

    support_files(directory)  # links out of the checkpoint, FIFOs and devices are refused before transformers looks
    hf_logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), use_fast=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError) as exc:
        raise UserError(f"{directory}: cannot load its tokenizer: {one_line(exc)}") from exc


def _copy(tokenizer: Any) -> Any:
    """An independent copy (adding tokens must not change the input's tokenizer)."""
    import transformers

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        return transformers.AutoTokenizer.from_pretrained(scratch, use_fast=True, trust_remote_code=False)


def union_tokenizer(base: Any, others: list[tuple[Any, int]]) -> Any:
    """The base tokenizer with the other tokenizers' tokens added: regular tokens in input order, then special
    ones. `others` pairs each tokenizer (the base's first) with its model's embedding rows: tokens past them are
    padding of the tokenizer, not the model's, and are left out."""
    regular: dict[str, None] = {}
    special: dict[str, Any] = {}
    for tokenizer, embedded in others:
        added = tokenizer.added_tokens_decoder
        added_names = {info.content for info in added.values()}
        vocab = tokenizer.get_vocab()  # a hash map's order: taken by id, so that the output ids do not vary by run
        for token, index in sorted(vocab.items(), key=lambda item: item[1]):
            if index < embedded and token not in added_names:
                regular.setdefault(token, None)
        for index, info in sorted(added.items()):
            if index < embedded:
                special.setdefault(info.content, info)
    result = _copy(base)
    present = base.get_vocab()
    result.add_tokens([token for token in regular if token not in present])
    result.add_tokens(list(special.values()))
    return result


def embedded_rows(config: dict[str, Any] | None, tokenizer: Any) -> int:
    """How many token rows a model's embedding holds: its config's vocab_size, else its tokenizer's size."""
    size = (config or {}).get("vocab_size")
    return size if isinstance(size, int) and size > 0 else len(tokenizer.get_vocab())


def _config(directory: Path) -> dict[str, Any] | None:
    if not (directory / "config.json").exists():
        return None
    config = load_json(directory / "config.json", roots_of(directory), "config.json")
    return config if isinstance(config, dict) else None


def build_vocabularies(recipe: Recipe) -> Vocabularies:
    """Load every input's tokenizer and build the output one."""
    source = recipe.vocabulary_source
    references = ([recipe.base_model] if recipe.base_model else []) + [entry.model for entry in recipe.models]
    directories: list[Path] = []
    for reference in references:
        directory = model_directory(reference)
        if not any(same_path(directory, seen) for seen in directories):
            directories.append(directory)
    tokenizers = {str(d): load_tokenizer(d) for d in directories}
    first = tokenizers[str(directories[0])]
    if source == "base":
        if recipe.base_model is None:
            raise RecipeError("tokenizer source base needs base_model")
        output = _copy(first)
    elif source == "union":
        rows = [(tokenizers[str(d)], embedded_rows(_config(d), tokenizers[str(d)])) for d in directories]
        output = union_tokenizer(first, rows)
    else:
        path = model_directory(source)
        if not path.exists():
            raise RecipeError(f"tokenizer source {source!r}: no such directory")
        output = _copy(load_tokenizer(path))
    tokens = recipe.tokenizer.tokens if recipe.tokenizer is not None else {}
    if tokens:
        output.add_tokens([token for token in tokens if token not in output.get_vocab()])
    block = recipe.tokenizer
    return Vocabularies(output, output.get_vocab(), {d: t.get_vocab() for d, t in tokenizers.items()}, dict(tokens),
                        block.pad_to_multiple_of if block is not None else None)


def token_source_model(source: str | TokenSource | None) -> str | None:
    """The model reference a token setting names, if any."""
    if isinstance(source, TokenSource):
        return source.model
    return source


def token_settings(vocabularies: Vocabularies, references: list[str], vocabs: list[dict[str, int]]
                   ) -> dict[int, TokenSetting]:
    """The recipe's `tokenizer.tokens`, by output token id, with the models they name as indices into
    `references` (the aligned models: the base first when there is one, then the others)."""

    def index_of(reference: str) -> int:
        for index, candidate in enumerate(references):
            if candidate == reference or (split_lora_reference(reference) is None and Path(reference).exists()
                                          and same_path(candidate, reference)):
                return index
        raise RecipeError(f"tokenizer.tokens: {reference!r} is not one of the merged models")

    settings: dict[int, TokenSetting] = {}
    for token, entry in vocabularies.tokens.items():
        token_id = vocabularies.output[token]
        source = entry.source
        if source is None:
            settings[token_id] = TokenSetting(DEFAULT, force=entry.force)
        elif isinstance(source, str):
            model = index_of(source)
            if token not in vocabs[model]:
                raise RecipeError(f"tokenizer.tokens.{token}: {source} has no token {token!r} to take its row from")
            settings[token_id] = TokenSetting(FROM_MODEL, model, force=entry.force)
        elif source.kind == "zero":
            settings[token_id] = TokenSetting(ZERO, force=entry.force)
        else:
            model = index_of(source.model)
            row = source.token_id if source.token_id is not None else vocabs[model].get(source.token)
            if row is None:
                raise RecipeError(f"tokenizer.tokens.{token}: {source.model} has no token {source.token!r}")
            settings[token_id] = TokenSetting(MODEL_TOKEN, model, row, force=entry.force)
    return settings
