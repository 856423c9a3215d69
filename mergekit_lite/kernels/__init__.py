"""Fused C kernels for the CPU hot loops, compiled on first use and cached; the torch path is the fallback.

A TIES merge done op by op in torch makes about 25 passes over memory per expert element; the kernels in
`kernels.c` make two or three, with the same float32 arithmetic in the same order, so both paths give the
same bits. They need a C compiler (`$CC`, else `cc`) once per machine: the shared library is cached under
`$MERGEKIT_LITE_CACHE` (default `~/.cache/mergekit_lite`), keyed by the source and the compiler flags.
Without a compiler, or with `MERGEKIT_LITE_KERNELS=0`, everything runs on the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-trapping-math"]
# Below this many elements a second thread costs more than it saves.
_SPLIT_MIN = 1 << 16

_i64, _f32, _i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_int32
_ptr = ctypes.c_void_p
_SIGNATURES = {
    "task_vector_magnitudes": [_ptr, _ptr, _ptr, _i32, _i64, _ptr],
    "count_brackets": [_ptr, _i64, _ptr, _i32, _ptr],
    "collect_bands": [_ptr, _i64, _ptr, _ptr, _i32, _ptr, _ptr],
    "widen_bfloat16": [_ptr, _ptr, _i64],
    "ties_merge": [_ptr, _ptr, _i32, _i64, _i32, _ptr, _ptr, _i32, _f32, _f32, _ptr, _ptr, _ptr, _ptr],
    "dare_merge": [_ptr, _ptr, _i32, _i64, _i32, _i64, _ptr, _ptr, _i32, _ptr, _i32, _i32, _f32, _f32, _f32, _ptr,
                   _ptr, _ptr, _ptr, _ptr],
    "rank_probabilities": [_ptr, _i64, _i64, _f32, _f32, _ptr],
    "ram_counts": [_ptr, _ptr, _i32, _i64, _i32, _i32, _f32, _ptr, _ptr],
    "ram_merge": [_ptr, _ptr, _i32, _i64, _i32, _i32, _f32, _ptr, _ptr, _ptr, _ptr],
    "sce_merge": [_ptr, _ptr, _i32, _i64, _i32, _ptr, _f32, _i32, _ptr, _f32, _ptr, _ptr],
    "random_drop": [_ptr, _ptr, _i64, _i64, ctypes.c_uint64, _i64, _i32],
    "weighted_sum": [_ptr, _i32, _i64, _i32, _ptr, _f32, _ptr, _ptr, _ptr],
    "nearswap_merge": [_ptr, _ptr, _i64, _i32, _f32, _ptr, _ptr, _ptr],
    "block_gram": [_ptr, _i32, _i64, _i64, _i64, _i64, _i64, _ptr],
}


def enabled() -> bool:
    return os.environ.get("MERGEKIT_LITE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    configured = os.environ.get("MERGEKIT_LITE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergekit_lite"


def _compile(source: Path, target: Path) -> None:
    """Build into a temporary file, then rename: concurrent first runs never see a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *FLAGS, str(source), "-o", str(built), "-lm"]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:  # no per-CPU builds (target_clones) with this compiler: one build
            subprocess.run([*command, "-DMERGEKIT_NO_CLONES"], check=True, capture_output=True, timeout=120)
        os.replace(built, target)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they are disabled or cannot be built here."""
    if not enabled():
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + platform.machine().encode()).hexdigest()
    target = _cache_dir() / f"kernels-{key[:16]}.so"
    try:
        if not target.exists():
            _compile(SOURCE, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        log.info("fused kernels unavailable (%s); using the torch path", error)
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    lib.widen_bfloat16.restype = _i64
    lib.rank_probabilities.restype = _i32
    lib.random_drop.restype = _i64
    lib.ties_merge.restype = _i32
    lib.dare_merge.restype = _i32
    lib.ram_counts.restype = _i32
    lib.ram_merge.restype = _i32
    lib.sce_merge.restype = _i32
    return lib


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can work on these tensors: CPU, float32, contiguous, and the library built."""
    for tensor in tensors:
        if tensor is None or tensor.device.type != "cpu" or tensor.dtype != torch.float32 or not tensor.is_contiguous():
            return False
    return library() is not None


