"""Release times of a shaped stream: order, latency bounds, the bandwidth cap, no excess."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.errors import ClusterError
from cluster.shaping import (
    MIN_SLICE_BYTES,
    Pacing,
    Shape,
    ShapeError,
    release,
    slice_sizes,
)
from tests.unit.test_boundaries import FORBIDDEN, imported

EPS = 1e-9

shapes = st.builds(
    Shape,
    latency_ms=st.floats(0, 500),
    jitter_ms=st.one_of(st.just(0.0), st.floats(0, 500)),
    bandwidth_bytes_per_s=st.one_of(st.none(), st.floats(1, 1e8)),
)
# Chunks as (seconds since the previous chunk arrived, size in bytes).
arrivals = st.lists(st.tuples(st.floats(0, 2), st.integers(0, 200_000)), min_size=1, max_size=60)


def run(shape: Shape, chunks: list[tuple[float, int]], seed: int) -> list[tuple[float, int, float]]:
    """Feed the chunks in order; return (arrived, size, released) for each."""
    rng = random.Random(seed)
    pacing, now, out = Pacing(), 1000.0, []
    for gap, size in chunks:
        now += gap
        r = release(pacing, now, size, shape, rng)
        pacing = r.pacing
        out.append((now, size, r.at_s))
    return out


@given(shapes, arrivals, st.integers())
def test_releases_never_go_backwards(
    shape: Shape, chunks: list[tuple[float, int]], seed: int
) -> None:
    released = [at for _, _, at in run(shape, chunks, seed)]
    assert released == sorted(released)


@given(shapes, arrivals, st.integers())
def test_no_chunk_is_released_before_the_minimum_latency(
    shape: Shape, chunks: list[tuple[float, int]], seed: int
) -> None:
    floor_s = max(0.0, shape.latency_ms - shape.jitter_ms) / 1000
    for arrived, _, at in run(shape, chunks, seed):
        assert at >= arrived + floor_s - EPS


@given(shapes, arrivals, st.integers())
def test_the_cap_is_respected_over_every_run_of_chunks(
    shape: Shape, chunks: list[tuple[float, int]], seed: int
) -> None:
    bps = shape.bandwidth_bytes_per_s
    if bps is None:
        return
    out = run(shape, chunks, seed)
    for i, (arrived_i, _, _) in enumerate(out):
        sent = 0
        for _, size, at in out[i:]:
            sent += size
            # Bytes i..k cannot all be through before they could have crossed the wire.
            assert at >= arrived_i + sent / bps - 1e-6


@given(shapes, arrivals, st.integers())
def test_nothing_is_held_longer_than_the_model_asks(
    shape: Shape, chunks: list[tuple[float, int]], seed: int
) -> None:
    bps = shape.bandwidth_bytes_per_s
    ceiling_s = (shape.latency_ms + shape.jitter_ms) / 1000
    out = run(shape, chunks, seed)
    for k, (_, _, at) in enumerate(out):
        # When the capped link finishes sending chunk k (work-conserving: it idles only
        # when nothing waits).
        off_wire = max(
            arrived_i + (sum(s for _, s, _ in out[i : k + 1]) / bps if bps else 0.0)
            for i, (arrived_i, _, _) in enumerate(out[: k + 1])
        )
        assert at <= off_wire + ceiling_s + 1e-6


@given(st.floats(0, 500), arrivals)
def test_without_jitter_or_cap_every_chunk_waits_exactly_the_latency(
    latency_ms: float, chunks: list[tuple[float, int]]
) -> None:
    for arrived, _, at in run(Shape(latency_ms=latency_ms), chunks, seed=0):
        assert at == pytest.approx(arrived + latency_ms / 1000, abs=EPS)


@given(shapes, arrivals, st.integers())
def test_the_same_seed_gives_the_same_schedule(
    shape: Shape, chunks: list[tuple[float, int]], seed: int
) -> None:
    assert run(shape, chunks, seed) == run(shape, chunks, seed)


def test_jitter_does_vary_the_delay() -> None:
    out = run(Shape(latency_ms=50, jitter_ms=40), [(1.0, 10)] * 50, seed=7)
    delays = {round(at - arrived, 6) for arrived, _, at in out}
    assert len(delays) > 40
    assert all(0.010 - EPS <= d <= 0.090 + EPS for d in delays)


def test_jitter_larger_than_latency_never_makes_a_negative_delay() -> None:
    for arrived, _, at in run(Shape(latency_ms=5, jitter_ms=100), [(1.0, 10)] * 200, seed=1):
        assert at >= arrived


def test_a_late_chunk_waits_behind_an_earlier_slow_one() -> None:
    class Scripted:
        def __init__(self, draws: list[float]) -> None:
            self.draws = draws

        def uniform(self, a: float, b: float) -> float:
            return self.draws.pop(0)

    shape = Shape(latency_ms=50, jitter_ms=40)
    rng = Scripted([0.040, -0.040])  # first chunk 90 ms, second would be 10 ms
    first = release(Pacing(), 0.0, 1, shape, rng)
    second = release(first.pacing, 0.001, 1, shape, rng)
    assert first.at_s == pytest.approx(0.090)
    assert second.at_s == first.at_s


def test_rng_is_not_drawn_without_jitter() -> None:
    class NoDraws:
        def uniform(self, a: float, b: float) -> float:
            raise AssertionError("drew from the rng")

    r = release(Pacing(), 0.0, 100, Shape(latency_ms=10, bandwidth_bytes_per_s=1000), NoDraws())
    assert r.at_s == pytest.approx(0.1 + 0.01)


def test_the_cap_paces_back_to_back_chunks() -> None:
    shape = Shape(bandwidth_bytes_per_s=1000)
    out = run(shape, [(0.0, 500), (0.0, 500), (0.0, 1000)], seed=0)
    assert [at - 1000.0 for _, _, at in out] == pytest.approx([0.5, 1.0, 2.0])


def test_an_idle_capped_link_does_not_bank_credit() -> None:
    shape = Shape(bandwidth_bytes_per_s=1000)
    out = run(shape, [(0.0, 100), (10.0, 1000)], seed=0)
    assert out[1][2] == pytest.approx(out[1][0] + 1.0)


@given(st.integers(0, 10_000_000), st.one_of(st.none(), st.floats(1, 1e9)))
def test_slices_add_up_and_are_small_enough(size: int, bps: float | None) -> None:
    shape = Shape(bandwidth_bytes_per_s=bps)
    pieces = slice_sizes(size, shape)
    assert sum(pieces) == size
    assert all(p > 0 for p in pieces)
    if bps is None or size == 0:
        assert pieces == ([size] if size else [])
        return
    step = max(MIN_SLICE_BYTES, int(bps * 0.010))
    assert all(p <= step for p in pieces)
    assert all(p == step for p in pieces[:-1])


def test_shape_problems_are_listed_together() -> None:
    bad = Shape(latency_ms=-1, jitter_ms=math.nan, bandwidth_bytes_per_s=0)
    assert len(bad.problems()) == 3
    with pytest.raises(ShapeError) as caught:
        bad.validated()
    assert isinstance(caught.value, ClusterError)
    assert len(caught.value.problems) == 3
    assert Shape(latency_ms=80, jitter_ms=10, bandwidth_bytes_per_s=1e6).problems() == []


def test_shaping_is_pure() -> None:
    path = Path(__file__).resolve().parents[3] / "cluster" / "shaping.py"
    names = imported(path)
    assert not {n for n in names if n.split(".")[0] in FORBIDDEN}
    assert {n for n in names if n.startswith(("relay.", "cluster."))} <= {"cluster.errors"}
