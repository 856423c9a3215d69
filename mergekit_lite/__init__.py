"""mergekit_lite: merge neural-network checkpoints tensor by tensor, streamed from safetensors."""

__version__ = "0.1.0"
