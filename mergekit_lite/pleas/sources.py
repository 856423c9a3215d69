"""Building source models and data for PLeaS, and loading what it writes.

Models: timm checkpoints in the hub layout (config.json with `architecture`, optional `model_args`), plain
MLPs (config.json with `"mergekit_lite_mlp": [in, hidden..., out]`) and transformers checkpoints (through
their own class). A merged checkpoint wider than its source loads the same way: modules take the shapes the
weights have.

Data: a tensor file (.safetensors, .npy or .pt, one tensor of inputs), an image folder read with timm's
data tools and the model's own preprocessing, a text file read with the checkpoint's tokenizer, or generic
inputs made here (smooth random images, Gaussian vectors or random token ids: the data-free mode).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from mergekit_lite.checkpoint import open_checkpoint
from mergekit_lite.checkpoint.files import checked_file, load_json, read_limited, roots_of
from mergekit_lite.errors import UserError, one_line
from mergekit_lite.pleas.method import resize_to
from mergekit_lite.pleas.synthetic import batch_norm_layers, statistics_matched


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
        import timm

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


GENERIC_TOKENS = 64  # length of a data-free token window


def example_inputs(config: dict, count: int, seed: int = 0) -> torch.Tensor:
    """A few inputs of the model's kind: token ids for transformers checkpoints, else Gaussian inputs."""
    gen = torch.Generator().manual_seed(seed)
    if is_transformers(config):
        return torch.randint(0, int(config.get("vocab_size", 2)), (count, 16), generator=gen)
    return torch.randn(count, *input_shape(config), generator=gen)


def recorded_input_shape(config: dict) -> tuple[int, ...] | None:
    """One input's shape as the config records it (MLP input size; timm's `model_args.img_size` or
    `pretrained_cfg.input_size`), or None: the tool does not guess what size a model was trained at."""
    if "mergekit_lite_mlp" in config:
        return (config["mergekit_lite_mlp"][0],)
    args = config.get("model_args") or {}
    size = (config.get("pretrained_cfg") or {}).get("input_size")
    side = args.get("img_size", config.get("input_size_override", size[1] if size else None))
    if side is None:
        return None
    side = side if isinstance(side, int) else side[0]
    return (args.get("in_chans", size[0] if size else 3), side, side)


def input_shape(config: dict) -> tuple[int, ...]:
    """A shape to probe the model with (two samples in the permutation self-check): the recorded one, else
    224 px images."""
    return recorded_input_shape(config) or (3, 224, 224)


def generic_shape(data: dict | None, config: dict, path: Path) -> tuple[int, ...]:
    """The shape of data-free generic inputs: `data.shape`, else the one the config records; otherwise one line
    asking for it, before any work (a guess of 224 px for a model trained at 32 px costs 50 times the compute
    and says nothing of the model)."""
    given = (data or {}).get("shape")
    if given:
        return tuple(given)
    recorded = recorded_input_shape(config)
    if recorded is None:
        raise UserError(f"{path}: config.json does not record the input size; give it for data-free inputs, e.g. "
                        "data: {kind: generic, shape: [3, 32, 32]}")
    return recorded


def generic_inputs(shape: tuple[int, ...], count: int, seed: int) -> torch.Tensor:
    """Inputs from no task at all: smooth random images (blurred noise with random contrast and offset), or
    Gaussian vectors for flat inputs."""
    gen = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return torch.randn(count, *shape, generator=gen)
    noise = torch.randn(count, *shape, generator=gen)
    kernel = torch.ones(shape[0], 1, 3, 3) / 9
    smooth = torch.nn.functional.conv2d(noise, kernel, padding=1, groups=shape[0])
    smooth = torch.nn.functional.conv2d(smooth, kernel, padding=1, groups=shape[0])
    scale = torch.rand(count, 1, 1, 1, generator=gen) * 2 + 0.5
    offset = torch.randn(count, 1, 1, 1, generator=gen) * 0.5
    return smooth / smooth.std().clamp_min(1e-6) * scale + offset


