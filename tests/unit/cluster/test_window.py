"""Link windows (cluster/window.py): packing round-trips, bad frames get a coded error,
and the tuner stays within its bounds."""

from __future__ import annotations

import contextlib

import lz4.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.slotlog import TailEntry
from cluster.window import (
    PREFIX,
    WindowBounds,
    WindowError,
    WindowTuner,
    batch_events,
    bounds_of,
    pack_window,
    unpack_window,
    window_level,
)
from relay.codec import PREFIX as BATCH_PREFIX
from relay.codec import MessageEvent, encode_batch
from relay.config import ClusterConfig, Config
from relay.errors import Code

ids = st.builds(lambda ms, seq: f"{ms}-{seq}", st.integers(1, 2**48), st.integers(0, 2**20))
prevs = st.one_of(st.just(""), st.just("0-0"), ids)
msgs = st.builds(
    lambda i, body: MessageEvent(f"m{i}", f"ch:{i % 7}", "alice", i + 1, "sg", body, 10**12),
    st.integers(0, 10**6),
    st.binary(max_size=300),
)
batches = st.lists(msgs, min_size=1, max_size=5).map(encode_batch)
datas = st.one_of(batches, st.binary(max_size=400))
entries = st.lists(st.builds(TailEntry, st.integers(0, 255), ids, datas, prevs), max_size=40)


@settings(max_examples=60, deadline=None)
@given(entries)
def test_a_window_gives_back_every_entry_with_the_same_id_and_bytes(es: list[TailEntry]) -> None:
    assert unpack_window(pack_window(es), slots=256) == es


def test_a_window_compresses_what_its_entries_share() -> None:
    body = b"see you at the station at six, bring the tickets and the charger " * 3
    es = [
        TailEntry(
            s,
            f"{1000 + s}-0",
            encode_batch([MessageEvent(f"id-{s}", f"room:{s}", "bob", s + 1, "sg", body, 1)]),
            "0-0",
        )
        for s in range(200)
    ]
    frame = pack_window(es)
    # Each entry on its own barely shrinks; the window sees the repetition across slots.
    assert len(frame) < sum(len(e.data) for e in es) / 4
    assert batch_events(es[0].data) == 1


def _frame(body: bytes) -> bytes:
    return PREFIX + lz4.frame.compress(body, store_size=True, content_checksum=True)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"RW",
        b"XX\x01abc",
        b"RW\x02" + b"\x00" * 20,
        b"RW\x01not lz4 at all",
        _frame(b"\xc1"),  # not msgpack
        _frame(b"\x91\x93\x01\x02\x03"),  # rows of the wrong shape
        _frame(b"\x91\x96\xcd\x01\x00\xa31-0\xa0\x00\xc4\x00\x00"),  # slot 256 of 256
        _frame(b"\x91\x96\x01\xa4zz-0\xa0\x00\xc4\x00\x00"),  # not an id
        _frame(b"\x91\x96\x01\xa31-0\xa0\x07\xc4\x00\x00"),  # unknown kind
        _frame(b"\x91\x96\x01\xa31-0\xa0\x00\xc4\x01\x90\x05"),  # batch with a wrong crc
    ],
)
def test_a_malformed_window_gets_a_coded_error(data: bytes) -> None:
    with pytest.raises(WindowError) as info:
        unpack_window(data, slots=256)
    assert info.value.code is Code.BAD_REQUEST


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 200))
def test_damaged_bytes_never_raise_anything_but_a_window_error(junk: bytes, at: int) -> None:
    good = pack_window([TailEntry(1, "5-0", b"abc", "0-0")])
    for data in (junk, good[: at % len(good)] + junk, PREFIX + junk):
        with contextlib.suppress(WindowError):  # anything else fails the test
            unpack_window(data, slots=8)


def test_a_truncated_window_is_refused_whole() -> None:
    frame = pack_window([TailEntry(1, "5-0", b"abc", "0-0")] * 3)
    for n in range(len(frame)):
        with pytest.raises(WindowError):
            unpack_window(frame[:n], slots=8)


