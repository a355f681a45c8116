"""How long the worker's parts wait for the broker, and how they back off while it is away."""

from __future__ import annotations

import threading

ACK_WAIT_S = 5.0  # no acknowledgement for this long: a failed produce or commit (then retried)
BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
RETRIES_WHEN_STOPPING = 3


def backoff_s(attempt: int) -> float:
    """The pause before retry number `attempt` (0 first), growing to a ceiling."""
    return BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]


def giving_up(stop: threading.Event, attempt: int) -> bool:
    """While stopping, give up after a few retries instead of blocking shutdown."""
    return stop.is_set() and attempt >= RETRIES_WHEN_STOPPING
