"""The two exceptions every checkpoint problem is reported as."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the config; the message names the file
    (and the tensor, when there is one)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks for something other than rebuilding tensors (e.g. ``os.system``).

    Raised before anything the file names is looked up or called.
    """
