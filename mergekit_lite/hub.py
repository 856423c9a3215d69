"""Hub ids in recipes (`model: org/name`, `org/name@revision`) resolved to local snapshots through huggingface_hub,
the library made for it: only the files a merge reads are fetched, into the standard cache, and HF_HOME,
HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN and HF_ENDPOINT mean what they mean there. A local path that exists wins
over a hub id spelled the same way."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import huggingface_hub
from huggingface_hub import errors

from mergekit_lite.checkpoint.lora import split_lora_reference
from mergekit_lite.errors import UserError
from mergekit_lite.recipe import Recipe

# org/name, optionally @revision (a branch, tag or commit); no path-like prefixes
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]{1,255}))?$")
# What a merge reads from a repository: weights (safetensors), configs, tokenizer and generation files.
NEEDED_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                "*.tiktoken", "chat_template.jinja", "preprocessor_config.json", "adapter_config.json"]
PICKLED_FILES = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]


@dataclass(frozen=True)
class HubSource:
    """A hub id as the recipe wrote it, and the snapshot it resolved to."""

    reference: str
    repo_id: str
    revision: str
    commit: str
    path: str


def hub_id(reference: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `reference` names a hub repository and no local path of that name exists."""
    if Path(reference).expanduser().exists() or reference.startswith((".", "/", "~")):
        return None
    match = HUB_ID.match(reference)
    if match is None or ".." in reference:
        return None
    return match.group("repo"), match.group("revision")


def fetch(reference: str, allow_pickle: bool = False) -> HubSource:
    """The local snapshot of a hub id, downloaded into the cache when it is not there (offline: the cache only)."""
    found = hub_id(reference)
    if found is None:
        raise UserError(f"{reference}: not a hub id (org/name or org/name@revision) and no such path")
    repo_id, revision = found
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        path = huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                 allow_patterns=NEEDED_FILES + (PICKLED_FILES if allow_pickle else []))
    except errors.RevisionNotFoundError:
        raise UserError(f"{reference}: the hub has no revision {revision!r} of {repo_id}") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError):
        raise UserError(f"{reference}: no local directory of that name, and no such repository on the hub (or it is "
                        "private or gated: set HF_TOKEN, or run `hf auth login`, if you have access)") from None
    except errors.LocalEntryNotFoundError:
        raise UserError(f"{reference}: no local directory of that name; as a hub id it is not in the Hugging Face "
                        "cache, and the hub cannot be reached (offline, or HF_HUB_OFFLINE is set); fetch it first where "
                        f"there is a network: {command}") from None
    except errors.HfHubHTTPError as exc:
        raise UserError(f"{reference}: the hub refused: {str(exc).splitlines()[0]}") from None
    snapshot = Path(path)
    return HubSource(reference, repo_id, revision or "main", snapshot.name, str(snapshot))


def map_references(recipe: Recipe, change: Callable[[str], str]) -> None:
    """Apply `change` to every model reference of the recipe (models, slices, base_model, tokenizer sources; both
    sides of `base+adapter`), in place."""

    def each(reference: str | None) -> str | None:
        if reference is None:
            return None
        lora = split_lora_reference(reference)
        if lora is not None:
            return "+".join(change(side) for side in lora)
        return change(reference)

    for entry in recipe.models:
        entry.model = each(entry.model)
    for piece in recipe.slices or []:
        for source in piece.sources:
            source.model = each(source.model)
        piece.base_model = each(piece.base_model)
    recipe.base_model = each(recipe.base_model)
    if recipe.tokenizer_source not in (None, "base", "union"):
        recipe.tokenizer_source = each(recipe.tokenizer_source)
    if recipe.tokenizer is not None:
        if recipe.tokenizer.source not in ("base", "union"):
            recipe.tokenizer.source = each(recipe.tokenizer.source)
        for entry in recipe.tokenizer.tokens.values():
            if isinstance(entry.source, str):
                entry.source = each(entry.source)
            elif entry.source is not None and entry.source.model is not None:
                entry.source.model = each(entry.source.model)


def resolve_hub_ids(recipe: Recipe, allow_pickle: bool = False) -> None:
    """Every hub id among the recipe's model references (models, base_model, tokenizer_source) replaced by its
    local snapshot, each fetched once; the recipe keeps what it resolved (`Recipe.hub_sources`) for the report
    and the model card."""
    found: dict[str, HubSource] = {}

    def local(reference: str) -> str:
        if hub_id(reference) is not None and reference not in found:
            found[reference] = fetch(reference, allow_pickle)
        return found[reference].path if reference in found else reference

    map_references(recipe, local)
    recipe.hub_sources.extend({"reference": s.reference, "repo_id": s.repo_id, "revision": s.revision,
                               "commit": s.commit, "path": s.path} for s in found.values())


def local_reference(reference: str, allow_pickle: bool = False) -> str:
    """A hub id's local snapshot (fetched into this machine's cache when missing); a path unchanged."""
    return fetch(reference, allow_pickle).path if hub_id(reference) is not None else reference


def pinned(recipe: Recipe) -> Recipe:
    """A copy of a resolved recipe whose hub snapshots are written back as `repo_id@commit`: for a task on another
    machine to resolve in its own cache (resolve_hub_ids), to the very files this machine resolved."""
    pins = {source["path"]: f"{source['repo_id']}@{source['commit']}" for source in recipe.hub_sources}
    copy = recipe.model_copy(deep=True)
    map_references(copy, lambda reference: pins.get(reference, reference))
    return copy
