"""What ops commands read from and send to a region's Redis: status, plans and drain.

Synchronous (the CLI's): it reads the leases (the members), the owner record of every
slot (who serves it, under which epoch) and the epoch counter; and it asks a node to
drain by publishing on the region's control channel, then waits until the node's lease
is gone and no slot names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

from cluster.keys import (
    PREFIX,
    control_channel,
    epoch_key,
    lease_prefix,
    members_channel,
    owner_key,
    region_tag,
)
from cluster.membership import Member, decode_leases
from cluster.rebalance import Plan, RingState, effective_weights, make_plan, placement
from cluster.redisconn import SyncClient, connect, connect_sync
from cluster.ringstore import (
    ApplyResult,
    Progress,
    RedisRingStore,
    apply_plan,
    parse_state,
    queue_state,
)
from relay.redact import redact_text, url_without_credentials


class Unreachable(Exception):
    """The region's Redis cannot be reached."""


def _unreachable(url: str, e: Exception) -> Unreachable:
    """The error for a Redis that does not answer, naming it without its password."""
    return Unreachable(f"cannot reach {url_without_credentials(url)}: {redact_text(str(e))}")


class UnknownRegion(LookupError):
    """No node of the region has ever joined through this Redis (a typo, most often)."""


def check_known(r: SyncClient, region: str) -> None:
    """Raise :class:`UnknownRegion` unless a node of ``region`` ever joined through ``r``
    (every join takes an epoch from the region's counter)."""
    if not r.exists(epoch_key(region)):
        raise UnknownRegion(f"no region {region!r} in that Redis: no node of it ever joined")


def _client(url: str) -> SyncClient:
    return connect_sync(url, socket_timeout=5, socket_connect_timeout=5)


def members(r: SyncClient, region: str) -> dict[str, Member]:
    keys = list(r.scan_iter(match=lease_prefix(region) + "*", count=1000))
    return decode_leases(r.mget(keys)) if keys else {}


def ring_state(r: SyncClient, region: str) -> RingState:
    pipe = r.pipeline(transaction=True)
    queue_state(pipe, region)
    return parse_state(pipe.execute())


def owners(r: SyncClient, region: str, slots: int) -> list[tuple[str | None, int]]:
    pipe = r.pipeline(transaction=False)
    for s in range(slots):
        pipe.hmget(owner_key(region, s), "owner", "epoch")
    out: list[tuple[str | None, int]] = []
    for owner, epoch in pipe.execute():
        out.append((owner.decode() if owner else None, int(epoch) if epoch else 0))
    return out


def _node_status(admin: str, token: str, query: str = "") -> dict[str, Any] | None:
    """A node's /status (``query`` e.g. ``?slots=1``), or None when its admin port does
    not answer."""
    import urllib.request

    if not admin:
        return None
    req = urllib.request.Request(admin + "/status" + query)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
            return doc
    except (OSError, ValueError):
        return None


def region_status(url: str, region: str, slots: int = 256, admin_token: str = "") -> dict[str, Any]:
    """Members, slot counts per owner and epochs of ``region``, and what each member
    holds at risk (from its /status; null when its admin port does not answer)."""
    try:
        with _client(url) as r:
            check_known(r, region)
            ms = members(r, region)
            table = owners(r, region, slots)
            ring_epoch = int(r.get(epoch_key(region)) or 0)
            state = ring_state(r, region)
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        raise _unreachable(url, e) from e
    counts = Counter(o for o, _ in table if o is not None)
    change: Any = None
    if state.plan:
        with contextlib.suppress(ValueError):
            doc = json.loads(state.plan)
            change = {"moves": len(doc.get("moves", [])), "held": len(state.holds)}
    return {
        "region": region,
        "ring_epoch": ring_epoch,
        "ring_version": state.version,
        "weights_set": dict(state.weights),
        "held_slots": len(state.holds),
        "change_in_progress": change,
        "members": [
            {
                "id": m.node_id,
                "epoch": m.epoch,
                "ws": m.ws,
                "admin": m.admin,
                "weight": state.weights.get(m.node_id, m.weight),
                "slots": counts.get(m.node_id, 0),
                "data_at_risk": (
                    (_node_status(m.admin, admin_token) or {}).get("cluster") or {}
                ).get("data_at_risk"),
            }
            for m in sorted(ms.values(), key=lambda m: m.node_id)
        ],
        "slots": slots,
        "unowned_slots": sum(1 for o, _ in table if o is None),
        "slots_by_stale_owner": sum(n for o, n in counts.items() if o not in ms),
        "max_slot_epoch": max((e for _, e in table), default=0),
    }


