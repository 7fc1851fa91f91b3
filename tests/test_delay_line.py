"""The delay line against plain tables, on a clock the test holds.

No row newer than `now - delay` ever reaches a delayed table; once the delay
has passed after the last tick, the delayed table holds the real one's
state; memory stays within docs/delay.md's formula, coarsening over budget.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from fastfeed import _core

S = 1_000_000_000
MS = 1_000_000
T0 = 1_700_000_000 * S  # a fixed wall clock: every step below names its `now`


def tick(table, sym, seq, ts, px=1.0):
    assert table.apply_tick(sym, seq, ts, bid=px, ask=px + 1, last=px, bid_size=1.0,
                            ask_size=2.0, last_size=3.0, volume=float(seq)) == 0


def held(table):
    """{sym: row} of the instruments that have a state."""
    return {table.symbol(i): table.row(i) for i in range(len(table)) if table.seq_of(i) >= 0}


def assert_not_newer(view, cutoff):
    ts = view.arrays["ts"][:len(view)]
    seq = view.arrays["seq"][:len(view)]
    late = np.flatnonzero((seq >= 0) & (ts > cutoff))
    assert not len(late), (f"{len(late)} delayed rows newer than now - delay, e.g. "
                           f"{view.row(int(late[0]))} against {cutoff}")


def test_rows_come_out_after_the_delay_and_not_before():
    real = _core.Table()
    line = _core.DelayLine(real, 2 * S, 100 * MS)
    view = line.view(2 * S).table
    line.record(T0)  # the line starts: an empty table
    tick(real, "BBCA", 1, T0 + 10 * MS)
    line.record(T0 + 100 * MS)
    for now in range(T0 + 100 * MS, T0 + 2010 * MS, 100 * MS):
        line.record(now)
        line.advance(now)
        assert held(view) == {}, f"released at {now - T0} ns after the start"
    line.advance(T0 + 2100 * MS)
    assert held(view) == {"BBCA": real.row(0)}
    assert view.lookup("BBCA") == real.lookup("BBCA") == 0


def test_a_slot_keeps_only_the_latest_state_of_each_instrument():
    real = _core.Table()
    line = _core.DelayLine(real, 1 * S, 100 * MS)
    line.record(T0)
    for seq in range(1, 50):
        tick(real, "BBCA", seq, T0 + seq * MS)
        tick(real, "TLKM", seq, T0 + seq * MS)
    assert line.record(T0 + 100 * MS) == 2
    assert line.entries == 2 and line.slots == 1


def test_a_row_stamped_in_the_future_waits_for_its_ts():
    real = _core.Table()
    line = _core.DelayLine(real, 1 * S, 100 * MS)
    view = line.view(1 * S).table
    line.record(T0)
    tick(real, "SKEW", 1, T0 + 5 * S)  # a source clock 5 s ahead
    tick(real, "OK", 1, T0 + 50 * MS)
    line.record(T0 + 100 * MS)
    assert line.pending == 1
    now = T0 + 100 * MS
    while now < T0 + 7 * S:
        now += 100 * MS
        line.record(now)
        line.advance(now)
        assert_not_newer(view, now - 1 * S)
        if now >= T0 + 1200 * MS:
            assert "OK" in held(view)
    assert held(view) == held(real)
    assert line.pending == 0


def test_a_newer_state_supersedes_a_pending_one():
    real = _core.Table()
    line = _core.DelayLine(real, 1 * S, 100 * MS)
    view = line.view(1 * S).table
    line.record(T0)
    tick(real, "SKEW", 1, T0 + 60 * S)
    line.record(T0 + 100 * MS)
    tick(real, "SKEW", 2, T0 + 150 * MS, px=7.0)  # the source's clock is fixed
    line.record(T0 + 200 * MS)
    line.advance(T0 + 1300 * MS)
    assert held(view) == held(real)
    line.record(T0 + 61 * S)
    line.advance(T0 + 62 * S)
    assert view.row(0)[1] == 2  # the old future state never overwrites the newer one


def test_a_late_start_serves_the_rows_already_old_enough_at_once():
    real = _core.Table()
    tick(real, "OLD", 5, T0 - 3600 * S)  # a bus snapshot: last traded an hour ago
    tick(real, "NEW", 9, T0 - 1 * S)  # traded a second ago: its past is not held
    line = _core.DelayLine(real, 900 * S, 100 * MS)
    view = line.view(900 * S).table
    line.record(T0)
    line.advance(T0)
    assert held(view) == {"OLD": real.row(0)}
    assert view.lookup("NEW") == 1 and view.seq_of(1) < 0  # known, no delayed state yet
    line.advance(T0 + 899 * S)
    assert "NEW" in held(view)


def test_every_view_moves_at_its_own_delay_and_a_new_one_starts_from_the_oldest():
    real = _core.Table()
    line = _core.DelayLine(real, 10 * S, 100 * MS)
    ten = line.view(10 * S).table
    line.record(T0)
    for k in range(1, 101):  # 10 s of ticks, one every 100 ms
        now = T0 + k * 100 * MS
        tick(real, "BBCA", k, now - MS, px=float(k))
        line.record(now)
        line.advance(now)
    now = T0 + 10_050 * MS
    two = line.view(2 * S, now).table  # asked for only now: built from the 10 s copy and the line
    line.advance(now)
    assert_not_newer(two, now - 2 * S)
    assert_not_newer(ten, now - 10 * S)
    assert two.row(0)[1] > 70 and ten.row(0)[1] <= 1
    assert sorted(line.delays()) == [2 * S, 10 * S]


def _random_feed(line, real, views, seconds, rate, nsym, rnd, skew_share=0.0):
    """A feed of `rate` ticks/s for `seconds`, a record and an advance every 100 ms;
    after every advance, no delayed row is newer than its cutoff."""
    syms = [f"S{i:05d}" for i in range(nsym)]
    seqs = dict.fromkeys(syms, 0)
    step = 100 * MS
    now = T0
    line.record(now)
    for _ in range(int(seconds * S // step)):
        for _ in range(int(rate * step / S)):
            s = rnd.choice(syms)
            seqs[s] += 1
            ts = now + rnd.randrange(step)
            if rnd.random() < skew_share:
                ts += rnd.randrange(3 * S)  # ahead of the gateway's clock
            tick(real, s, seqs[s], ts, px=rnd.random())
        now += step
        line.record(now)
        line.advance(now)
        for d, view in views:
            assert_not_newer(view, now - d)
    return now


def test_random_feed_never_leaks_and_ends_equal():
    rnd = random.Random(7)
    real = _core.Table()
    line = _core.DelayLine(real, 2 * S, 100 * MS)
    views = [(2 * S, line.view(2 * S).table), (1 * S, line.view(1 * S).table)]
    now = _random_feed(line, real, views, 6, 2000, 300, rnd, skew_share=0.05)
    for _ in range(60):  # the feed has stopped: 6 s more, skewed rows included
        now += 100 * MS
        line.record(now)
        line.advance(now)
    for d, view in views:
        assert_not_newer(view, now - d)
        assert held(view) == held(real)


def formula(instruments, ticks_per_s, max_delay_s, slot_s):
    """docs/delay.md: the most bytes the line holds, before the budget steps in."""
    slots = max_delay_s / slot_s + 2
    per_slot = min(instruments, ticks_per_s * slot_s)
    return 2 * (80 * per_slot * slots) + 64 * 2 * slots + 21 * 2 * instruments + 1024 * 80


def test_memory_stays_within_the_formula():
    rnd = random.Random(3)
    real = _core.Table()
    line = _core.DelayLine(real, 5 * S, 100 * MS, budget_bytes=1 << 30)
    _random_feed(line, real, [(5 * S, line.view(5 * S).table)], 8, 10_000, 2000, rnd)
    assert line.coarsened == 0
    assert 0 < line.nbytes <= formula(2000, 10_000, 5, 0.1)


@pytest.mark.parametrize("budget_mb, slot_ms", [(3.5, 400), (2, 1600)])
def test_over_budget_the_slots_coarsen_and_stay_correct(budget_mb, slot_ms):
    """10k ticks/s over 5,000 instruments, 5 s of past: 3.5 MiB is met with
    400 ms slots; 2 MiB is not met even at the coarsest slots (1.6 s: one more
    doubling would pass half the delay), where the line stops merging."""
    rnd = random.Random(5)
    real = _core.Table()
    budget = int(budget_mb * (1 << 20))
    line = _core.DelayLine(real, 5 * S, 100 * MS, budget_bytes=budget)
    views = [(5 * S, line.view(5 * S).table), (2 * S, line.view(2 * S).table)]
    now = _random_feed(line, real, views, 8, 10_000, 5000, rnd)
    assert line.slot_ns == slot_ms * MS and line.coarsest == (slot_ms == 1600)
    # in use within the budget; allocated (buffers double as they grow) within twice it
    assert line.nbytes <= 2 * budget or line.coarsest
    assert line.nbytes <= formula(5000, 10_000, 5, 0.1)  # never more than uncoarsened
    for _ in range(int((5 * S + 2 * line.slot_ns) // (100 * MS)) + 1):
        now += 100 * MS
        line.record(now)
        line.advance(now)
    for d, view in views:
        assert_not_newer(view, now - d)
        assert held(view) == held(real)


@pytest.mark.parametrize("args", [(0, 100 * MS), (S, 0)])
def test_bad_settings_are_refused(args):
    with pytest.raises(ValueError):
        _core.DelayLine(_core.Table(), *args)


def test_a_view_past_the_maximum_is_refused():
    line = _core.DelayLine(_core.Table(), 10 * S)
    with pytest.raises(ValueError, match="outside"):
        line.view(11 * S)


# ---- books, trades and the bars made from them

def kinds(ring=100, budget=256 << 20, delay=2 * S):
    """A real table with books, trades and bars, and a delay line over all of them."""
    real = _core.Table()
    books = _core.Books(real)
    trades = _core.Trades(real, ring=ring, backlog=max(ring, 1000), bars=_core.Bars(real))
    return real, books, trades, _core.DelayLine(real, delay, 100 * MS, budget, books, trades)


def book(sym, seq, mid, full=False):
    return {"type": "book", "sym": sym, "seq": seq, "full": full,
            "bids": [[mid - 1.0, float(seq), 1], [mid - 2.0, 5.0, 2]],
            "asks": [[mid + 1.0, float(seq), 1], [mid + 2.0, 5.0, 2]]}


def same_kinds(view, books, trades, iids):
    for i in iids:
        assert view.books.book(i) == books.book(i)
        assert view.trades.recent(i) == trades.recent(i)
        assert view.trades.last_tseq(i) == trades.last_tseq(i)
        for k in range(6):
            assert view.bars.bars_of(i * 6 + k) == trades.bars.bars_of(i * 6 + k)
    # the delayed market-wide tape: the same trades, in the order they were applied
    assert view.trades.tape.snapshot_json() == trades.tape.snapshot_json()


def test_books_and_trades_come_out_after_the_delay_whole_and_in_order():
    real, books, trades, line = kinds()
    view = line.view(2 * S)
    t0 = _core.wall_ns()  # books are released by their arrival: the line runs on the wall clock
    line.record(t0)
    assert books.apply_objects([book("BBCA", 1, 100.0, full=True)])[0] == 1
    for n in range(1, 41):  # 40 trades and 20 book changes in one slot: none conflated away
        assert trades.apply_trade("BBCA", n, t0 + n * MS, 100.0 + n, 1.0) == 0
        if n % 2:
            assert books.apply_objects([book("BBCA", 2 + n // 2, 100.0)])[0] == 1
    iid = real.lookup("BBCA")
    line.record(t0 + 100 * MS)
    for now in range(t0 + 100 * MS, t0 + 2040 * MS, 100 * MS):
        line.record(now)
        line.advance(now)
        assert view.trades.last_tseq(iid) < 0 and view.books.seq_of(iid) <= 0, \
            f"released {(now - t0) / MS:.0f} ms after the start"
    released = []
    for now in range(t0 + 2040 * MS, t0 + 2300 * MS, 10 * MS):
        line.advance(now)
        released.append((now, view.trades.last_tseq(iid)))
        assert all(json.loads(t)[1] <= now - 2 * S for t in view.trades.recent(iid))
    assert [tseq for _, tseq in released][-1] == 40
    same_kinds(view, books, trades, [iid])


def test_a_delayed_book_moves_by_the_levels_that_changed():
    real, books, _trades, line = kinds()
    view = line.view(2 * S)
    t0 = _core.wall_ns()
    line.record(t0)
    books.apply_objects([book("BBCA", 1, 100.0, full=True)])
    line.record(t0 + 100 * MS)
    line.advance(t0 + 3 * S)
    v1 = view.books.version
    books.apply_objects([{"type": "book", "sym": "BBCA", "seq": 2, "bids": [[99.0, 7.0, 3]]}])
    line.record(t0 + 3 * S)
    line.advance(t0 + 6 * S)
    iid = real.lookup("BBCA")
    assert view.books.book(iid) == books.book(iid)
    entry = json.loads(b"[" + view.books._encode_section_py([iid], v1)[1] + b"]")[0]
    assert not entry.get("full") and entry["bids"] == [[99.0, 7.0, 3]] and entry["asks"] == []


def test_over_budget_trades_are_kept_whole_and_a_new_view_copies_them():
    rnd = random.Random(11)
    real, books, trades, line = kinds(ring=5000, budget=1 << 20, delay=5 * S)
    five = line.view(5 * S)
    syms = [f"S{i:03d}" for i in range(300)]
    tseq = dict.fromkeys(syms, 0)
    bseq = dict.fromkeys(syms, 0)
    qseq = dict.fromkeys(syms, 0)
    now = _core.wall_ns()
    line.record(now)
    for step in range(60):  # 6 s: 3,000 ticks, 600 book changes and 1,200 trades a second
        for _ in range(300):
            s = rnd.choice(syms)
            qseq[s] += 1
            tick(real, s, qseq[s], now + rnd.randrange(100 * MS))
        for _ in range(60):
            s = rnd.choice(syms)
            bseq[s] += 1
            books.apply_objects([book(s, bseq[s], 100.0 + rnd.randrange(50), full=True)])
        for _ in range(120):
            s = rnd.choice(syms)
            tseq[s] += 1
            trades.apply_trade(s, tseq[s], now + rnd.randrange(100 * MS), 100.0, 1.0)
        now += 100 * MS
        line.record(now)
        line.advance(now)
        if step == 30:
            two = line.view(2 * S, now)  # copies the 5 s view's trades, bars and books
    assert line.coarsened >= 1
    for _ in range(80):
        now += 100 * MS
        line.record(now)
        line.advance(now)
    ids = [real.lookup(s) for s in syms]
    for view in (five, two):
        same_kinds(view, books, trades, ids)
        for i in ids:  # every trade, none twice
            got = [json.loads(t)[0] for t in view.trades.recent(i)]
            assert got == list(range(1, trades.last_tseq(i) + 1))


def test_a_new_view_starts_with_the_oldest_views_tape_and_goes_on_in_order():
    _real, _books, trades, line = kinds(delay=5 * S)
    five = line.view(5 * S)
    now = _core.wall_ns()
    line.record(now)
    for n in range(1, 61):  # 6 s of trades, two symbols, one every 100 ms
        trades.apply_trade("BBCA" if n % 2 else "TLKM", (n + 1) // 2, now, 100.0 + n, 1.0)
        now += 100 * MS
        line.record(now)
        line.advance(now)
    held = json.loads(five.trades.tape.snapshot_json())["recent"]
    assert 0 < len(held) < 60  # the first second's trades are 5 s old
    two = line.view(2 * S, now)  # its tape: the 5 s view's, then what the line holds on
    assert json.loads(two.trades.tape.snapshot_json())["recent"][:len(held)] == held
    for _ in range(60):
        now += 100 * MS
        line.record(now)
        line.advance(now)
    assert json.loads(two.trades.tape.snapshot_json())["recent"] == \
        json.loads(trades.tape.snapshot_json())["recent"]


def test_a_trade_stamped_beyond_the_horizon_is_dropped_not_held():
    real, _books, trades, line = kinds()
    view = line.view(2 * S)
    t0 = _core.wall_ns()
    line.record(t0)
    trades.apply_trade("BBCA", 1, t0, 100.0, 1.0)
    trades.apply_trade("BBCA", 2, t0 + 3600 * S, 100.0, 1.0)  # a source clock an hour fast
    trades.apply_trade("BBCA", 3, t0 + MS, 100.0, 1.0)
    line.record(t0 + 100 * MS)
    line.advance(t0 + 3 * S)
    assert line.future_trades == 1
    assert [json.loads(t)[0] for t in view.trades.recent(real.lookup("BBCA"))] == [1, 3]
