"""The one backoff (`fastfeed.backoff.Backoff`), the places that wait with it, and the
attempt count of a reconnect loop (`Retries`)."""

from __future__ import annotations

import random

import pytest

from fastfeed import client, protocol, workers
from fastfeed.backoff import Backoff, Retries
from fastfeed.bus import RedisBus


def test_delays_double_up_to_the_cap_within_the_jitter_band() -> None:
    b = Backoff(base=0.5, factor=2.0, cap=30.0, jitter=0.5)
    rng = random.Random(1)
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (5, 16.0), (6, 30.0), (10**6, 30.0)]:
        assert b.ceiling(attempt) == ceiling
        for _ in range(200):
            assert ceiling / 2 <= b.delay(attempt, rng) <= ceiling


def test_a_negative_attempt_is_the_first() -> None:
    assert Backoff(jitter=0.0).delay(-3) == Backoff(jitter=0.0).delay(0) == 0.25


@pytest.mark.parametrize("kw", [{"base": -1}, {"cap": -1}, {"factor": 0.5}, {"jitter": 2}])
def test_nonsense_is_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kw)


def test_the_client_the_bus_and_the_supervisor_share_it() -> None:
    assert client.Backoff is Backoff
    assert isinstance(workers.RESTART_BACKOFF, Backoff)
    assert workers.RESTART_BACKOFF.ceiling(0) == workers.RESTART_MIN_S
    assert workers.RESTART_BACKOFF.ceiling(100) == workers.RESTART_MAX_S
    bus = RedisBus("redis://127.0.0.1:1", backoff_base=0.1, backoff_cap=0.8)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (3, 0.8), (50, 0.8)]:
        for _ in range(50):
            assert ceiling / 2 <= bus.backoff(attempt) <= ceiling


async def test_retries_grow_and_start_afresh_only_after_a_served_connection() -> None:
    r = Retries(Backoff(base=0.001, factor=2.0, cap=0.004, jitter=0.0))
    assert [await r.wait() for _ in range(4)] == [0.001, 0.002, 0.004, 0.004]
    r.served(1000)  # a connection that got going, closed normally
    assert await r.wait() == 0.001
    # "try again later" and the peer's own faults keep growing
    for code in (protocol.CLOSE_TRY_AGAIN_LATER, *sorted(protocol.CLIENT_FAULT_CLOSE_CODES)):
        r.served(code)
        assert r.attempt > 0, code
    r.served(protocol.CLOSE_ABNORMAL)  # the gateway went away: not this peer's doing
    assert r.attempt == 0