# How long a drained node's "leave" may come after its lease is gone (it releases the
# lease, then announces the leave: one round trip later).
LEAVE_GRACE_S = 2.0


def drain(url: str, region: str, node_id: str, slots: int = 256, timeout_s: float = 30.0) -> str:
    """Ask ``node_id`` to drain and wait until its lease is gone and no slot names it:
    ``"drained"`` when the node announced its leave (it handed its slots over),
    ``"died"`` when its lease ran out instead (the node was killed or cut off: the
    others took its slots over without a hand-over), ``"timeout"`` otherwise."""
    try:
        with _client(url) as r:
            ps = r.pubsub()
            try:
                ps.subscribe(members_channel(region))
                ps.get_message(timeout=5)  # the subscription confirmed
                # Its lease seen after we subscribed: its leave cannot be missed.
                if node_id not in members(r, region):
                    raise LookupError(f"{node_id} holds no lease in region {region}")
                r.publish(control_channel(region), json.dumps({"cmd": "drain", "node": node_id}))
                left = False
                deadline = time.monotonic() + timeout_s
                gone_at: float | None = None
                while time.monotonic() < deadline:
                    left = left or _left(ps, node_id, wait_s=0.1)  # poll interval
                    if gone_at is None and (
                        node_id not in members(r, region)
                        and all(o != node_id for o, _ in owners(r, region, slots))
                    ):
                        gone_at = time.monotonic()
                    if gone_at is not None and (left or time.monotonic() - gone_at > LEAVE_GRACE_S):
                        return "drained" if left else "died"
                return "timeout"
            finally:
                ps.close()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        raise _unreachable(url, e) from e


def _left(ps: Any, node_id: str, wait_s: float) -> bool:
    """Whether a message read within ``wait_s`` announces ``node_id``'s leave with its
    lease still held (a node that wakes after its lease ran out announces one too, with
    ``released`` false)."""
    msg = ps.get_message(ignore_subscribe_messages=True, timeout=wait_s)
    while msg is not None:
        try:
            doc = json.loads(msg["data"])
        except (ValueError, TypeError):
            doc = None
        if (
            isinstance(doc, dict)
            and doc.get("event") == "leave"
            and doc.get("node_id") == node_id
            and doc.get("released", True) is not False  # it left holding its lease
        ):
            return True
        msg = ps.get_message(ignore_subscribe_messages=True, timeout=0)
    return False


LINK_FIELDS = (
    "state",
    "lag_s",
    "backlog_entries",
    "copied_entries",
    "bytes_total",
    "gaps_total",
    "last_error",
    "rtt_ms",
    "inflight_windows",
    "connections",
    "bytes_per_message",
    "compression_ratio",
)


def links_status(url: str, region: str, admin_token: str = "") -> list[dict[str, Any]]:
    """Every link out of ``region``: its holder and, from the holder's /status, its state,
    lag and backlog. A link nobody holds is reported ``down``."""
    try:
        with _client(url) as r:
            check_known(r, region)
            ms = members(r, region)
            prefix = f"{PREFIX}:{region_tag(region)}:link:"
            keys = [k.decode() for k in r.scan_iter(match=prefix + "*", count=1000)]
            leases = {k[len(prefix) :]: r.get(k) for k in keys if ":" not in k[len(prefix) :]}
            dests = {k[len(prefix) :].split(":", 1)[0] for k in keys}
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        raise _unreachable(url, e) from e
    out: list[dict[str, Any]] = []
    for dest in sorted(dests):
        holder_raw = leases.get(dest)
        # The lease holds "<node id>#<incarnation>".
        holder = holder_raw.decode().split("#", 1)[0] if holder_raw else None
        row: dict[str, Any] = {"from": region, "to": dest, "holder": holder, "state": "down"}
        member = ms.get(holder) if holder else None
        if member is not None and member.admin:
            doc = _node_status(member.admin, admin_token)
            if doc is None:
                row["state"] = "unknown"
                row["last_error"] = "the holder's admin port does not answer"
            for link in ((doc or {}).get("cluster") or {}).get("links", []):
                if link["dest"] == dest:
                    row.update({k: link.get(k) for k in LINK_FIELDS})
        out.append(row)
    return out


