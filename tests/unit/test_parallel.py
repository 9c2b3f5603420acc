"""parallel.each: every item's work in a thread of its own, and no thread left when interrupted."""

from __future__ import annotations

import threading
import time

import pytest

from pytest_ostimages.parallel import each


def test_results_in_order_and_the_first_error_after_all_ended() -> None:
    assert each(lambda n: n * 2, [1, 2, 3]) == [2, 4, 6]
    ended = []

    def work(n: int) -> None:
        ended.append(n)
        if n == 1:
            raise ValueError("one")

    with pytest.raises(ValueError, match="one"):
        each(work, [1, 2])
    assert sorted(ended) == [1, 2]


def test_an_interrupt_right_after_a_worker_started_leaves_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the pool starts a worker (seen in CI: the session's end-of-session save had just
    begun): the worker, never registered by the pool, waited for work for ever, and the
    interpreter's exit waited for it."""
    start = threading.Thread.start
    started: list[threading.Thread] = []

    def start_then_interrupted(thread: threading.Thread) -> None:
        start(thread)
        started.append(thread)
        raise KeyboardInterrupt("signal 15")  # as the handler raises it, before the pool records the thread

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupted)
    with pytest.raises(KeyboardInterrupt) as interrupted:  # its traceback keeps the pool, as pytest's report does
        each(lambda n: n, [1])
    monkeypatch.undo()
    deadline = time.monotonic() + 10
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not [thread for thread in started if thread.is_alive()], interrupted
