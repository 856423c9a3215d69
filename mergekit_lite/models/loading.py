"""Building and loading models from checkpoints.

timm checkpoints in the hub layout (config.json with `architecture`, optional `model_args`), plain MLPs
(config.json with `"mergekit_lite_mlp": [in, hidden..., out]`) and transformers checkpoints (through their own
class). A merged checkpoint wider than its source loads the same way: modules take the shapes the weights have.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import torch

from mergekit_lite.checkpoint import open_checkpoint
from mergekit_lite.checkpoint.files import load_json, roots_of
from mergekit_lite.errors import UserError, one_line


def import_timm(submodule: str = "") -> ModuleType:
    """timm, which timm checkpoints (PLeaS, Twin-Merging on vision models) need and tensor-wise merges do not: an
    optional extra. Missing, or broken by a torchvision built for another torch, it is an environment problem
    with one line saying what to install, not a bug."""
    try:
        return importlib.import_module("timm" + (f".{submodule}" if submodule else ""))
    except ImportError as exc:
        if getattr(exc, "name", None) in ("timm", "torchvision"):
            raise UserError("timm models need timm and torchvision, which are not installed: "
                            "pip install 'mergekit_lite[vision]'") from None
        raise _mismatch(exc) from None
    except RuntimeError as exc:  # torchvision's compiled operators do not load into this torch
        raise _mismatch(exc) from None


def _mismatch(exc: Exception) -> UserError:
    return UserError(f"timm could not be imported with torch {torch.__version__} ({one_line(exc, limit=200)}): "
                     "install the torchvision release built for this torch (see pytorch.org's version table), "
                     "e.g. pip install 'torchvision==<the matching version>'")


def resize_to(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Give every module the shapes that `state` holds (a merged model may be wider): size attributes of conv,
    linear, norm and embedding modules, then every parameter and buffer (tied ones stay tied)."""
    for name, module in model.named_modules():
        weight = state.get(f"{name}.weight")
        current = getattr(module, "weight", None)
        if weight is None or not isinstance(current, torch.Tensor) or weight.shape == current.shape:
            continue
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
            module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
        elif isinstance(module, torch.nn.Linear):
            module.out_features, module.in_features = weight.shape
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.num_features = weight.shape[0]
        elif isinstance(module, torch.nn.LayerNorm):
            module.normalized_shape = tuple(weight.shape)
        elif isinstance(module, torch.nn.Embedding):
            module.num_embeddings, module.embedding_dim = weight.shape
    for name, module in model.named_modules():  # timm attention reads its head count from attributes
        qkv = state.get(f"{name}.qkv.weight")
        if qkv is not None and isinstance(getattr(module, "num_heads", None), int) and getattr(module, "head_dim", None):
            module.num_heads = qkv.shape[0] // (3 * module.head_dim)
            if hasattr(module, "attn_dim"):
                module.attn_dim = module.num_heads * module.head_dim
    replaced: dict[int, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for key, value in list(module.named_parameters(recurse=False)):
            target = state.get(prefix + key)
            if target is not None and target.shape != value.shape:
                if id(value) not in replaced:
                    replaced[id(value)] = torch.nn.Parameter(torch.empty_like(target), requires_grad=value.requires_grad)
                setattr(module, key, replaced[id(value)])
        for key, value in list(module.named_buffers(recurse=False)):
            target = state.get(prefix + key)
            if value is not None and target is not None and target.shape != value.shape:
                module.register_buffer(key, torch.empty_like(target))
    return model


def read_config(path: Path) -> dict:
    directory = path if path.is_dir() else path.parent
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: PLeaS needs a config.json to build the model (timm hub layout or a plain MLP)")
    config = load_json(config_file, roots_of(directory), "config.json")
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: must hold a JSON object")
    return config


# timm arguments that make create_model read a file (torch.load, unpickling) or reach the network.
LOADING_ARGUMENTS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                     "pretrained_strict", "overlay", "file", "url", "hf_hub_id")
# A config may claim any size; one that describes more parameters than this many times the checkpoint holds
# (plus a margin for tiny models) is refused before a byte is allocated.
SIZE_MARGIN = 4
SIZE_SLACK = 1_000_000