def ring_weights(url: str, region: str) -> dict[str, float]:
    """The nodes on ``region``'s ring now (live, weight > 0) and their weights."""
    try:
        with _client(url) as r:
            ms = members(r, region)
            state = ring_state(r, region)
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        raise _unreachable(url, e) from e
    weights = effective_weights({n: m.weight for n, m in ms.items()}, state)
    return {n: w for n, w in weights.items() if w > 0}


def ring_plan(
    url: str,
    region: str,
    *,
    add: dict[str, float],
    remove: list[str],
    weights: dict[str, float],
    slots: int | None = None,
    replicas: int | None = None,
    admin_token: str = "",
    live_adds: bool = False,
) -> dict[str, Any]:
    """The exact slot moves of a membership or weight change, what each would carry, and
    the balance before and after; ``"plan"`` is what ``relay ring apply`` carries out.
    ``slots``/``replicas`` default to what the region's nodes recorded.
    Computed only: nothing changes. Raises the errors of
    :func:`cluster.rebalance.make_plan`."""
    try:
        with _client(url) as r:
            check_known(r, region)
            ms = members(r, region)
            state = ring_state(r, region)
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        raise _unreachable(url, e) from e
    leases = {n: m.weight for n, m in ms.items()}
    # Unless told, the shape the region's nodes recorded.
    slots = slots or state.slots or 256
    replicas = replicas or state.replicas or 2
    plan = make_plan(
        region,
        leases,
        state,
        add=add,
        remove=remove,
        weights=weights,
        slots=slots,
        replicas=replicas,
        live_adds=live_adds,
    )
    carried: dict[int, list[int]] = {}
    for m in ms.values():
        doc = _node_status(m.admin, admin_token, "?slots=1")
        # A node that does not answer: its slots' loads are reported as null.
        for k, v in ((doc or {}).get("slots") or {}).items():
            carried[int(k)] = [int(v[0]), int(v[1])]

    def balance(weights: dict[str, float]) -> dict[str, Any]:
        now = placement(weights, RingState(), slots=slots, replicas=replicas)
        if now is None:
            return {"slots_per_node": {}, "max_over_share": None}
        loads = now.loads()
        total_w = sum(weights.values())
        worst = max(loads[n] / (slots * w / total_w) for n, w in weights.items())
        return {"slots_per_node": loads, "max_over_share": round(worst, 3)}

    moves = [
        {
            "slot": mv.slot,
            "from": mv.from_node,
            "to": mv.to_node,
            "messages": carried[mv.slot][0] if mv.slot in carried else None,
            "bytes": carried[mv.slot][1] if mv.slot in carried else None,
        }
        for mv in plan.moves
    ]
    return {
        "region": region,
        "change": {"add": add, "remove": remove, "weight": weights},
        "before": balance(dict(plan.before)),
        "after": balance(dict(plan.after)),
        "moves": moves,
        "moving_slots": len(moves),
        "moving_messages": sum(m["messages"] or 0 for m in moves),
        "moving_bytes": sum(m["bytes"] or 0 for m in moves),
        "plan": plan.to_doc(),
    }


def apply_change(
    url: str,
    plan: Plan | None,
    *,
    region: str,
    max_moving: int,
    move_timeout_s: float,
    on_progress: Callable[[Progress], None],
    slots: int = 256,
    replicas: int = 2,
) -> ApplyResult:
    """Carry ``plan`` out (None: resume the interrupted change of ``region``); see
    :func:`cluster.ringstore.apply_plan` for what it does and raises."""

    async def run() -> ApplyResult:
        client = connect(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            return await apply_plan(
                RedisRingStore(client, region),
                plan,
                max_moving=max_moving,
                move_timeout_s=move_timeout_s,
                on_progress=on_progress,
                slots=slots,
                replicas=replicas,
            )
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        raise _unreachable(url, e) from e
