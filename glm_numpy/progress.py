"""Progress bars on stderr for work that takes a while: loading a model, a long prefill, the
windows of a perplexity run. One library (tqdm) draws them all.

A bar appears only once its work has taken DELAY_SECONDS, so quick work stays silent, and it
erases itself when done (``leave=False``): the text streamed on stdout afterwards never shares a
line with it. The Python API shows no bar unless asked (``progress=True``); the command line
asks when stderr is a terminal, and ``--progress`` asks for every bar from its start (it sets
DELAY_SECONDS to 0), terminal or not (``--quiet``: never).
"""

from __future__ import annotations

import sys

from tqdm import tqdm

DELAY_SECONDS = 1.0


def progress_bar(total: float, description: str, unit: str, enabled: bool = True) -> tqdm:
    """A bar over `total` units of work, on stderr; a silent stand-in when not enabled."""
    bar_format = None
    if unit == "tok":  # prefill counts fractions of a token (one layer of a chunk at a time)
        bar_format = (
            "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} tokens "
            "[{elapsed}<{remaining}, {rate_fmt}]"
        )
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        bar_format=bar_format,
        delay=DELAY_SECONDS,
        leave=False,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )
