"""Twin-Merging in the method registry: its recipe parameters; the algorithm lives in mergekit_lite/twin/."""

from __future__ import annotations

from mergekit_lite.methods.base import Chunk, ChunkResult, MergeMethod, ParamSpec, TensorContext


def _not_tensor_wise(context: TensorContext, chunk: Chunk, state: object) -> ChunkResult:
    raise TypeError("twin builds a shared expert, low-rank experts and a router; it is not merged tensor by tensor")


def _run(*args, **kwargs) -> dict:
    from mergekit_lite.twin.build import run_recipe

    return run_recipe(*args, **kwargs)


def _check(*args) -> None:
    from mergekit_lite.twin.build import check_twin_recipe

    check_twin_recipe(*args)


METHOD = MergeMethod(
    name="twin",
    summary="shared expert (a tensor-wise merge) + each task's exclusive knowledge as low-rank factors + a router "
            "that mixes them per input; writes a Twin-Merging directory",
    merge_chunk=_not_tensor_wise,
    params=(
        ParamSpec("storage", float, 0.2, "bytes the exclusive knowledge may take, as a share of the dense deltas "
                  "(in the checkpoint's dtype): every matrix gets the largest rank ratio that fits", scope="global",
                  minimum=0.0, exclusive_minimum=True),
        ParamSpec("factor_dtype", str, "bfloat16", "dtype the factors are stored in (1-D deltas keep the "
                  "checkpoint's); 16 bits cost nothing measurable on a delta and halve a float32 model's factors",
                  scope="global", choices=("bfloat16", "float16", "float32")),
        ParamSpec("rank", float, None, "the rank ratio itself instead of the storage budget (auto: from storage): a ratio of "
                  "min(m, n) when at most 1 (1.0 keeps full rank), else a fixed rank", scope="global", minimum=0.0,
                  exclusive_minimum=True),
        ParamSpec("router_samples", int, 1024, "inputs per task for the router (a fifth held out for validation)",
                  scope="global", minimum=2),
        ParamSpec("router_epochs", int, 60, "router training epochs", scope="global", minimum=1),
        ParamSpec("router_feature", str, "auto", "what the router reads: auto (the stem's router averaged with the best "
                  "block's, unless one site among stem, the first half of a transformer's blocks and final is over a "
                  "point better on held-out inputs), stem (pooled output of the first layer, almost free at "
                  "inference), final (pooled last hidden state, one extra forward pass), or a module name",
                  scope="global"),
        ParamSpec("router_top_k", int, 1, "tasks mixed per input (the largest router weights, renormalised); 0 mixes "
                  "all tasks by the softmax", scope="global", minimum=0),
        ParamSpec("batch_size", int, 64, "inputs per forward pass when computing router features", scope="global",
                  minimum=1),
    ),
    needs_base=True,
    min_models=2,
    runner=_run,
    check_recipe=_check,
)
