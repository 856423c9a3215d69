"""mergekit_lite: merge neural-network checkpoints tensor by tensor, streamed from safetensors."""

import os

# torch's OpenMP workers otherwise spin for a while after each parallel op, taking the cores that the
# merge kernels' threads need next. Set before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
