"""Two jobs side by side on a small CPU.

Small models use two cores poorly: on the project's 2-core machine one ShapesWorld ViT step takes
0.113 s on one thread and 0.082 s on two (1.4x for twice the cores), and a stage-1 run of 450
steps took 160 s on one thread beside another such run against 113 s alone on two. Two
independent jobs on one thread each therefore finish sooner than one after the other on two.

    with SideJob(train_lm, kind, level, out) as side:   # a spawned process, one thread
        for step in range(steps):                        # this process: one thread ...
            side.share()                                 # ... all of them once the side job is done
            ...
    side.result()                                        # its return value; its exception re-raised
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch


def _start(log: str | None) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # for any library that starts its own pool later
    torch.set_num_threads(1)
    if log is not None:  # its output (progress bars included) into a file, not across ours
        handle = open(log, "a", buffering=1)  # noqa: SIM115 (open for the process's lifetime)
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)


def worth_it(default: bool = True) -> bool:
    """Whether to run jobs side by side: `QFORMER_SIDE_BY_SIDE=1` or `0` decides; otherwise
    `default`, and only with at least two cores and no thread count pinned to one."""
    forced = os.environ.get("QFORMER_SIDE_BY_SIDE", "")
    if forced in ("0", "1"):
        return forced == "1"
    return default and (os.cpu_count() or 1) >= 2 and os.environ.get("OMP_NUM_THREADS", "") != "1"


class SideJob:
    """`fn(*args, **kwargs)` in a spawned process with one thread; meanwhile this process runs on
    one thread and takes all of its threads back at the first `share()` after the job is done, and
    in any case on leaving the `with` block (which waits for the job). `fn` must be importable
    (a module-level function) and its arguments picklable. `log`: a file that takes the job's
    stdout and stderr (default: this terminal)."""

    def __init__(self, fn: Callable[..., Any], *args: Any, log: str | os.PathLike | None = None, **kwargs: Any) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.log = None if log is None else os.fspath(log)
        self.future: Future | None = None
        self._threads = torch.get_num_threads()
        self._shared = False

    def __enter__(self) -> SideJob:
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), initializer=_start,
                                         initargs=(self.log,))  # fmt: skip
        self.future = self._pool.submit(self.fn, *self.args, **self.kwargs)
        torch.set_num_threads(1)
        return self

    def share(self) -> None:
        """Give this process all its threads back once the side job has finished."""
        if not self._shared and self.future is not None and self.future.done():
            torch.set_num_threads(self._threads)
            self._shared = True

    def result(self) -> Any:
        assert self.future is not None, "use SideJob in a `with` block"
        return self.future.result()

    def __exit__(self, *exc: Any) -> bool:
        try:
            self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
        finally:
            torch.set_num_threads(self._threads)
        return False
