"""Membership against a real Redis: joins, leaves and expiries are pushed, not polled."""

from __future__ import annotations

from redis.asyncio import Redis

from cluster.keys import lease_key
from cluster.membership import Expired, Joined, Left, Member, Membership, MembershipEvent
from tests.conftest import aio, until


class Seen:
    def __init__(self) -> None:
        self.events: list[MembershipEvent] = []
        self.lost = 0

    def on_event(self, e: MembershipEvent) -> None:
        self.events.append(e)

    def on_lost(self) -> None:
        self.lost += 1


def member(url: str, name: str, seen: Seen, ttl_ms: int = 3000) -> Membership:
    return Membership(
        client=Redis.from_url(url),
        region="sg",
        me=Member(f"sg/{name}", 0, f"127.0.0.1:{name}"),
        lease_ttl_ms=ttl_ms,
        renew_ms=ttl_ms // 3,
        on_event=seen.on_event,
        on_lease_lost=seen.on_lost,
    )


@aio
async def test_join_leave_and_expiry_reach_the_others(redis_url: str) -> None:
    s1, s2 = Seen(), Seen()
    m1 = member(redis_url, "n1", s1, ttl_ms=600)
    await m1.join()
    await m1.start()
    m2 = member(redis_url, "n2", s2, ttl_ms=600)
    me2 = await m2.join()
    await m2.start()
    assert me2.epoch > m1.me.epoch
    await until(
        lambda: any(isinstance(e, Joined) and e.member.node_id == "sg/n2" for e in s1.events),
        what="join seen",
    )
    snap = await m1.snapshot()
    assert set(snap) == {"sg/n1", "sg/n2"} and snap["sg/n2"].epoch == me2.epoch
    # n2 stalls: it stops renewing; its lease expires and n1 hears of it.
    await m2.stop()
    await until(lambda: Expired("sg/n2") in s1.events, timeout_s=5, what="expiry seen")
    # A graceful leave is announced at once.
    m3 = member(redis_url, "n3", Seen())
    me3 = await m3.join()
    await m3.leave()
    await until(lambda: Left("sg/n3", me3.epoch) in s1.events, what="leave seen")
    assert "sg/n3" not in await m1.snapshot()
    await m1.leave()
    await m1.stop()
    for m in (m1, m2, m3):
        await m.client.aclose()


@aio
async def test_lease_lost_is_reported(redis_url: str) -> None:
    seen = Seen()
    m = member(redis_url, "n1", seen, ttl_ms=600)
    await m.join()
    await m.start()
    await m.client.delete(lease_key("sg", "sg/n1"))
    await until(lambda: seen.lost == 1, what="lease lost")
    await m.stop()
    await m.client.aclose()


def test_member_round_trip() -> None:
    m = Member("sg/n1", 3, "127.0.0.1:9", "ws://x", "http://y", 2.0)
    assert Member.decode(m.encode()) == m


@aio
async def test_expiries_are_heard_again_after_redis_forgot_its_notification_config(
    redis_url: str,
) -> None:
    # A Redis restarted with its data (AOF) keeps the leases but forgets CONFIG SET
    # notify-keyspace-events: the membership's reconnection must enable it again, or no
    # dead node's expiry is ever heard.
    s1 = Seen()
    m1 = member(redis_url, "n1", s1, ttl_ms=600)
    await m1.join()
    await m1.start()
    m2 = member(redis_url, "n2", Seen(), ttl_ms=600)
    await m2.join()
    await m2.start()
    admin = Redis.from_url(redis_url)
    await admin.config_set("notify-keyspace-events", "")  # as after the restart
    await admin.client_kill_filter(_type="pubsub")  # the restart's dropped connections
    await m2.stop()  # n2 dies
    await until(lambda: Expired("sg/n2") in s1.events, timeout_s=10, what="expiry heard")
    flags = (await admin.config_get("notify-keyspace-events"))["notify-keyspace-events"]
    assert "E" in flags and ("x" in flags or "A" in flags), flags
    await m1.leave()
    await m1.stop()
    await admin.aclose()


@aio
async def test_a_rejoin_takes_an_epoch_above_what_it_has_seen_if_redis_lost_the_counter(
    redis_url: str,
) -> None:
    # The region's Redis restarted empty: its epoch counter starts again at 1. A node
    # that rejoins names the highest epoch it has seen, and gets one above it: its peers
    # ignore a lease whose epoch is not above the incarnation they recorded.
    client = Redis.from_url(redis_url)
    await client.flushall()
    m = member(redis_url, "n1", Seen())
    assert (await m.join()).epoch == 1
    assert (await m.join(floor=7)).epoch == 8  # the counter was at 2: raised past 7
    assert (await m.join(floor=3)).epoch == 9  # above the floor already: counted on
    other = member(redis_url, "n2", Seen())
    assert (await other.join()).epoch == 10  # whoever joins next is above both
    seen_lease: list[bool] = []

    async def record(epoch: int) -> None:  # the node writes it to its disk here
        seen_lease.append(bool(await client.exists(lease_key("sg", "sg/n1"))))
        assert epoch == 11

    await m.leave()
    assert (await m.join(record=record)).epoch == 11
    assert seen_lease == [False]  # recorded before anyone could see the lease
    await m.leave()
    await other.leave()
    await client.aclose()
