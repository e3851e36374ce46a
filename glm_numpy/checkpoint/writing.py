"""What every checkpoint writer shares: never a half-written output, bounded memory.

    refuse_existing(dst)            a writer never overwrites: the destination must not exist
    temporary_directory(dst)        write a directory under a scratch name, rename at the end
    temporary_file(dst)             the same for a single file (the GGUF export)
    release_pages(array)            drop the mapped file pages behind a tensor once written

Used by convert, quantize, make-random-checkpoint and export-gguf. Importing this module loads
no checkpoint reader or model code, so a writer can use it without an import circle.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from glm_numpy.checkpoint.errors import CheckpointError


def refuse_existing(dst: Path) -> None:
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; refusing to overwrite it")


@contextlib.contextmanager
def temporary_directory(dst: Path) -> Iterator[Path]:
    """A scratch directory beside ``dst`` that becomes ``dst`` only if the block succeeds."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        refuse_existing(dst)  # someone may have created it meanwhile
        os.rename(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


@contextlib.contextmanager
def temporary_file(dst: Path) -> Iterator[Path]:
    """A scratch file name beside ``dst`` that becomes ``dst`` only if the block succeeds."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    work.unlink(missing_ok=True)
    try:
        yield work
        refuse_existing(dst)  # someone may have created it meanwhile
        os.rename(work, dst)
    except BaseException:
        work.unlink(missing_ok=True)
        raise


def release_pages(array: np.ndarray) -> None:
    """Tell the kernel we are done with the mapped file pages behind ``array``.

    Pages of a memory-mapped file that we have read count towards our resident memory until
    unmapped; dropping them after each tensor keeps a writer's peak RSS at a few tensors instead
    of the whole model. (They stay in the page cache; nothing is re-read from disk unless
    evicted.)
    """
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)  # ndarray views, as_strided's wrapper, np.memmap
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            base.madvise(mmap.MADV_DONTNEED)