def test_the_tuner_covers_the_round_trip_and_grows_with_the_backlog() -> None:
    b = WindowBounds(window_ms=100, min_entries=10, max_entries=1000, min_inflight=2)
    t = WindowTuner(b)
    # No round trip measured yet: the pipe is filled rather than probed window by window.
    assert t.plan(0).inflight == b.max_inflight and t.plan(0).entries == 10
    t.observe_rtt(0.001)
    assert t.plan(0).inflight == 3
    t = WindowTuner(b)
    for _ in range(50):
        t.observe_rtt(0.160)
    assert t.srtt_s is not None and abs(t.srtt_s - 0.160) < 1e-6
    # 160 ms of round trip: a window is confirmed ~320 ms after it is cut, so 4 + 2.
    assert t.plan(5).inflight == 6
    assert t.plan(500).entries == 500
    assert t.plan(10**6) == type(t.plan(0))(1000, b.max_inflight, 0)
    assert t.plan(5).level > 0  # little waits: compress hard


def test_windows_close_early_only_while_little_waits_and_depth_follows_their_cadence() -> None:
    b = WindowBounds(window_ms=100, min_bytes=4096, min_entries=10, max_entries=1000)
    t = WindowTuner(b)
    for _ in range(50):
        t.observe_rtt(0.160)
    assert t.plan(5).close_bytes == 4096  # little waits: a window goes once it holds 4 KiB
    assert t.plan(10**6).close_bytes == 0  # a backlog: windows fill up
    # Windows going every 25 ms: a confirmation ~320 ms away needs 13 + 2 in flight.
    for i in range(200):
        t.observe_sent(i * 0.025)
    assert abs(t.gap_s - 0.025) < 1e-3
    assert t.plan(5).inflight == 15
    # A pause longer than a window counts as one window's time, no more.
    t.observe_sent(1000.0)
    assert t.gap_s <= 0.025 + 0.25 * 0.1
    with pytest.raises(ValueError, match="min_bytes"):
        WindowTuner(WindowBounds(min_bytes=2 << 20))


@given(st.lists(st.floats(0, 30), max_size=20), st.integers(0, 10**7))
def test_the_tuner_never_leaves_its_bounds(rtts: list[float], backlog: int) -> None:
    b = WindowBounds(min_entries=5, max_entries=50, min_inflight=3, max_inflight=7)
    t = WindowTuner(b)
    for r in rtts:
        t.observe_rtt(r)
    p = t.plan(backlog)
    assert 5 <= p.entries <= 50 and 3 <= p.inflight <= 7


def test_a_backlog_held_back_by_the_wan_is_compressed_hard_for_a_while() -> None:
    from cluster.window import HARD_WINDOWS, STEADY_LEVEL

    # Little waiting: the plan's level stands, whatever the socket did.
    assert window_level(STEADY_LEVEL, True, 0) == (STEADY_LEVEL, 0)
    # A backlog whose windows the socket takes at once: fast.
    assert window_level(0, False, 0) == (0, 0)
    # The socket refused most of a window: the next HARD_WINDOWS windows go hard, even
    # where it took the ones packed meanwhile; another refusal renews them.
    level, left = window_level(0, True, 0)
    levels = [level]
    for _ in range(HARD_WINDOWS + 2):
        level, left = window_level(0, False, left)
        levels.append(level)
    assert levels == [STEADY_LEVEL] * HARD_WINDOWS + [0, 0, 0]
    assert window_level(0, True, 1) == (STEADY_LEVEL, HARD_WINDOWS - 1)


def test_bounds_that_do_not_hold_together_are_refused() -> None:
    with pytest.raises(ValueError, match="min_inflight"):
        WindowTuner(WindowBounds(min_inflight=9, max_inflight=3))


def test_a_receiver_whose_lz4_differs_refuses_batches_but_takes_raw_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The link falls back to raw windows when the receiver says a batch "does not
    # rebuild" (cluster/link.py): raw windows carry the log's bytes, nothing to rebuild.
    data = encode_batch([MessageEvent("m1", "c", "s", 1, "sg", b"hi" * 50, 0)])
    entries = [TailEntry(3, "5-0", data, "4-0")]
    batch_window, raw_window = pack_window(entries), pack_window(entries, raw=True)
    assert len(batch_window) != len(raw_window)  # the default decompressed the batch
    assert unpack_window(batch_window, slots=8) == entries
    assert unpack_window(raw_window, slots=8) == entries
    import cluster.window

    real = cluster.window._recompress
    monkeypatch.setattr(cluster.window, "_recompress", lambda p: real(p) + b"\0")
    with pytest.raises(WindowError, match="does not rebuild"):
        unpack_window(batch_window, slots=8)
    assert unpack_window(raw_window, slots=8) == entries


@pytest.mark.parametrize("n", [0, 1, 4, 15, 16, 100, 70_000])
@pytest.mark.parametrize("body", [b"x", bytes(range(256))])
def test_batch_events_counts_small_big_and_incompressible_batches(n: int, body: bytes) -> None:
    # The count is read from the lz4 frame's first literals when it is there, else by
    # decompressing a few bytes: either way the true count (msgpack fixarray, 16 and 32).
    events = [MessageEvent(f"m{i}", "room:1", "ann", i + 1, "sg", body, 1) for i in range(n)]
    assert batch_events(encode_batch(events)) == n


@settings(max_examples=300)
@given(st.binary(max_size=40), st.integers(0, 255))
def test_batch_events_reads_any_bytes_behind_a_codec_header_without_failing(
    tail: bytes, flag: int
) -> None:
    # Foreign bytes behind the header relay.codec's frames begin with: a count (never
    # an error), and an empty stored block holds no events.
    head = BATCH_PREFIX + b"\x04\x22\x4d\x18\x6c\x40" + (5).to_bytes(8, "little") + b"\x00"
    assert batch_events(head + b"\x00\x00\x00\x80" + b"\x95\x01") == 0
    assert 0 <= batch_events(head + bytes([0, 0, 0, flag]) + tail) <= 0xFFFFFFFF


@pytest.mark.parametrize("max_bytes", [1024, 8192, 12 << 10, 1 << 20])
def test_every_valid_window_size_gives_bounds_a_tuner_takes(max_bytes: int) -> None:
    """A small ``link_window_max_bytes`` is valid config: the early-close size follows it
    down rather than failing the node at start."""
    c = Config(cluster=ClusterConfig(link_window_max_bytes=max_bytes))
    assert c.validate() == []
    bounds = bounds_of(c.cluster)
    assert bounds.problems() == []
    assert bounds.min_bytes <= max_bytes
    WindowTuner(bounds)


@given(
    st.lists(st.integers(min_value=0, max_value=63), max_size=200),
    st.integers(min_value=1, max_value=16),
)
def test_stripes_keep_every_slot_on_one_connection_in_order(slots: list[int], n: int) -> None:
    from cluster.linksend import stripes

    entries = [TailEntry(s, f"{i + 1}-0", f"{i}-0", b"x") for i, s in enumerate(slots)]
    parts = stripes(entries, n)
    assert len(parts) == n  # part i always goes on connection i, even when empty
    for i, part in enumerate(parts):
        assert all(e.slot % n == i for e in part)
        # Each part in the order given (ids rise with the position in ``entries``).
        assert [int(e.id.split("-")[0]) for e in part] == sorted(
            int(e.id.split("-")[0]) for e in part
        )
    assert sorted(e.id for p in parts for e in p) == sorted(e.id for e in entries)


def test_a_link_may_use_one_to_sixteen_connections() -> None:
    assert WindowBounds(connections=1).problems() == []
    assert WindowBounds(connections=16).problems() == []
    assert "connections must be 1-16" in WindowBounds(connections=0).problems()
    assert "connections must be 1-16" in WindowBounds(connections=17).problems()
    with pytest.raises(ValueError, match="connections"):
        WindowTuner(WindowBounds(connections=0))