def tensor_file_inputs(path: Path, key: str | None, allow_pickle: bool = False) -> torch.Tensor:
    """One tensor of inputs from a data file the recipe names; a pickled .pt only with --allow-pickle."""
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".pt", ".safetensors"):
        raise UserError(f"{path}: data files must be .safetensors, .npy or .pt tensors, a text file, or an image folder")
    file = checked_file(path, None, "data file")
    try:
        if suffix == ".npy":
            return _as_inputs(torch.from_numpy(np.load(file, allow_pickle=False)), path)
        if suffix == ".pt":
            if not allow_pickle:
                raise UserError(f"{path}: .pt data is pickled and can run code when loaded; pass --allow-pickle to "
                                "load it with torch.load(weights_only=True), or save it as .safetensors or .npy")
            loaded = torch.load(file, map_location="cpu", weights_only=True)
            if isinstance(loaded, dict):
                if key is not None and key not in loaded:
                    raise UserError(f"{path}: no tensor named {key!r}")
                loaded = loaded[key] if key else next(iter(loaded.values()), None)
            return _as_inputs(torch.as_tensor(loaded), path)
        ckpt = open_checkpoint(file)
        try:
            names = sorted(ckpt.tensors)
            if not names or (key is not None and key not in ckpt.tensors):
                raise UserError(f"{path}: no tensor named {key!r} (it holds {', '.join(names) or 'none'})")
            return _as_inputs(ckpt.get(key or names[0]), path)
        finally:
            ckpt.close()
    except UserError:
        raise
    except Exception as exc:  # numpy and torch raise many kinds for a damaged file
        raise UserError(f"{path}: cannot read data: {one_line(exc)}") from exc


def _as_inputs(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    """Floating inputs in float32; integer ones (token ids) as int64. Anything else, or an empty or non-finite
    tensor, is refused."""
    if tensor.dim() == 0 or len(tensor) == 0:
        raise UserError(f"{path}: holds no samples (shape {list(tensor.shape)}); inputs are one sample per row")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise UserError(f"{path}: holds {str(tensor.dtype).removeprefix('torch.')} values; inputs are real numbers "
                        "(images, features) or integer token ids")
    if tensor.is_floating_point():
        tensor = tensor.float()
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: holds NaN or Inf; refusing to use it as inputs")
        return tensor
    return tensor.long()


MAX_TEXT_BYTES = 1024**3  # a text file is tokenised whole


def text_file_inputs(path: Path, model_dir: Path, config: dict, length: int | None, count: int,
                     seed: int) -> tuple[torch.Tensor, int]:
    """Windows of `length` token ids from a text file, tokenised with the checkpoint's own tokenizer;
    returns (count windows picked at random, windows available)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir}: text data needs the checkpoint's tokenizer files: {exc}") from exc
    context = config.get("n_positions") or config.get("max_position_embeddings") or 128
    length = min(length or 128, int(context))
    text = read_limited(path, None, "text data", MAX_TEXT_BYTES).decode("utf-8", errors="replace")
    ids = torch.as_tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    windows = len(ids) // length
    if windows == 0:
        raise UserError(f"{path}: {len(ids)} tokens, fewer than one window of {length}")
    order = torch.as_tensor(np.random.default_rng(seed).permutation(windows)[:count])
    return ids[: windows * length].view(windows, length)[order], windows


def image_folder_inputs(path: Path, model: torch.nn.Module, count: int, seed: int) -> torch.Tensor:
    """Images from a folder (any depth), with the model's own timm preprocessing."""
    from timm.data import ImageDataset, create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    try:
        dataset = ImageDataset(str(path), transform=transform)
    except RuntimeError:  # timm's word for a folder without images
        dataset = []
    if len(dataset) == 0:
        raise UserError(f"{path}: no images found")
    order = np.random.default_rng(seed).permutation(len(dataset))[:count]
    roots = roots_of(path)
    for index in order:  # regular files inside the folder only: a FIFO would hang the read, a link leak a file
        checked_file(dataset.reader.samples[int(index)][0], roots, "image")
    try:
        return torch.stack([dataset[int(i)][0] for i in order])
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: cannot read its images: {one_line(exc)}") from exc


MIN_SAMPLES = 2  # batch normalisation (in the models and the router) needs two rows to compute statistics


def check_inputs(model: torch.nn.Module, config: dict, inputs: torch.Tensor, path: Path) -> None:
    """Refuse inputs the model cannot take (labels instead of images, the wrong shape, token ids past the
    vocabulary) with one line, by checking their kind and running the model on two of them."""
    if len(inputs) < MIN_SAMPLES:
        raise UserError(f"{path}: {len(inputs)} sample(s); at least {MIN_SAMPLES} are needed")
    if is_transformers(config):
        vocab = int(config.get("vocab_size") or 0)
        if inputs.is_floating_point() or inputs.dim() != 2:
            raise UserError(f"{path}: a transformers model takes rows of integer token ids, not "
                            f"{str(inputs.dtype).removeprefix('torch.')} of shape {list(inputs.shape)}")
        if vocab and (int(inputs.min()) < 0 or int(inputs.max()) >= vocab):
            raise UserError(f"{path}: token ids run from {int(inputs.min())} to {int(inputs.max())}, outside the "
                            f"vocabulary of {vocab}")
    elif not inputs.is_floating_point():
        raise UserError(f"{path}: holds integers of shape {list(inputs.shape)} (labels?); this model takes "
                        "floating-point inputs (images or features), one per row")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs[:MIN_SAMPLES].to(device))
    except Exception as exc:  # a shape the model cannot take: torch raises RuntimeError, IndexError, ValueError ...
        raise UserError(f"{path}: the model cannot run on these inputs (shape {list(inputs.shape)}, "
                        f"{str(inputs.dtype).removeprefix('torch.')}): {one_line(exc)}") from exc
    finally:
        model.train(was_training)


TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".csv", ".py", ".rst")


def data_batches(data: dict | None, model: torch.nn.Module, config: dict, samples: int, batch_size: int, seed: int,
                 data_free: bool, model_dir: Path | None = None,
                 statistics_of: list[torch.nn.Module] | None = None,
                 statistics_steps: int = 0, allow_pickle: bool = False,
                 timings: dict[str, float] | None = None, progress=None) -> tuple[list[torch.Tensor], str]:
    """The inputs a model-aware method sees, in batches, and a description for the report (`timings` gets the
    refinement's seconds, a phase of its own). With
    `statistics_steps`, data-free images (generic ones or another domain's) are refined for that many steps to
    match the batch-norm statistics of `statistics_of` (the models being merged), when they have any: another
    domain's images start closer to the task's than noise does, and refined they merge far better than as
    they come (RESULTS.md, experiment 3)."""
    data = dict(data or {})
    kind = data.get("kind")
    path = Path(data["path"]) if data.get("path") else None
    if kind is None and path is not None and path.suffix.lower() in TEXT_SUFFIXES:
        kind = "text"
    if kind is None:
        kind = ("generic" if data_free else None) if path is None else ("images" if path.is_dir() else "tensors")
    if kind == "generic" and is_transformers(config):
        length = int(data.get("length") or GENERIC_TOKENS)
        gen = torch.Generator().manual_seed(seed)
        inputs = torch.randint(0, int(config["vocab_size"]), (samples, length), generator=gen)
        described = f"random token ids, {samples} windows of {length} (data-free)"
    elif kind == "generic":
        shape = generic_shape(data, config, model_dir or Path("model"))
        inputs, described = generic_inputs(shape, samples, seed), f"generic inputs of shape {list(shape)} (data-free)"
    elif path is None:
        raise UserError("PLeaS needs data: give data.path (a tensor file or an image folder), or data_free: true")
    elif not path.exists():
        raise UserError(f"{path}: data not found")
    elif kind == "images":
        inputs, described = image_folder_inputs(path, model, samples, seed), f"images from {path}"
    elif kind == "tensors":
        inputs = tensor_file_inputs(path, data.get("key"), allow_pickle)
        order = torch.as_tensor(np.random.default_rng(seed).permutation(len(inputs))[:samples])
        inputs, described = inputs[order], f"tensors from {path}"
    elif kind == "text":
        if model_dir is None or not is_transformers(config):
            raise UserError(f"{path}: text data needs a transformers checkpoint with a tokenizer")
        inputs, windows = text_file_inputs(path, model_dir, config, data.get("length"), samples, seed)
        described = f"text from {path} ({windows} windows of {inputs.shape[1]} tokens available)"
    else:
        raise UserError(f"data.kind {kind!r}: use tensors, images, text or generic")
    check_inputs(model, config, inputs, path if path is not None else Path("generic inputs"))
    if data_free and kind != "generic":
        described += " (data-free: inputs from another domain)"
    if (data_free or kind == "generic") and statistics_of and statistics_steps > 0 and inputs.is_floating_point() \
            and inputs.dim() > 2:
        if any(batch_norm_layers(m) for m in statistics_of):
            started = time.perf_counter()
            if progress is not None and hasattr(progress, "note"):
                progress.note(f"refining {len(inputs)} data-free inputs: {statistics_steps} Adam steps per batch of up "
                              "to 256, each a forward and backward pass of both models")
            inputs = statistics_matched(statistics_of, inputs, steps=statistics_steps, progress=progress)
            described += ", refined to match the models' batch-norm statistics"
            if timings is not None:
                timings["refine"] = time.perf_counter() - started
    return [inputs[i: i + batch_size] for i in range(0, len(inputs), batch_size)], described
