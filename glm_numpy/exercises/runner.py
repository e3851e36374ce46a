"""Running a student's function on every case, safely: whatever it does, the checker survives.

The function runs in a forked child process that sends back one message per case through a pipe;
the parent waits at most ``time_limit`` seconds for each one. A function that loops forever is
then really stopped (the child is killed), a crash of the interpreter (``os._exit``, a segfault)
only ends the child, and a function that modifies its inputs changes the child's copy only.
Fork keeps the function as it is in memory, so a function defined in a notebook cell works
without being importable or picklable.

Where fork does not exist (Windows) each case runs in a daemon thread instead: a timed-out
function is reported the same way, but Python cannot stop a thread, so it keeps running in the
background until the process ends.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import queue
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

FORK_AVAILABLE = "fork" in multiprocessing.get_all_start_methods()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one call of the student's function did. Exactly one of the kinds below:

    value      it returned (``value`` holds what it returned)
    error      it raised (``error`` = "ExceptionType: message", ``details`` = its traceback)
    timeout    it ran longer than the time limit and was stopped
    crashed    the process running it died (``error`` says how)
    unusable   it returned something that cannot be sent back (``error`` says what)
    """

    kind: str
    value: Any = None
    error: str = ""
    details: str = ""


def run_cases(
    load_function: Callable[[], Callable],
    cases: Sequence[tuple],
    time_limit: float,
    load_time_limit: float = 10.0,
) -> tuple[Outcome, list[Outcome]]:
    """Call the function ``load_function()`` returns on each argument tuple of ``cases``.

    -> (how loading went, one Outcome per case). Loading counts as a call of its own (a student's
    file may fail or hang while being imported); if it does not return a value, no case runs.
    After a case times out or crashes the process, the remaining cases are not run either (their
    Outcomes are missing, so the list may be shorter than ``cases``).
    """
    run = _run_in_child_process if FORK_AVAILABLE else _run_in_threads
    return run(load_function, cases, time_limit, load_time_limit)


def _call(function: Callable, args: tuple) -> Outcome:
    """One call, never raising: the arguments are copied so the caller's arrays stay intact."""
    try:
        return Outcome("value", value=function(*copy.deepcopy(args)))
    except (Exception, SystemExit) as error:  # anything the student's code raises is a result
        return _error_outcome(error)


def _error_outcome(error: BaseException) -> Outcome:
    # The first frame is this module's own call; the student needs only the frames after it.
    frames = error.__traceback__.tb_next if error.__traceback__ else None
    details = "".join(traceback.format_exception(type(error), error, frames))
    return Outcome("error", error=f"{type(error).__name__}: {error}", details=details)


# ----------------------------------------------------------------------------- fork (Linux, macOS)
def _run_in_child_process(load_function, cases, time_limit, load_time_limit):
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(sender, load_function, cases), daemon=True)
    with warnings.catch_warnings():
        # A notebook kernel has helper threads; the child only computes and writes to its pipe,
        # so none of the locks those threads might hold at the fork is ever needed there.
        warnings.simplefilter("ignore", DeprecationWarning)
        child.start()
    sender.close()  # the parent only reads: EOF on the pipe then means the child has gone
    try:
        loaded = _receive(receiver, child, load_time_limit)
        outcomes: list[Outcome] = []
        if loaded.kind == "value":
            for _ in cases:
                outcomes.append(_receive(receiver, child, time_limit))
                if outcomes[-1].kind in ("timeout", "crashed"):
                    break
        return loaded, outcomes
    finally:
        if child.is_alive():
            child.kill()  # SIGKILL: a student's loop cannot ignore it
        child.join()
        receiver.close()


def _child_main(sender, load_function, cases) -> None:
    """In the child: load the function, then send one Outcome per case."""
    try:
        function = load_function()
    except BaseException as error:  # SyntaxError, SystemExit, a missing name… all reportable
        _send(sender, _error_outcome(error))
        return
    _send(sender, Outcome("value"))
    for args in cases:
        _send(sender, _call(function, args))


def _send(sender, outcome: Outcome) -> None:
    try:
        sender.send(outcome)  # pickled completely before anything is written to the pipe
    except Exception as error:
        kind = type(outcome.value).__name__
        sender.send(Outcome("unusable", error=f"returned a {kind}, which cannot be used ({error})"))


def _receive(receiver, child, time_limit: float) -> Outcome:
    if not receiver.poll(time_limit):
        return Outcome("timeout", error=f"no answer within {time_limit:g} s")
    try:
        return receiver.recv()
    except EOFError:
        child.join(timeout=1.0)
        return Outcome(
            "crashed", error=f"the process running it ended (exit code {child.exitcode})"
        )


# --------------------------------------------------------------------------- threads (no fork)
def _run_in_threads(load_function, cases, time_limit, load_time_limit):
    loaded = _call_in_thread(load_function, (), load_time_limit)
    outcomes: list[Outcome] = []
    if loaded.kind == "value":
        function = loaded.value
        loaded = Outcome("value")
        for args in cases:
            outcomes.append(_call_in_thread(function, args, time_limit))
            if outcomes[-1].kind == "timeout":
                break
    return loaded, outcomes


def _call_in_thread(function: Callable, args: tuple, time_limit: float) -> Outcome:
    answers: queue.Queue = queue.Queue()
    thread = threading.Thread(target=lambda: answers.put(_call(function, args)), daemon=True)
    thread.start()
    try:
        return answers.get(timeout=time_limit)
    except queue.Empty:
        return Outcome("timeout", error=f"no answer within {time_limit:g} s")
