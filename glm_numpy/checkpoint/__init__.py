"""Checkpoint files -> a read-only mapping of official tensor names to memory-mapped arrays.

    load_checkpoint(path)         a directory, an index json, a .safetensors or a torch .bin file
    CheckpointError               anything wrong with the files (names the file and tensor)
    UnsafeCheckpointError         a pickle that asks for more than rebuilding tensors

The loader knows file formats and tensor names, never attention: see design.md's data flow.
"""

from glm_numpy.checkpoint.errors import CheckpointError, UnsafeCheckpointError
from glm_numpy.checkpoint.index import Checkpoint, load_checkpoint
from glm_numpy.checkpoint.safetensors_io import read_safetensors, write_safetensors
from glm_numpy.checkpoint.torch_zip import read_torch_file, write_torch_zip

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "UnsafeCheckpointError",
    "load_checkpoint",
    "read_safetensors",
    "read_torch_file",
    "write_safetensors",
    "write_torch_zip",
]
