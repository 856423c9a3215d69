"""Reading and writing checkpoints; knows nothing of recipes or merge methods."""

from mergekit_lite.checkpoint.lora import open_reference, split_lora_reference
from mergekit_lite.checkpoint.reader import Checkpoint, open_checkpoint
from mergekit_lite.checkpoint.safetensors_format import TensorInfo
from mergekit_lite.checkpoint.writer import CheckpointWriter, TensorSpec

__all__ = ["Checkpoint", "CheckpointWriter", "TensorInfo", "TensorSpec", "open_checkpoint", "open_reference",
           "split_lora_reference"]
