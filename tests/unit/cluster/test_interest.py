"""Who subscribes where (cluster/interest.py): owner side, subscriber side, re-subscribing."""

from __future__ import annotations

from cluster.interest import Interest


def three_interests() -> Interest:
    """b listens to c1 and c2, c to c1."""
    i = Interest()
    for peer, ch in (("sg/b", "c1"), ("sg/c", "c1"), ("sg/b", "c2")):
        i.add(peer, ch)
    return i


def test_the_owner_side_counts_peers_per_channel_and_forgets_empty_ones() -> None:
    i = three_interests()
    i.remove("sg/b", "c1")
    assert i.peers == {"c1": {"sg/c"}, "c2": {"sg/b"}}
    i.remove("sg/c", "c1")
    i.remove("sg/x", "c9")  # unknown: nothing to do
    assert i.peers == {"c2": {"sg/b"}}
    i.drop_channels(["c2", "c3"])
    assert i.peers == {}


def test_the_subscriber_side_follows_one_owner_per_channel() -> None:
    i = Interest()
    i.register("c1", "sg/a")
    assert i.follows("c1", "sg/a") and not i.follows("c1", "sg/b") and not i.follows("c2", "sg/a")
    i.register("c1", "sg/b")  # moved
    assert i.follows("c1", "sg/b") and not i.follows("c1", "sg/a")
    assert i.unregister("c1") == "sg/b" and i.unregister("c1") is None


def test_channels_whose_owner_moved_are_named_for_re_subscription() -> None:
    i = Interest()
    for ch, owner in (("c1", "sg/a"), ("c2", "sg/b"), ("c3", "sg/a")):
        i.register(ch, owner)
    ring = {"c1": "sg/a", "c2": "sg/a", "c3": None}
    assert i.moved(ring.get) == ["c2", "c3"]
    assert i.registered == {"c1": "sg/a", "c2": "sg/b", "c3": "sg/a"}  # the edge re-registers


def test_a_peer_down_loses_its_interest_and_names_what_we_registered_with_it() -> None:
    i = three_interests()
    i.register("c7", "sg/b")
    i.register("c8", "sg/c")
    assert i.peer_down("sg/b") == ["c7"]
    assert i.peers == {"c1": {"sg/c"}}
    assert i.peer_down("sg/z") == []