def build_model(config: dict, path: Path, parameters: int | None = None) -> torch.nn.Module:
    """The source model's module, built on the meta device first to check that the config's claimed size
    agrees with the `parameters` its checkpoint holds (a config naming huge layers would otherwise allocate
    gigabytes), then for real."""
    if parameters is not None:
        with torch.device("meta"):
            claimed = sum(p.numel() for p in _build(config, path).parameters())
        if claimed > SIZE_MARGIN * parameters + SIZE_SLACK:
            raise UserError(f"{path}: config.json describes a model of {claimed:,} parameters but the checkpoint holds "
                            f"{parameters:,}; the config does not belong to these weights")
    return _build(config, path)


def _build(config: dict, path: Path) -> torch.nn.Module:
    if "mergekit_lite_mlp" in config:
        sizes = config["mergekit_lite_mlp"]
        if not (isinstance(sizes, list) and len(sizes) >= 2 and all(type(n) is int and n > 0 for n in sizes)):
            raise UserError(f"{path}: mergekit_lite_mlp must list at least two positive layer sizes")
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        return torch.nn.Sequential(*layers)
    if "architecture" in config:
        timm = import_timm()
        args = config.get("model_args") or {}
        if not isinstance(args, dict):
            raise UserError(f"{path}: config.json model_args must be an object")
        loading = sorted(set(args) & set(LOADING_ARGUMENTS))
        if loading:
            raise UserError(f"{path}: config.json model_args.{loading[0]} would make timm load weights from elsewhere; "
                            "remove it (the weights come from this checkpoint)")
        args = dict(args)
        args.setdefault("num_classes", config.get("num_classes", 1000))
        try:
            return timm.create_model(str(config["architecture"]), pretrained=False, **args)
        except Exception as exc:  # timm raises many kinds for unknown names and arguments
            raise UserError(f"{path}: timm cannot build {config['architecture']!r}: {one_line(exc)}") from exc
    kind = config.get("model_type", "unknown")
    raise UserError(f"{path}: PLeaS works on timm models, plain MLPs and Llama-style transformers checkpoints; a {kind!r} checkpoint without a transformers class is not supported")


def load_transformers_model(path: Path, config: dict, parameters: int, allow_pickle: bool = False) -> torch.nn.Module:
    """A transformers checkpoint through its own class (config `architectures`), never remote code, and pickled
    weights only with `allow_pickle`."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise UserError(f"{path}: transformers has no class {names[0] if names else '(none named)'!r} for this checkpoint")
    directory = path if path.is_dir() else path.parent
    widths = config.get("pleas") or {}
    try:
        model_config = cls.config_class.from_pretrained(directory)
        with torch.device("meta"):
            claimed = sum(p.numel() for p in cls(model_config).parameters())
        if claimed > SIZE_MARGIN * parameters + SIZE_SLACK:
            raise UserError(f"{path}: config.json describes a model of {claimed:,} parameters but the checkpoint holds "
                            f"{parameters:,}; the config does not belong to these weights")
        if widths.get("group_widths", []) == widths.get("source_group_widths", []):
            return cls.from_pretrained(directory, torch_dtype=torch.float32, use_safetensors=not allow_pickle).eval()
        # a PLeaS merge wider than its sources: layers of their own widths, which the config cannot state
        model = cls(model_config).float()
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"{path}: transformers cannot load it: {one_line(exc)}") from exc
    return _load_resized(model, path, allow_pickle)


def _load_resized(model: torch.nn.Module, path: Path, allow_pickle: bool = False) -> torch.nn.Module:
    """Load a checkpoint into `model`, giving its modules the shapes the checkpoint's tensors have."""
    ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
    try:
        state = {name: ckpt.get(name) for name in ckpt.tensors}
    finally:
        ckpt.close()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]!r}")
    state = {name: state[name].to(expected[name].dtype) for name in expected}
    resize_to(model, state)
    model.load_state_dict(state)
    return model.eval()


def is_transformers(config: dict) -> bool:
    return "model_type" in config and "architecture" not in config


def load_model(path: str | Path, allow_pickle: bool = False, transformers_ok: bool = False) -> torch.nn.Module:
    """A source or merged checkpoint as an eval-mode torch module (transformers ones only where the caller
    handles them). The checkpoint is opened (and its files checked) before anything reads it."""
    path = Path(path)
    config = read_config(path)
    ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
    parameters = ckpt.num_parameters
    ckpt.close()
    if transformers_ok and is_transformers(config):
        return load_transformers_model(path, config, parameters, allow_pickle)
    return _load_resized(build_model(config, path, parameters), path, allow_pickle)
