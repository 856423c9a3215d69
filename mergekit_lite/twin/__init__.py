"""Twin-Merging: a shared expert, each task's exclusive knowledge as low-rank factors, and a router that mixes
them per input (store.py: the directory layout; build.py: writing it; runtime.py: running it; collapse.py: one
fixed mix as a plain checkpoint)."""

from mergekit_lite.twin.collapse import collapse
from mergekit_lite.twin.runtime import TwinModel

__all__ = ["TwinModel", "collapse"]
