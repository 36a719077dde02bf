"""A history of what clients were told, and a checker of what every region holds.

Load generators record each publish they attempted and each ``puback`` they got; acks
record what a subscriber acknowledged (answered ``acked``). The checker then reads every
pending message of every channel in a region (raw, no client-side dedupe) and reports:

- ``lost``: acknowledged at ``log`` (or ``remote``), never acked by a subscriber, not
  pending;
- ``diverged``: acknowledged at ``mem`` (which a failover may lose: at most a batch
  window), not acked, pending in some region and not in another: whatever a region
  kept, every region must keep;
- ``doubled``: pending more than once;
- ``resurrected``: acked by a subscriber, pending again;
- ``invented``: pending but never published.

Traffic goes to loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.wsclient import Client


@dataclass
class History:
    attempted: set[tuple[str, str]] = field(default_factory=set)  # (ch, id)
    published: set[tuple[str, str]] = field(default_factory=set)  # puback at log or above
    published_mem: set[tuple[str, str]] = field(default_factory=set)  # puback at mem
    acked: set[tuple[str, str]] = field(default_factory=set)  # a subscriber's ack answered
    errors: Counter[str] = field(default_factory=Counter)

    def channels(self) -> list[str]:
        return sorted({ch for ch, _ in self.attempted})


@dataclass
class Verdict:
    region: str
    lost: list[tuple[str, str]]
    doubled: list[tuple[str, str]]
    resurrected: list[tuple[str, str]]
    invented: list[tuple[str, str]]
    pending: int
    present: frozenset[tuple[str, str]] = frozenset()
    diverged: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.doubled or self.resurrected or self.invented or self.diverged)

    def __str__(self) -> str:
        return (
            f"{self.region}: {self.pending} pending, lost {len(self.lost)} "
            f"{self.lost[:5]}, doubled {len(self.doubled)} {self.doubled[:5]}, "
            f"resurrected {len(self.resurrected)} {self.resurrected[:5]}, "
            f"invented {len(self.invented)} {self.invented[:5]}, "
            f"diverged {len(self.diverged)} {self.diverged[:5]}"
        )


# Errors a client retries with the same id (PROTOCOL.md: "retry" codes).
RETRY = frozenset({"unavailable", "overloaded", "rate_limited", "internal"})
# Publishes a frame at most (200-byte bodies: well under the node's 1 MiB frame limit).
FRAME_PUBS = 500


async def hello(url: str) -> Client:
    c = await Client.connect(url)
    await c.request({"op": "hello"}, "welcome")
    return c


async def read_pending(url: str, channels: Iterable[str], timeout_s: float = 60) -> list[Any]:
    """Every pending ``(ch, id)`` of ``channels`` through node ``url``, duplicates kept."""
    chans = list(channels)
    c = await hello(url)
    deadline = time.monotonic() + timeout_s
    try:
        for i in range(0, len(chans), 100):
            await c.send([{"op": "sub", "ch": ch} for ch in chans[i : i + 100]])
        want: dict[str, int] = {}
        got: list[tuple[str, str]] = []
        while len(want) < len(chans) or len(got) < sum(want.values()):
            assert time.monotonic() < deadline, "reading pending messages took too long"
            obj = await c.recv(timeout_s=max(0.1, deadline - time.monotonic()))
            if obj["op"] == "subscribed":
                want[obj["ch"]] = obj["pending"]
            elif obj["op"] == "msg":
                got.append((obj["ch"], obj["id"]))
            elif obj["op"] == "error" and obj.get("code") in RETRY and obj.get("ch"):
                # The channel's slot is moving (a handoff): ask again, as a client would.
                await asyncio.sleep(0.1)  # back off before the retry, within the deadline
                await c.send({"op": "sub", "ch": obj["ch"]})
            elif obj["op"] == "error":
                raise AssertionError(f"reading pending: {obj}")
        return got
    finally:
        await c.close()


async def check(region: str, url: str, h: History) -> Verdict:
    pending = await read_pending(url, h.channels())
    counts = Counter(pending)
    return Verdict(
        region=region,
        lost=sorted(k for k in h.published - h.acked if counts[k] == 0),
        doubled=sorted(k for k, n in counts.items() if n > 1),
        resurrected=sorted(k for k in h.acked if counts[k] > 0),
        invented=sorted(k for k in counts if k not in h.attempted),
        pending=len(pending),
        present=frozenset(counts),
    )


async def converged(
    regions: dict[str, str], h: History, timeout_s: float = 60
) -> dict[str, Verdict]:
    """Poll every region until each one's verdict is clean (or the deadline passes);
    return the last verdicts."""
    deadline = time.monotonic() + timeout_s
    while True:
        verdicts = {r: await check(r, url, h) for r, url in regions.items()}
        mem = h.published_mem - h.acked
        kept = [v.present & mem for v in verdicts.values()]
        for v in verdicts.values():
            v.diverged = sorted(set().union(*kept) - v.present)
        if all(v.ok for v in verdicts.values()) or time.monotonic() > deadline:
            return verdicts
        await asyncio.sleep(0.5)  # poll interval while links and owners catch up


class Publisher:
    """One connection publishing ``(ch, id)`` pairs, many in flight, recording pubacks;
    a publish refused with a retry code is sent again with the same id, as the SDK does."""

    def __init__(self, c: Client, h: History, ack: str, body: str) -> None:
        self.c = c
        self.h = h
        self.ack = ack
        self.body = body
        self.in_flight: dict[str, str] = {}
        self.retry: list[tuple[str, str]] = []
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, url: str, h: History, ack: str = "log", body: str = "x" * 200) -> Any:
        return cls(await hello(url), h, ack, body)

    async def _read(self) -> None:
        while True:
            obj = await self.c.recv(timeout_s=3600)
            if obj["op"] == "puback":
                ch = self.in_flight.pop(obj["id"], None)
                if ch is not None:
                    to = self.h.published_mem if obj["ack"] == "mem" else self.h.published
                    to.add((ch, obj["id"]))
            elif obj["op"] == "error":
                ch = self.in_flight.pop(obj.get("id", ""), None)
                self.h.errors[obj["code"]] += 1
                if ch is not None and obj["code"] in RETRY:
                    self.retry.append((ch, obj["id"]))

    async def send(self, pairs: list[tuple[str, str]]) -> None:
        """Publish ``pairs``, at most :data:`FRAME_PUBS` a frame: a retry of everything a
        lost lease refused can be tens of thousands, past a frame's size limit."""
        for ch, msg_id in pairs:
            self.h.attempted.add((ch, msg_id))
            self.in_flight[msg_id] = ch
        for i in range(0, len(pairs), FRAME_PUBS):
            await self.c.send(
                [
                    {"op": "pub", "ch": ch, "id": m, "body": self.body, "ack": self.ack}
                    for ch, m in pairs[i : i + FRAME_PUBS]
                ]
            )

    async def drain(self, timeout_s: float = 60) -> None:
        """Wait until every publish was acknowledged or refused for good, sending the
        retryable ones again (or until the deadline passes)."""
        deadline = time.monotonic() + timeout_s
        while (self.in_flight or self.retry) and time.monotonic() < deadline:
            if self.retry and not self.in_flight:
                again, self.retry = self.retry, []
                await self.send(again)
            await asyncio.sleep(0.05)  # poll until the pubacks are in

    async def close(self) -> None:
        self._reader.cancel()
        await self.c.close()