def usable_stored(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels that also read rows as stored can work on these: CPU, contiguous, all float32 or all
    bfloat16, and the library built."""
    dtypes = {tensor.dtype for tensor in tensors if tensor is not None}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.bfloat16}:
        return False
    for tensor in tensors:
        if tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return False
    return library() is not None


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="mergekit-kernel")


def _parts(n: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges, one per worker thread (ctypes calls run without the GIL)."""
    workers = max(1, torch.get_num_threads()) if n >= _SPLIT_MIN else 1
    step = -(-n // workers)
    return [(start, min(n, start + step)) for start in range(0, n, step)] or [(0, 0)]


def _stored_bf16(tensor: torch.Tensor) -> int:
    """The kernels' flag for rows as stored in bfloat16 (1) rather than float32 (0)."""
    return int(tensor.dtype == torch.bfloat16)


def _part_counters(parts: list) -> list[ctypes.c_int64]:
    """One counter per thread's part (e.g. of NaN and Inf found), for a kernel to add to."""
    return [ctypes.c_int64(0) for _ in parts]


def _total(counters: list) -> int:
    return sum(counter.value for counter in counters)


def _address(tensor: torch.Tensor, offset: int) -> int:
    return tensor.data_ptr() + offset * tensor.element_size()


def _pointers(tensors: list[torch.Tensor], offset: int):
    return (ctypes.c_void_p * len(tensors))(*[_address(t, offset) for t in tensors])


def task_vector_magnitudes(base: torch.Tensor, experts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[float]]:
    """In place, experts -= base; returns (|task vector| of each expert, flattened; squared norms)."""
    lib = library()
    n = base.numel()
    magnitudes = [torch.empty(n, dtype=torch.float32) for _ in experts]
    sums = [(ctypes.c_double * len(experts))() for _ in _parts(n)]

    def work(start: int, stop: int, part: int) -> None:
        lib.task_vector_magnitudes(_address(base, start), _pointers(experts, start), _pointers(magnitudes, start),
                                   len(experts), stop - start, sums[part])

    _run_parts(n, work)
    return magnitudes, [sum(s[t] for s in sums) for t in range(len(experts))]


def _run_parts(n: int, work: Callable[[int, int, int], None]) -> None:
    parts = _parts(n)
    if len(parts) == 1:
        work(*parts[0], 0)
        return
    for future in [_pool().submit(work, start, stop, index) for index, (start, stop) in enumerate(parts)]:
        future.result()


def _run_units(units: int, elements: int, work: Callable[[int, int], None]) -> None:
    """work(first, last) over `units` whole units (rows, blocks) of `elements` entries in all, one contiguous run of
    units per worker thread."""
    step = -(-units // len(_parts(elements))) if units else 1
    jobs = [(first, min(units, first + step)) for first in range(0, units, step)]
    if len(jobs) == 1:
        work(*jobs[0])
        return
    for future in [_pool().submit(work, first, last) for first, last in jobs]:
        future.result()


def count_brackets(values: torch.Tensor, brackets: list[tuple[float, float, float]]) -> list[list[int]]:
    """Per bracket (lo, guess, hi): [#values > hi, #values > guess, #values >= guess, #values >= lo], all in one
    pass."""
    lib = library()
    n, count = values.numel(), len(brackets)
    points = (ctypes.c_float * (3 * count))(*[point for bracket in brackets for point in bracket])
    counts = [(ctypes.c_int64 * (4 * count))() for _ in _parts(n)]

    def work(start: int, stop: int, part: int) -> None:
        lib.count_brackets(_address(values, start), stop - start, points, count, counts[part])

    _run_parts(n, work)
    return [[sum(c[4 * j + i] for c in counts) for i in range(4)] for j in range(count)]


def collect_bands(values: torch.Tensor, bands: list[tuple[float, float, bool, bool]]) -> list[torch.Tensor]:
    """Per band (lo, hi, include_lo, include_hi): the entries of a flat float32 tensor in it, in order, as a new
    tensor; all bands in one pass per thread's part."""
    lib = library()
    parts, count = _parts(values.numel()), len(bands)
    bounds = (ctypes.c_float * (2 * count))(*[bound for band in bands for bound in band[:2]])
    include = (ctypes.c_int32 * (2 * count))(*[int(flag) for band in bands for flag in band[2:]])
    # room for every entry in every band; only the pages of what is kept are touched
    scratch = [torch.empty(values.numel(), dtype=torch.float32) for _ in bands]
    found = [(ctypes.c_int64 * count)() for _ in parts]

    def work(start: int, stop: int, part: int) -> None:
        outs = (ctypes.c_void_p * count)(*[_address(out, start) for out in scratch])
        lib.collect_bands(_address(values, start), stop - start, bounds, include, count, outs, found[part])

    _run_parts(values.numel(), work)
    return [torch.cat([out[start:start + kept[j]] for (start, _), kept in zip(parts, found)])
            for j, out in enumerate(scratch)]


def _merge_stats(count: int, kept: list, tallies: list, sums: list, nonfinite: list) -> dict:
    """The per-thread counters of ties_merge / dare_merge, added up."""
    total = lambda arrays, j: sum(a[j] for a in arrays)  # noqa: E731
    return {
        "kept": [total(kept, t) for t in range(count)],
        "any_kept": total(tallies, 0),
        "disagreed": total(tallies, 1),
        "delta_sq": [total(sums, t) for t in range(count)],
        "change_sq": total(sums, count),
        "result_sq": total(sums, count + 1),
        "nonfinite_inputs": _total(nonfinite),
    }


def _run_failing(n: int, work: Callable[[int, int, int], int], what: str) -> None:
    """_run_parts for a kernel that returns -1 when it finds no scratch memory (a MemoryError here)."""
    failed = []

    def checked(start: int, stop: int, part: int) -> None:
        if work(start, stop, part) != 0:
            failed.append(start)

    _run_parts(n, checked)
    if failed:
        raise MemoryError(f"{what}: no scratch memory")


def _run_merge(n: int, count: int, call: Callable[..., int]) -> tuple[list, list, list, list]:
    """Run a merge kernel over the threads' parts: call(start, stop, kept, tallies, sums, nonfinite) per part, each
    with its own counters; a kernel short of scratch memory is a MemoryError."""
    parts = _parts(n)
    kept = [(ctypes.c_int64 * count)() for _ in parts]
    tallies = [(ctypes.c_int64 * 2)() for _ in parts]
    sums = [(ctypes.c_double * (count + 2))() for _ in parts]
    nonfinite = _part_counters(parts)
    _run_failing(n, lambda start, stop, part: call(start, stop, kept[part], tallies[part], sums[part],
                                                   ctypes.byref(nonfinite[part])),
                 f"merge kernel for {count} experts")
    return kept, tallies, sums, nonfinite


def ties_merge(base: torch.Tensor, experts: list[torch.Tensor], are_deltas: bool, thresholds: list[float],
               weights: list[float], normalize: bool, scale: float) -> tuple[torch.Tensor, dict]:
    """The whole TIES chunk in one pass; the result is written over experts[0]. Returns it with
    kept (per expert), any_kept, disagreed, delta_sq (per expert), change_sq and result_sq."""
    lib = library()
    count, out = len(experts), experts[0]
    threshold_array = (ctypes.c_float * count)(*thresholds)
    weight_array = (ctypes.c_float * count)(*weights)

    def call(start: int, stop: int, *counters) -> int:  # float32 inputs: no count of NaN and Inf to make
        return lib.ties_merge(_address(base, start), _pointers(experts, start), count, stop - start, int(are_deltas),
                              threshold_array, weight_array, int(normalize), min(weights), scale,
                              _address(out, start), *counters[:3])

    return out, _merge_stats(count, *_run_merge(base.numel(), count, call))


def dare_merge(base: torch.Tensor, experts: list[torch.Tensor], seeds: list[int], densities: list[float],
               rescale: bool, weights: list[float], elect: bool, normalize: bool, scale: float
               ) -> tuple[torch.Tensor, dict]:
    """DARE's whole chunk in one pass: random drop of each task vector (draw i of stream seeds[t]; a density of
    1 or more keeps all), rescale, weights, then the TIES election (elect) or the sum (normalize: divided by the
    weights' sum, unless it is about 0), scale, base. The bits of the torch path (sparsify.random_keep, then
    merge_task_vectors). The inputs in float32, or all as stored in bfloat16 (as ram_merge). Written over
    experts[0], returned with the stats of ties_merge (whose nonfinite_inputs counts NaN and Inf in bfloat16
    inputs)."""
    lib = library()
    count, out = len(experts), experts[0]
    seed_array = (ctypes.c_uint64 * count)(*seeds)
    density_array = (ctypes.c_float * count)(*densities)
    weight_array = (ctypes.c_float * count)(*weights)
    weight_sum = float(sum(weights))
    divisor = weight_sum if normalize and not elect and abs(weight_sum) >= 1e-8 else 0.0
    bf16 = _stored_bf16(base)

    def call(start: int, stop: int, *counters) -> int:
        return lib.dare_merge(_address(base, start), _pointers(experts, start), count, stop - start, bf16, start,
                              seed_array, density_array, int(rescale), weight_array, int(elect), int(normalize),
                              min(weights), divisor, scale, _address(out, start), *counters)

    return out, _merge_stats(count, *_run_merge(base.numel(), count, call))


def weighted_sum(models: list[torch.Tensor], weights: list[float], divisor: float) -> tuple[torch.Tensor, dict]:
    """Linear's chunk in one pass: sum_t weights[t] * models[t] (products rounded, added in order), divided by
    `divisor` unless it is 0; the bits of methods/linear.py's torch path. The models in float32, or all as stored
    in bfloat16 (as ram_merge). Written over models[0]; returned with result_sq and nonfinite_inputs."""
    lib = library()
    count, out, n = len(models), models[0], models[0].numel()
    weight_array = (ctypes.c_float * count)(*weights)
    bf16 = _stored_bf16(out)
    parts = _parts(n)
    sums = [ctypes.c_double(0.0) for _ in parts]
    nonfinite = _part_counters(parts)

    def work(start: int, stop: int, part: int) -> None:
        lib.weighted_sum(_pointers(models, start), count, stop - start, bf16, weight_array, divisor,
                         _address(out, start), ctypes.byref(sums[part]), ctypes.byref(nonfinite[part]))

    _run_parts(n, work)
    return out, {"result_sq": sum(s.value for s in sums), "nonfinite_inputs": _total(nonfinite)}


def nearswap_merge(base: torch.Tensor, other: torch.Tensor, t: float) -> tuple[torch.Tensor, dict]:
    """NearSwap over a chunk in one pass, the bits of methods/nearswap.py's torch path; float32 or both bfloat16 as
    stored (as ram_merge). Written over `other`; returned with change_sq, result_sq and nonfinite_inputs."""
    lib = library()
    n = base.numel()
    bf16 = _stored_bf16(base)
    parts = _parts(n)
    sums = [(ctypes.c_double * 2)() for _ in parts]
    nonfinite = _part_counters(parts)

    def work(start: int, stop: int, part: int) -> None:
        lib.nearswap_merge(_address(base, start), _address(other, start), stop - start, bf16, t,
                           _address(other, start), sums[part], ctypes.byref(nonfinite[part]))

    _run_parts(n, work)
    return other, {"change_sq": sum(s[0] for s in sums), "result_sq": sum(s[1] for s in sums),
                   "nonfinite_inputs": _total(nonfinite)}


def ram_counts(base: torch.Tensor, experts: list[torch.Tensor], are_deltas: bool, epsilon: float
               ) -> tuple[list[int], list[int]]:
    """RAM+'s counts, per model: entries it changed (|task vector| > epsilon) along with another model, and alone.
    The inputs in float32, or all as stored in bfloat16."""
    lib = library()
    count = len(experts)
    parts = _parts(base.numel())
    shared = [(ctypes.c_int64 * count)() for _ in parts]
    unique = [(ctypes.c_int64 * count)() for _ in parts]
    bf16 = _stored_bf16(base)
    _run_failing(base.numel(), lambda start, stop, part: lib.ram_counts(
        _address(base, start), _pointers(experts, start), count, stop - start, bf16, int(are_deltas), epsilon,
        shared[part], unique[part]), "ram_counts")
    return [sum(s[t] for s in shared) for t in range(count)], [sum(u[t] for u in unique) for t in range(count)]


def _squared_norms(count: int, sums: list) -> dict:
    """The per-thread sums of ram_merge / sce_merge, added up: delta_sq (per expert), change_sq and result_sq."""
    total = [sum(s[j] for s in sums) for j in range(count + 2)]
    return {"delta_sq": total[:count], "change_sq": total[count], "result_sq": total[count + 1]}


def ram_merge(base: torch.Tensor, experts: list[torch.Tensor], are_deltas: bool, epsilon: float,
              scales: list[float] | None) -> tuple[torch.Tensor, dict]:
    """RAM (scales None) or RAM+ over a chunk in one pass, the bits of the torch path (methods/ram.py,
    methods/ramplus_tl.py). The inputs in float32, or all as stored in bfloat16: then they are widened a block at a
    time, and the result is rounded to bfloat16 once, as the torch path's result would be when written. Written over
    experts[0]; returned with the squared norms of each task vector (delta_sq), of the change to the base
    (change_sq) and of the float32 result (result_sq), and how many bfloat16 inputs are NaN or Inf
    (nonfinite_inputs)."""
    lib = library()
    count, out = len(experts), experts[0]
    parts = _parts(base.numel())
    sums = [(ctypes.c_double * (count + 2))() for _ in parts]
    nonfinite = _part_counters(parts)
    scale_array = (ctypes.c_float * count)(*scales) if scales is not None else None
    bf16 = _stored_bf16(base)
    _run_failing(base.numel(), lambda start, stop, part: lib.ram_merge(
        _address(base, start), _pointers(experts, start), count, stop - start, bf16, int(are_deltas), epsilon,
        scale_array, _address(out, start), sums[part], ctypes.byref(nonfinite[part])), "ram_merge")
    return out, {**_squared_norms(count, sums), "nonfinite_inputs": _total(nonfinite)}


def sce_merge(base: torch.Tensor, experts: list[torch.Tensor], are_deltas: bool, variances: torch.Tensor | None,
              threshold: float, none_kept: bool, weights: list[float], min_divisor: float
              ) -> tuple[torch.Tensor, dict]:
    """SCE's merge of a chunk in one pass (entries kept where `variances` >= threshold, all when it is None, none
    with none_kept), the bits of the torch path (methods/sce.py); written over experts[0], returned with the squared
    norms of ram_merge."""
    lib = library()
    count, out = len(experts), experts[0]
    parts = _parts(base.numel())
    sums = [(ctypes.c_double * (count + 2))() for _ in parts]
    weight_array = (ctypes.c_float * count)(*weights)
    _run_failing(base.numel(), lambda start, stop, part: lib.sce_merge(
        _address(base, start), _pointers(experts, start), count, stop - start, int(are_deltas),
        _address(variances, start) if variances is not None else None, threshold, int(none_kept), weight_array,
        min_divisor, _address(out, start), sums[part]), "sce_merge")
    return out, _squared_norms(count, sums)


def widen_bfloat16(raw: torch.Tensor, out: torch.Tensor) -> int:
    """out = raw (bfloat16, contiguous, CPU) as float32; returns how many values are NaN or Inf."""
    lib = library()
    n = raw.numel()
    found = [0] * len(_parts(n))

    def work(start: int, stop: int, part: int) -> None:
        found[part] = lib.widen_bfloat16(_address(raw, start), _address(out, start), stop - start)

    _run_parts(n, work)
    return sum(found)


def rank_probabilities(rows: torch.Tensor, low: float, span: float) -> torch.Tensor:
    """DELLA's keep probabilities of a 2-D tensor: low + span * (rank of |entry| in its row / (width - 1)), ranks
    of equal magnitudes in index order: the bits of sparsify.rank_keep_probabilities' torch path, several times
    faster (a radix sort per row instead of a comparison sort)."""
    lib = library()
    count, width = rows.shape
    out = torch.empty(rows.shape, dtype=torch.float32)
    failed = []

    def work(start: int, stop: int) -> None:
        if lib.rank_probabilities(_address(rows, start * width), stop - start, width, low, span,
                                  _address(out, start * width)) != 0:
            failed.append(start)

    _run_units(count, rows.numel(), work)
    if failed:
        raise MemoryError(f"rank_probabilities: no scratch memory for rows of {width} entries")
    return out


def random_drop(values: torch.Tensor, probability: torch.Tensor | float, seed: int, rescale: bool) -> int:
    """In place: keep `values` where their draws from stream `seed` are below probability (a tensor like values, or
    one number), divided by it when `rescale`, else zero; returns how many were kept. The bits of the torch path
    (sparsify.random_keep), with the draws made in the worker threads."""
    lib = library()
    n = values.numel()
    scalar = not isinstance(probability, torch.Tensor)
    single = (ctypes.c_float * 1)(float(probability)) if scalar else None
    found = [0] * len(_parts(n))

    def work(start: int, stop: int, part: int) -> None:
        where = ctypes.cast(single, ctypes.c_void_p) if scalar else _address(probability, start)
        found[part] = lib.random_drop(_address(values, start), where, 0 if scalar else 1, stop - start, seed, start,
                                      int(rescale))

    _run_parts(n, work)
    return sum(found)


GRAM_MAX_VECTORS = 16  # kernels.c's limit on the vectors of one block_gram


def block_gram(vectors: list[torch.Tensor], block: int) -> torch.Tensor:
    """(pairs, blocks) float64: for every pair i <= j of the flat vectors (upper triangle, row-major) and every block
    of `block` entries, the sum of the exact products in index order from 0.0: what a cumulative sum of the float64
    products gives, computed in one pass over the vectors."""
    lib = library()
    n = vectors[0].numel()
    blocks = -(-n // block)
    pairs = len(vectors) * (len(vectors) + 1) // 2
    sums = torch.empty(pairs, blocks, dtype=torch.float64)
    pointers = _pointers(vectors, 0)

    def work(first: int, last: int) -> None:
        lib.block_gram(pointers, len(vectors), n, block, first, last, blocks, sums.data_ptr())

    _run_units(blocks, n, work)
    return sums
