"""Trades and bars over /ws, as a client written from the contract sees them.

Real gateway processes, real WebSocket clients (`websockets`), a real
redis-server. Every client's received `tseq` sequence is checked against what
was published: each trade exactly once, in order, or counted in `lost`
(exactly) -- through a frame too slow for the ring, a reconnect with
`since_trades`, and a gateway killed under its clients. Bars received are
checked against bars computed here from the published trades.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import websockets
from support import start_gateway, until

from fastfeed.reference import RefBars, RefTrades

S = 1_000_000_000
T0 = 1_772_384_400 * S  # midnight in Asia/Jakarta


def trade(sym: str, tseq: int) -> dict:
    return {"type": "trade", "sym": sym, "tseq": tseq, "ts": T0 + tseq * 5 * S,
            "price": 100.0 + tseq % 7, "size": float(1 + tseq % 3), "side": "bs"[tseq % 2]}


class TapeClient:
    """Keeps what a contract-only client keeps: per symbol the tseqs it got,
    the `lost` counts, and the latest value of every bar."""

    def __init__(self, url: str, syms: list[str], channels: list[str], frame_ms: int = 16,
                 since_trades: dict[str, int] | None = None) -> None:
        self.url, self.syms, self.channels = url, syms, channels
        self.frame_ms = frame_ms
        self.since_trades = since_trades
        self.got: dict[str, list[int]] = {s: [] for s in syms}
        self.lost: dict[str, int] = dict.fromkeys(syms, 0)
        self.bars: dict[tuple[str, str, int], list] = {}
        self.snapshot: dict | None = None
        self.task: asyncio.Task | None = None
        self.ws = None

    async def __aenter__(self) -> TapeClient:
        self.ws = await websockets.connect(self.url, max_size=None)
        await self.ws.send(json.dumps({"op": "configure", "frame_ms": self.frame_ms}))
        req = {"op": "subscribe", "symbols": self.syms, "channels": self.channels}
        if self.since_trades is not None:
            req["since_trades"] = self.since_trades
        await self.ws.send(json.dumps(req))
        self.task = asyncio.create_task(self._read())
        await until(lambda: self.snapshot is not None, what="snapshot")
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        with contextlib.suppress(Exception):
            await self.ws.close()

    def _take(self, entries: list[dict], key: str) -> None:
        for e in entries:
            sym = e["sym"]
            self.lost[sym] += e.get("lost", 0)
            have = self.got[sym]
            for t in e[key]:
                assert not have or t[0] > have[-1], f"{sym}: tseq {t[0]} after {have[-1:]}"
                have.append(t[0])

    def _bars(self, entries: list[dict]) -> None:
        for e in entries:
            for b in e["bars"]:
                self.bars[(e["sym"], e["interval"], b[0])] = b

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                msg = json.loads(raw)
                if msg["type"] == "snapshot":
                    self._take(msg.get("trades", []), "recent")
                    self._bars(msg.get("bars", []))
                    self.snapshot = msg
                elif msg["type"] == "update":
                    self._take(msg.get("trades", []), "items")
                    self._bars(msg.get("bars", []))

    def complete(self, sym: str, upto: int, start: int = 1) -> bool:
        """Every tseq start..upto received or counted as lost."""
        have = self.got[sym]
        return bool(have) and have[-1] == upto and \
            len(have) + self.lost[sym] == upto - start + 1


async def ingest(url: str, msgs: list[dict]) -> None:
    """One /ingest message (the trades are good: a refusal would fail the
    sequence checks, which wait for every tseq)."""
    async with websockets.connect(url) as pub:
        await pub.send(json.dumps(msgs))


async def test_every_trade_once_in_order_or_counted_and_bars_match():
    async with start_gateway("--trade-ring", "5", "--bars-tz", "Asia/Jakarta") as gw:
        await ingest(gw.ingest_url, [trade("BBCA", 1)])
        async with TapeClient(gw.ws_url, ["BBCA"], ["trades", "bars:1m", "bars:1d"]) as fast, \
                TapeClient(gw.ws_url, ["BBCA"], ["trades"], frame_ms=40) as slow:
            assert fast.snapshot["trades"][0]["recent"][0][0] == 1
            # 40 trades in one message: more than the ring of 5 in one frame interval
            await ingest(gw.ingest_url, [trade("BBCA", t) for t in range(2, 42)])
            for t in range(42, 60):
                await ingest(gw.ingest_url, [trade("BBCA", t)])
            await until(lambda: fast.complete("BBCA", 59) and slow.complete("BBCA", 59),
                        timeout=60, what="every tseq to 59 received or counted")
            assert fast.lost["BBCA"] > 0  # the burst overflowed the ring: counted
            # the bars equal those made here from the published trades
            ids: dict[str, int] = {}
            ref = RefBars(ids, tz="Asia/Jakarta")
            rt = RefTrades(ids, bars=ref)
            for t in range(1, 60):
                rt.apply(trade("BBCA", t))
            want = {}
            for k, iv in ((1, "1m"), (5, "1d")):
                for b in ref.bars[k]:
                    want[("BBCA", iv, b[0])] = [b[0], *map(float, b[1:6]), b[6]]
            await until(lambda: fast.bars == want, timeout=60, what="bars equal the reference")
        # a reconnect resuming from tseq 50 gets 51..59, nothing lost (the ring holds 55..59)
        async with TapeClient(gw.ws_url, ["BBCA"], ["trades"], since_trades={"BBCA": 50}) as r:
            entry = r.snapshot["trades"][0]
            assert [t[0] for t in entry["recent"]] == [55, 56, 57, 58, 59]
            assert entry["lost"] == 4



async def test_a_killed_gateway_s_clients_resume_on_another_with_nothing_silently_lost(redis):
    args = ["--redis", redis.url, "--redis-prefix", "trk", "--trade-ring", "50"]
    syms = ["BBCA", "TLKM"]
    async with start_gateway(*args) as a, start_gateway(*args) as b:
        # the first trades make the symbols known on every gateway (through the bus)
        await ingest(b.ingest_url, [trade(s, 1) for s in syms])
        for gw in (a, b):
            while True:
                async with TapeClient(gw.ws_url, syms, ["trades"]) as probe:
                    if not probe.snapshot["unknown"]:
                        break
                await asyncio.sleep(0.05)
        clients = [TapeClient(a.ws_url, syms, ["trades"]) for _ in range(3)]
        for c in clients:
            await c.__aenter__()
        published = 30
        await ingest(b.ingest_url, [trade(s, n) for n in range(2, 31) for s in syms])
        await until(lambda: all(c.complete(s, published) for c in clients for s in syms))
        a.kill()  # SIGKILL: no drain
        await until(lambda: all(c.task.done() for c in clients), what="clients see the close")
        # trades go on while the clients are away
        await ingest(b.ingest_url, [trade(s, n) for n in range(31, 101) for s in syms])
        resumed = []
        for c in clients:
            since = {s: c.got[s][-1] for s in syms}
            r = TapeClient(b.ws_url, syms, ["trades"], since_trades=since)
            await r.__aenter__()
            resumed.append((c, r))
        await ingest(b.ingest_url, [trade(s, n) for n in range(101, 111) for s in syms])
        for c, r in resumed:
            for s in syms:
                await until(lambda r=r, s=s: r.got[s] and r.got[s][-1] == 110)
                # before the kill + after the resume: every tseq once, or counted
                seq = c.got[s] + r.got[s]
                assert seq == sorted(set(seq)), s
                assert len(seq) + c.lost[s] + r.lost[s] == 110, (s, len(seq), r.lost[s])
                assert r.lost[s] == 100 - 50 - c.got[s][-1]  # the ring of 50 holds 51..100
            await r.__aexit__()
        for c in clients:
            await c.__aexit__()