async def steady(
    url: str,
    h: History,
    *,
    channels: list[str],
    rate: float,
    duration_s: float,
    prefix: str,
    ack: str = "log",
    max_in_flight: int = 2000,
) -> int:
    """Publish at about ``rate`` msgs/s for ``duration_s`` to ``channels`` in turn;
    return how many were sent. Bounded: at most rate × duration publishes."""
    p = await Publisher.connect(url, h, ack)
    n = 0
    total = int(rate * duration_s)
    started = time.monotonic()
    try:
        while n < total and time.monotonic() - started < duration_s * 3:
            due = min(total, int((time.monotonic() - started) * rate) + 1)
            if due > n and len(p.in_flight) < max_in_flight:
                batch = [(channels[i % len(channels)], f"{prefix}-{i}") for i in range(n, due)]
                await p.send(batch)
                n = due
            await asyncio.sleep(0.01)  # pace until the next send is due
        await p.drain()
    finally:
        await p.close()
    return n


async def ack_all(url: str, h: History, keys: Iterable[tuple[str, str]]) -> int:
    """Ack ``keys`` through ``url`` and record those answered; return how many of them
    the node said were pending (the sum of ``acked.n``)."""
    by_ch: dict[str, list[str]] = {}
    for ch, i in keys:
        by_ch.setdefault(ch, []).append(i)
    c = await hello(url)
    n = 0
    try:
        for ch, ids in by_ch.items():
            for j in range(0, len(ids), 1000):
                part = ids[j : j + 1000]
                await c.send({"op": "ack", "ch": ch, "ids": part})
                while True:
                    obj = await c.recv(timeout_s=30)
                    if obj["op"] == "acked":
                        n += obj["n"]
                        break
                    assert obj["op"] != "error", obj
                h.acked.update((ch, i) for i in part)
    finally:
        await c.close()
    return n


def admin_status(admin_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(admin_url + "/status", timeout=5) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


def wan(doc: dict[str, Any], path: str, **params: Any) -> dict[str, Any]:
    """Drive the WAN proxy of a ``relay dev`` cluster (``/set``, ``/reset``): POST, with
    the token from the ready file."""
    body = "&".join(f"{k}={v}" for k, v in params.items()).encode()
    req = urllib.request.Request(f"{doc['wan']['control']}{path}", data=body, method="POST")
    req.add_header("Authorization", f"Bearer {doc['wan']['token']}")
    with urllib.request.urlopen(req, timeout=5) as r:
        out: dict[str, Any] = json.loads(r.read())
        return out
