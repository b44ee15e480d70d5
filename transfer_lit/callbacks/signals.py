"""Taking over SIGINT / SIGTERM for a while and giving them back: shared by FaultTolerance and the prediction
writer."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], None]


def take_signals(handler: Handler) -> dict[int, Any]:
    """Install ``handler`` for SIGINT and SIGTERM; returns the handlers it replaced, for :func:`give_back`.

    A signal ignored at start (``nohup``, a background job) stays ignored; outside the main thread nothing changes.
    """
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: leave signals alone
            break
    return previous


def give_back(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`take_signals` replaced."""
    for signum, handler in previous.items():
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signum, handler)
