"""Doing one thing to several items at once: a thread each, the first error raised after all ended."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def each(work: Callable[[T], R], items: Iterable[T], interrupted: Optional[Callable[[], None]] = None) -> list[R]:
    """`work(item)` for every item, each in its own thread; their results in order.

    Every thread runs to its end; then the first error is raised. `interrupted` is
    called when the waiting thread is interrupted (Ctrl-C, SIGTERM) before all ended,
    so that the work can be told to stop.
    """
    items = list(items)
    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=len(items))
    futures = []
    try:
        # submitted inside the try: an interrupt that lands in submit(), after it started a worker but
        # before the pool registered it, must still reach shutdown(), whose wake-up ends that worker
        # too (else it waits for work for ever, and the interpreter's exit waits for it)
        futures += [pool.submit(work, item) for item in items]
        errors = [f.exception() for f in futures if f.exception() is not None]
    finally:
        if interrupted is not None and not all(f.done() for f in futures):
            interrupted()
        pool.shutdown(wait=True)
    if errors:
        raise errors[0]  # type: ignore[misc]
    return [f.result() for f in futures]
