"""Waiting for something to become true: the one polling loop of the plugin, over tenacity."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import tenacity

T = TypeVar("T")


def poll(check: Callable[[], Optional[T]], timeout: Optional[float], interval: float,
         retry_on: tuple[type[BaseException], ...] = ()) -> Optional[T]:
    """Call `check` every `interval` s until it returns something truthy, and return that.

    None once `timeout` s have passed (None: wait for ever). Exceptions of `retry_on`
    mean "not yet"; any other exception ends the wait at once.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout) if timeout is not None else tenacity.stop_never,
        wait=tenacity.wait_fixed(interval),
        retry=tenacity.retry_if_result(lambda result: not result) | tenacity.retry_if_exception_type(retry_on),
        retry_error_callback=lambda _state: None,
        reraise=True,
    )
    return retrying(check)
