"""The one backoff: jittered exponential delays between retries, with a cap.

Used by the client's and the publisher's reconnections, the Redis bus's
circuit breaker and the supervisor's worker restarts. `Retries` is the
attempt count of a reconnect loop over a WebSocket: when it grows and when
it starts afresh.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from .protocol import CLIENT_FAULT_CLOSE_CODES, CLOSE_TRY_AGAIN_LATER

__all__ = ["Backoff", "Retries"]


@dataclass
class Backoff:
    """Jittered exponential backoff between attempts.

    Attempt ``n`` (0 for the first retry) waits a random time in
    ``[d * (1 - jitter), d]`` where ``d = min(cap, base * factor ** n)``.
    ``jitter=1`` is "full jitter" (anything from 0 to ``d``); ``jitter=0``
    waits exactly ``d``; the default 0.5 is "equal jitter" (half fixed, half
    random). The randomness spreads the retries of many processes that lost
    the same peer at the same moment.
    """

    base: float = 0.25
    factor: float = 2.0
    cap: float = 10.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("Backoff needs base >= 0, cap >= 0, factor >= 1, 0 <= jitter <= 1")

    def ceiling(self, attempt: int) -> float:
        """The longest wait of attempt `attempt`."""
        # min() before the power would overflow on a long outage
        exp = min(max(attempt, 0), 64)
        return min(self.cap, self.base * self.factor**exp)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A random wait, in seconds, before attempt `attempt`."""
        d = self.ceiling(attempt)
        r = (rng or random).random()
        return d * (1.0 - self.jitter * r)


class Retries:
    """The attempts of one reconnect loop: `wait()` before each attempt,
    `served(code)` after a connection that got going, with the code that
    closed it.

    The wait grows with every attempt and starts afresh after a connection
    that was served, unless the gateway closed it with 1013 ("try again
    later", it may say so right after the upgrade) or for the peer's own
    fault (reconnecting repeats it): those keep growing.
    """

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.attempt = 0

    def served(self, close_code: int) -> None:
        if close_code != CLOSE_TRY_AGAIN_LATER and close_code not in CLIENT_FAULT_CLOSE_CODES:
            self.attempt = 0

    async def wait(self) -> float:
        """Sleep the backoff of this attempt; returns how long."""
        delay = self.backoff.delay(self.attempt)
        self.attempt += 1
        await asyncio.sleep(delay)
        return delay
