"""PLeaS in the method registry: its recipe parameters; the algorithm lives in mergekit_lite/pleas/."""

from __future__ import annotations

from mergekit_lite.methods.base import Chunk, ChunkResult, MergeMethod, ParamSpec, TensorContext


def _not_tensor_wise(context: TensorContext, chunk: Chunk, state: object) -> ChunkResult:
    raise TypeError("pleas runs models on data; it is not merged tensor by tensor")


def _run(*args, **kwargs) -> dict:
    from mergekit_lite.pleas.run import run_recipe

    return run_recipe(*args, **kwargs)


METHOD = MergeMethod(
    name="pleas",
    summary="two models from any initialisation: match units on data, partial merge to a target width, "
            "least squares per layer (timm models, Llama-style decoders, plain MLPs)",
    merge_chunk=_not_tensor_wise,
    params=(
        ParamSpec("target_width", float, 1.0, "compute of the merged model relative to one source model",
                  scope="global", minimum=1.0, maximum=2.0),
        ParamSpec("samples", int, None, "inputs used for matching, least squares and tuning (auto: 1000 with task "
                  "data, 256 data-free, where each input is refined at the cost of passes through both models)",
                  scope="global", minimum=1),
        ParamSpec("batch_size", int, 100, "inputs per forward pass", scope="global", minimum=1),
        ParamSpec("ridge", float, 1e-2, "least-squares ridge, relative to the mean Gram diagonal", scope="global",
                  minimum=0.0),
        ParamSpec("norm_statistics", str, "reestimate", "batch-norm statistics: re-estimated on the data, or merged",
                  scope="global", choices=("reestimate", "merge")),
        ParamSpec("least_squares", bool, True, "false: permutation-only merge (matched weights averaged)",
                  scope="global"),
        ParamSpec("label_spaces", str, "shared", "separate: the two heads predict different classes; the merged head "
                  "predicts over their union (heads of different sizes always are)", scope="global",
                  choices=("shared", "separate")),
        ParamSpec("data_free", bool, False, "no task data: generic inputs, or data.path from another domain",
                  scope="global"),
        ParamSpec("data_free_steps", int, 200, "data-free images (generic or data.path) are refined for this "
                  "many Adam steps so both models' batch-norm layers see their stored statistics (more steps: better "
                  "merges, each step a forward and backward pass of both models; 0 keeps the inputs as they are)",
                  scope="global", minimum=0),
        ParamSpec("tune_steps", int, None, "Adam steps tuning the whole merged model toward the two models' "
                  "combined outputs on the same inputs, no labels; needs about 4x the model's memory "
                  "(auto: 300 when data_free, else 0)",
                  scope="global", minimum=0),
        ParamSpec("tune_lr", float, 3e-4, "Adam step size of that tuning", scope="global", minimum=0.0,
                  exclusive_minimum=True),
    ),
    needs_base=False,
    min_models=2,
    max_models=2,
    runner=_run,
)
