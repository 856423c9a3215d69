"""Embedding rows aligned by token: when a merge writes a tokenizer (`tokenizer_source`, `tokenizer:`), every
model's embedding and output-head rows are put in the output vocabulary's order before merging, so that row i
of every model is the same token. A model that lacks a token gets a stand-in row, chosen as mergekit chooses it:
the one model that has the token; else the base model's row; else the average over the models that have it; a
zero row for a token nobody has; or what the recipe's `tokenizer.tokens` says (`force` also replaces the rows of
models that have it). Pure: vocabularies in, index arrays out; reading rows is the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Kinds of stand-in row for a token (per output row).
OWN_ONLY = 0  # no stand-in needed: every model has it (or the row is padding)
FROM_MODEL = 1  # the row of model `source_model` at this token
AVERAGE = 2  # the mean over models that have the token
ZERO = 3
MODEL_TOKEN = 4  # row `source_row` of model `source_model` (another token, named in the recipe)
DEFAULT = -1  # in a TokenSetting: the default rule above, only `force` set


@dataclass(frozen=True)
class TokenSetting:
    """A recipe's `tokenizer.tokens` entry, resolved: where the token's stand-in row comes from."""

    kind: int  # FROM_MODEL, ZERO, MODEL_TOKEN, or DEFAULT (the default rule)
    model: int | None = None  # index into the aligned models
    row: int | None = None  # for MODEL_TOKEN: the source model's row
    force: bool = False


@dataclass
class VocabAlignment:
    """How the output's rows of a vocabulary-indexed tensor are made from each model's rows.

    `rows[m][i]` is model m's row for output token i (-1: it lacks the token); `kind`, `source_model`,
    `source_row` say what stands in where a model lacks it (or where `forced`). Rows past the vocabulary
    (`pad_to_multiple_of`) are each model's mean row.
    """

    rows: list[np.ndarray]
    kind: np.ndarray
    source_model: np.ndarray
    source_row: np.ndarray
    forced: np.ndarray
    vocab_rows: int  # tokens in the output vocabulary
    total_rows: int  # vocab_rows, padded to pad_to_multiple_of


def model_rows(output_vocab: dict[str, int], model_vocab: dict[str, int], embedded: int) -> np.ndarray:
    """For each output token id, the row of a model whose tokenizer has `model_vocab` and whose embedding holds
    `embedded` rows (-1 where the model lacks the token, or its id lies past its embedding)."""
    rows = np.full(len(output_vocab), -1, dtype=np.int64)
    for token, index in output_vocab.items():
        row = model_vocab.get(token)
        if row is not None and 0 <= row < embedded:
            rows[index] = row
    return rows


def padded_size(tokens: int, multiple: int | None) -> int:
    return tokens if not multiple or tokens % multiple == 0 else tokens + multiple - tokens % multiple


def align(rows: list[np.ndarray], base: int | None, settings: dict[int, TokenSetting],
          pad_to_multiple_of: int | None = None) -> VocabAlignment:
    """The stand-in rule for every output token, given each model's rows (`model_rows`), which model is the base
    (None: none), and the recipe's settings by output token id."""
    tokens = len(rows[0])
    present = np.stack([r >= 0 for r in rows])  # [models, tokens]
    count = present.sum(0)
    kind = np.full(tokens, AVERAGE, dtype=np.int8)
    source_model = np.full(tokens, -1, dtype=np.int64)
    source_row = np.full(tokens, -1, dtype=np.int64)
    forced = np.zeros(tokens, dtype=bool)
    kind[count == len(rows)] = OWN_ONLY
    single = count == 1
    kind[single] = FROM_MODEL
    source_model[single] = present[:, single].argmax(0)
    kind[count == 0] = ZERO
    if base is not None:
        from_base = (count >= 2) & present[base] & (count < len(rows))
        kind[from_base] = FROM_MODEL
        source_model[from_base] = base
    for token, setting in settings.items():
        forced[token] = setting.force
        if setting.kind == DEFAULT:
            continue
        kind[token] = setting.kind
        source_model[token] = -1 if setting.model is None else setting.model
        source_row[token] = -1 if setting.row is None else setting.row
    everyone = (kind == OWN_ONLY) & forced  # forced, by the default rule, though every model has it
    kind[everyone] = AVERAGE if base is None else FROM_MODEL
    source_model[everyone] = -1 if base is None else base
    return VocabAlignment(rows, kind, source_model, source_row, forced, tokens, padded_size(tokens, pad_to_multiple_of))


def runs(indices: np.ndarray) -> list[tuple[int, int, int]]:
    """(position, first row, count) of each stretch of consecutive rows in `indices` (-1 entries skipped): a
    permutation that mostly keeps order is read in a few contiguous reads."""
    out: list[tuple[int, int, int]] = []
    for position, row in enumerate(indices.tolist()):
        if row < 0:
            continue
        if out and out[-1][0] + out[-1][2] == position and out[-1][1] + out[-1][2] == row:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((position, row, 1))
    return out


def stand_in_rows(alignment: VocabAlignment, start: int, stop: int, gathered: list[torch.Tensor],
                  extra: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """The stand-in row of each output token in [start, stop) (zero where none is needed), from every model's
    gathered rows for those tokens (`gathered[m][i]`, garbage where the model lacks the token) and the rows the
    recipe names by id (`extra[(model, row)]`)."""
    stop = min(stop, alignment.vocab_rows)
    out = torch.zeros((max(stop - start, 0), gathered[0].shape[1]), dtype=gathered[0].dtype, device=gathered[0].device)
    kinds = alignment.kind[start:stop]
    present = torch.from_numpy(np.stack([r[start:stop] >= 0 for r in alignment.rows])).to(out.device)
    average = torch.from_numpy(kinds == AVERAGE).to(out.device)
    if bool(average.any()):
        weights = (present & average).to(out.dtype)  # [models, rows]
        total = torch.zeros_like(out)
        for model, rows in enumerate(gathered):
            total.addcmul_(rows[: len(out)], weights[model].unsqueeze(1))
        out = torch.where(average.unsqueeze(1), total / weights.sum(0).clamp(min=1).unsqueeze(1), out)
    for offset in np.flatnonzero(kinds == FROM_MODEL).tolist():
        out[offset] = gathered[int(alignment.source_model[start + offset])][offset]
    for offset in np.flatnonzero(kinds == MODEL_TOKEN).tolist():
        token = start + offset
        out[offset] = extra[(int(alignment.source_model[token]), int(alignment.source_row[token]))]
    return out


def aligned_model_rows(alignment: VocabAlignment, model: int, start: int, stop: int, gathered: torch.Tensor,
                       stand_in: torch.Tensor, mean_row: torch.Tensor | None) -> torch.Tensor:
    """Model `model`'s rows for output tokens [start, stop): its own where it has the token and it is not forced,
    else the stand-in; padding rows are its mean row over the vocabulary."""
    vocab_stop = min(stop, alignment.vocab_rows)
    out = torch.empty((stop - start, gathered.shape[1]), dtype=gathered.dtype, device=gathered.device)
    if vocab_stop > start:
        own = alignment.rows[model][start:vocab_stop] >= 0
        own &= ~alignment.forced[start:vocab_stop]
        mask = torch.from_numpy(own).to(out.device).unsqueeze(1)
        out[: vocab_stop - start] = torch.where(mask, gathered[: vocab_stop - start], stand_in)
    if stop > vocab_stop:
        out[max(vocab_stop - start, 0):] = mean_row
    return out
