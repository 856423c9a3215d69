"""The inputs PLeaS and Twin-Merging run models on.

A tensor file (.safetensors, .npy or .pt, one tensor of inputs), an image folder read with timm's data tools
and the model's own preprocessing, a text file read with the checkpoint's tokenizer, or generic inputs made here
(smooth random images, Gaussian vectors or random token ids: the data-free mode), refined for models with batch
norms so that every layer sees the statistics it stored.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from mergekit_lite.checkpoint import open_checkpoint
from mergekit_lite.checkpoint.files import checked_file, read_limited, roots_of
from mergekit_lite.errors import UserError, one_line
from mergekit_lite.models.loading import import_timm, is_transformers
from mergekit_lite.models.synthetic import batch_norm_layers, statistics_matched
from mergekit_lite.pipeline import Progress

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
    timm_data = import_timm("data")
    ImageDataset, create_transform, resolve_data_config = (timm_data.ImageDataset, timm_data.create_transform,
                                                            timm_data.resolve_data_config)
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
                 timings: dict[str, float] | None = None,
                 progress: Progress | None = None) -> tuple[list[torch.Tensor], str]:
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
