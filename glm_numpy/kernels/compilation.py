"""Hearing when numba compiles one of our kernels (glm_numpy.warmup says why it matters).

numba announces each compilation as a "numba:compile" event, and only a real compilation: a
kernel loaded from the on-disk cache raises none. So a listener that fires on the first event
for a glm_numpy function tells the user, once, that this run pays the first-run cost.
"""

from __future__ import annotations

from collections.abc import Callable

from numba.core import event


class _FirstCompilation(event.Listener):
    def __init__(self, callback: Callable[[], None]):
        self.callback: Callable[[], None] | None = callback

    def on_start(self, ev: event.Event) -> None:
        dispatcher = ev.data.get("dispatcher") if isinstance(ev.data, dict) else None
        module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
        if self.callback is not None and module.startswith("glm_numpy."):
            callback, self.callback = self.callback, None
            callback()

    def on_end(self, ev: event.Event) -> None:
        pass


def on_first_compilation(callback: Callable[[], None]) -> None:
    """Call callback() when a glm_numpy kernel is first compiled in this process (not when it
    is loaded from numba's cache); at most once."""
    event.register("numba:compile", _FirstCompilation(callback))
