"""When each chunk of a shaped TCP stream may be released: latency, jitter, bandwidth cap.

The fault proxy (``cluster.faultproxy``) carries bytes; this module only says *when*. It
takes the time (``now``, seconds) and a random source as arguments and keeps no clock, so
the rules below are checked by property tests, not by waiting.

A direction of a connection is modelled as a link of ``bandwidth_bytes_per_s`` followed by
a one-way delay of ``latency_ms ± jitter_ms``:

- a chunk that arrives at ``now`` starts on the wire once the chunks before it have gone
  (``max(now, wire_free_s)``) and takes ``size / bandwidth`` to send (nothing if uncapped);
- it then travels for ``max(0, latency + uniform(-jitter, +jitter))``;
- it is released no earlier than the chunk before it (``max(released_s, ...)``), so
  jitter never reorders a byte stream: a TCP receiver never sees bytes out of order.

Consequences the tests hold us to: releases never go backwards; a chunk is released no
sooner than ``now + max(0, latency - jitter)``; the bytes of chunks ``i..k`` are released no
sooner than ``size(i..k) / bandwidth`` after chunk ``i`` arrived; and nothing is held longer
than the model asks (release ≤ the time its last byte left the wire + latency + jitter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from cluster.errors import ClusterError

# A capped link sends one chunk in slices of about this long, so the first bytes of a large
# read are not held back until its last byte would have been sent.
SLICE_MS = 10.0
# Never slice finer than this: below it each slice costs more in timers than it gains.
MIN_SLICE_BYTES = 1024


class ShapeError(ClusterError):
    """A shape's settings are out of range; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class RandomSource(Protocol):
    """What jitter draws from (``random.Random`` fits); seeded by the caller."""

    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True, slots=True)
class Shape:
    """How one direction of a link behaves. ``bandwidth_bytes_per_s=None`` is uncapped."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_bytes_per_s: float | None = None

    def problems(self) -> list[str]:
        """Every setting that is out of range (empty when the shape is usable)."""
        found: list[str] = []
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            found.append(f"latency_ms must be a finite number ≥ 0, not {self.latency_ms!r}")
        if not (math.isfinite(self.jitter_ms) and self.jitter_ms >= 0):
            found.append(f"jitter_ms must be a finite number ≥ 0, not {self.jitter_ms!r}")
        bps = self.bandwidth_bytes_per_s
        if bps is not None and not (math.isfinite(bps) and bps > 0):
            found.append(f"bandwidth_bytes_per_s must be > 0 or None, not {bps!r}")
        return found

    def validated(self) -> Shape:
        """This shape, or :class:`ShapeError` listing every problem."""
        found = self.problems()
        if found:
            raise ShapeError(found)
        return self


@dataclass(frozen=True, slots=True)
class Pacing:
    """Where one direction of one connection stands; start each direction at ``Pacing()``."""

    released_s: float = -math.inf  # release time of the latest chunk
    wire_free_s: float = -math.inf  # when the capped link finished sending the latest chunk


@dataclass(frozen=True, slots=True)
class Release:
    """The answer for one chunk: release it at ``at_s``; keep ``pacing`` for the next."""

    at_s: float
    pacing: Pacing


def release(pacing: Pacing, now: float, size: int, shape: Shape, rng: RandomSource) -> Release:
    """When a chunk of ``size`` bytes that arrived at ``now`` may be passed on.

    Call once per chunk, in arrival order, with non-decreasing ``now``, and keep the
    returned ``pacing`` for the next chunk of the same direction. ``rng`` is drawn from
    only when the shape has jitter.
    """
    bps = shape.bandwidth_bytes_per_s
    sent = max(now, pacing.wire_free_s) + (size / bps if bps is not None else 0.0)
    delay_s = shape.latency_ms / 1000.0
    if shape.jitter_ms > 0:
        jitter_s = shape.jitter_ms / 1000.0
        delay_s = max(0.0, delay_s + rng.uniform(-jitter_s, jitter_s))
    at = max(pacing.released_s, sent + delay_s)
    return Release(at, Pacing(released_s=at, wire_free_s=sent if bps is not None else -math.inf))


def slice_sizes(
    size: int, shape: Shape, slice_ms: float = SLICE_MS, min_bytes: int = MIN_SLICE_BYTES
) -> list[int]:
    """Split a chunk of ``size`` bytes into the pieces a capped link releases one by one.

    Uncapped (or a chunk that fits one slice): ``[size]``. The pieces add up to ``size``,
    each is at least ``min_bytes`` except possibly the last, and none takes much longer
    than ``slice_ms`` to send at the cap.
    """
    bps = shape.bandwidth_bytes_per_s
    if size <= 0:
        return []
    if bps is None:
        return [size]
    step = max(min_bytes, int(bps * slice_ms / 1000.0))
    if size <= step:
        return [size]
    full, rest = divmod(size, step)
    return [step] * full + ([rest] if rest else [])
