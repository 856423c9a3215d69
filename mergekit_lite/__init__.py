"""mergekit_lite: merge neural-network checkpoints tensor by tensor, streamed from safetensors, or model-aware
(PLeaS, Twin-Merging).

The Python API is the one the `merge` command uses:

    from mergekit_lite import merge, validate
    report = merge("recipe.yaml", "out/")             # a path, a recipe's YAML as a dict, or a Recipe
    found = validate({"merge_method": "ties", ...})   # checks inputs from headers, merges nothing
"""

import os

# torch's OpenMP workers otherwise spin for a while after each parallel op, taking the cores that the
# merge kernels' threads need next. Set before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mergekit_lite.version import __version__  # noqa: E402

__all__ = ["__version__", "merge", "validate"]


def __getattr__(name: str):
    """`merge` and `validate` load torch and the pipelines on first use, so that `merge --help` and the
    package's light modules start in a fraction of a second."""
    if name in ("merge", "validate"):
        import mergekit_lite.api as api

        return getattr(api, name)
    raise AttributeError(f"module 'mergekit_lite' has no attribute {name!r}")
