"""Twin-Merging: a shared expert, each task's exclusive knowledge as low-rank factors, and a router that mixes
them per input (see store.py for the directory layout, runtime.py for running it)."""

from mergekit_lite.twin.runtime import TwinModel, collapse

__all__ = ["TwinModel", "collapse"]
