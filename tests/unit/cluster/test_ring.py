"""The ring: slots, owners, preference lists, balance, movement, determinism.

``python -m tests.unit.cluster.test_ring [trials]`` prints the balance and movement figures of
docs/RING.md.
"""

from __future__ import annotations

import math
import random
import statistics
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cluster.errors import ClusterError, RingError
from cluster.ring import Move, ReplicaChange, Ring, diff, replica_diff, slot_of
from tests.unit.test_boundaries import FORBIDDEN, imported

ROOT = Path(__file__).resolve().parents[3]
S = 256

node_ids = st.from_regex(r"[a-z]{1,3}/n[0-9]{1,4}", fullmatch=True)
memberships = st.dictionaries(node_ids, st.floats(0.25, 4.0), min_size=1, max_size=12)


def share(ring: Ring, node_id: str) -> Fraction:
    """The node's weighted mean: what a perfect ring would give it (exact)."""
    total = sum(Fraction(w) for w in ring.members.values())
    return ring.slots * Fraction(ring.members[node_id]) / total


def check(ring: Ring) -> None:
    """What must hold of every ring."""
    owners = ring.assignment()
    assert len(owners) == ring.slots
    assert set(owners) <= set(ring.nodes)
    want = min(ring.replicas, len(ring.nodes))
    for slot in range(ring.slots):
        pref = ring.preference_list(slot)
        assert len(pref) == want and len(set(pref)) == want
        assert pref[0] == owners[slot] == ring.owner(slot)
    assert sum(ring.loads().values()) == ring.slots
    for n in ring.nodes:
        assert ring.loads()[n] == len(ring.slots_of(n)) <= ring.capacity(n)
        # The bound is exact while N <= (load_factor - 1) * S (64 nodes at the defaults).
        assert ring.capacity(n) <= Fraction(ring.load_factor) * share(ring, n)
        assert ring.loads()[n] >= math.floor(Fraction(ring.min_load_factor) * share(ring, n))
        assert set(ring.slots_of(n)) == {s for s in range(ring.slots) if owners[s] == n}
        assert set(ring.replicas_of(n)) == {
            s for s in range(ring.slots) if n in ring.preference_list(s)[1:]
        }


# -- slot_of


def test_slot_of_golden_values() -> None:
    # Slots name Redis keys and snapshot files: these values must never change.
    assert slot_of("inbox:alice") == 47
    assert slot_of("inbox:bob") == 50
    assert slot_of("room:lobby") == 62
    assert slot_of("") == 180
    assert slot_of("é") == 47
    assert slot_of("inbox:alice", 16384) == 14383
    assert slot_of("inbox:alice", 1) == 0


def test_slot_of_is_the_same_in_another_process() -> None:
    code = "from cluster.ring import slot_of; print(slot_of('inbox:alice'), slot_of('x' * 200))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {f"47 {slot_of('x' * 200)}\n"}


@given(st.text(max_size=200), st.integers(1, 4096))
def test_slot_of_is_in_range(channel: str, slots: int) -> None:
    assert 0 <= slot_of(channel, slots) < slots


def test_slot_of_spreads_channels_evenly() -> None:
    counts = Counter(slot_of(f"inbox:user{i}") for i in range(256 * 64))
    chi2 = sum((counts[s] - 64) ** 2 / 64 for s in range(256))
    assert len(counts) == 256
    assert chi2 < 340  # 255 degrees of freedom: p ~ 0.0003


def test_slot_of_refuses_no_slots() -> None:
    with pytest.raises(RingError):
        slot_of("c", 0)


# -- the ring's shape


@settings(max_examples=60, deadline=None)
@given(memberships, st.integers(1, 4))
def test_every_ring_holds_its_invariants(members: dict[str, float], replicas: int) -> None:
    check(Ring(members, replicas=replicas))


@settings(max_examples=30, deadline=None)
@given(memberships, st.randoms(use_true_random=False))
def test_same_members_in_any_order_give_the_same_ring(
    members: dict[str, float], rnd: random.Random
) -> None:
    items = list(members.items())
    rnd.shuffle(items)
    a, b = Ring(members), Ring(dict(items))
    assert a == b and hash(a) == hash(b)
    assert a.assignment() == b.assignment()
    assert [a.preference_list(s) for s in range(S)] == [b.preference_list(s) for s in range(S)]


def test_a_list_of_ids_means_weight_one() -> None:
    assert Ring(["a/1", "b/1"]).assignment() == Ring({"b/1": 1.0, "a/1": 1.0}).assignment()


def test_one_node_owns_everything() -> None:
    ring = Ring(["sg/n1"], replicas=3)
    assert ring.assignment() == ("sg/n1",) * S
    assert ring.preference_list(0) == ("sg/n1",)
    assert ring.replicas_of("sg/n1") == ()


def test_preference_list_is_owner_then_replicas() -> None:
    ring = Ring([f"sg/n{i}" for i in range(5)], replicas=3)
    for slot in range(S):
        owner, *replicas = ring.preference_list(slot)
        assert owner == ring.owner(slot)
        assert all(slot in ring.replicas_of(r) for r in replicas)


@pytest.mark.parametrize("n", range(1, 33))
def test_largest_owner_within_a_quarter_of_the_mean(n: int) -> None:
    ring = Ring([f"sg/n{i}" for i in range(n)])
    check(ring)
    assert max(ring.loads().values()) <= 1.25 * S / n
    assert min(ring.loads().values()) >= math.floor(0.5 * S / n)


@settings(max_examples=40, deadline=None)
@given(st.lists(node_ids, min_size=1, max_size=32, unique=True))
def test_balance_holds_for_any_node_ids(ids: list[str]) -> None:
    ring = Ring(ids)
    assert max(ring.loads().values()) <= 1.25 * S / len(ids)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(node_ids, st.floats(0.25, 4.0), min_size=2, max_size=32))
def test_balance_holds_with_weights(members: dict[str, float]) -> None:
    ring = Ring(members)
    for n, load in ring.loads().items():
        assert math.floor(share(ring, n) / 2) <= load <= Fraction(5, 4) * share(ring, n)


def test_weights_are_respected_roughly() -> None:
    rnd = random.Random(5)
    for _ in range(20):
        light = [f"sg/l{rnd.randrange(10**6)}" for _ in range(4)]
        heavy = [f"sg/h{rnd.randrange(10**6)}" for _ in range(4)]
        ring = Ring({**dict.fromkeys(light, 1.0), **dict.fromkeys(heavy, 2.0)})
        held = sum(len(ring.slots_of(n)) for n in heavy) / S
        assert 0.55 < held < 0.80  # two thirds is fair
        for n in heavy:
            assert len(ring.slots_of(n)) > max(len(ring.slots_of(m)) for m in light) * 0.5


def test_replicas_are_balanced_like_owners() -> None:
    ring = Ring([f"sg/n{i}" for i in range(12)], replicas=3)
    for n in ring.nodes:
        for rank in (1, 2):
            held = sum(1 for s in range(S) if ring.preference_list(s)[rank] == n)
            assert held <= ring.capacity(n)


def test_fewer_nodes_than_replicas_gives_shorter_lists() -> None:
    ring = Ring(["a/1", "b/1"], replicas=4)
    assert {len(ring.preference_list(s)) for s in range(S)} == {2}


def test_more_nodes_than_the_bound_allows_still_places_every_slot() -> None:
    ring = Ring([f"sg/n{i}" for i in range(100)], slots=64)
    assert len(ring.assignment()) == 64 and max(ring.loads().values()) <= 2


# -- errors


def test_bad_rings_list_every_problem() -> None:
    with pytest.raises(RingError) as e:
        Ring({"a/1": -1.0, "b/1": math.nan, "": 1.0}, slots=0, replicas=0, load_factor=0.5)
    assert len(e.value.problems) == 6
    assert isinstance(e.value, ClusterError)
    with pytest.raises(RingError):
        Ring([])
    with pytest.raises(RingError):
        Ring(["a/1", "a/1"])
    with pytest.raises(RingError):
        Ring({"a/1": 1000.0})
    with pytest.raises(RingError):
        Ring("sg/n1")
    with pytest.raises(RingError):
        Ring({1: 1.0})  # type: ignore[dict-item]


def test_asking_a_slot_the_ring_has_not_raises() -> None:
    ring = Ring(["a/1"])
    for bad in (-1, S):
        with pytest.raises(RingError):
            ring.owner(bad)
        with pytest.raises(RingError):
            ring.preference_list(bad)
    with pytest.raises(RingError):
        ring.capacity("z/9")
    with pytest.raises(RingError):
        ring.without_member("z/9")
    assert ring.slots_of("z/9") == () and ring.replicas_of("z/9") == ()


# -- diff and movement


def test_diff_lists_owner_changes_only() -> None:
    old = Ring([f"sg/n{i}" for i in range(4)])
    new = old.with_member("sg/n4")
    moves = diff(old, new)
    assert moves == sorted(moves, key=lambda m: m.slot)
    assert moves == [
        Move(s, a, b)
        for s, (a, b) in enumerate(zip(old.assignment(), new.assignment(), strict=True))
        if a != b
    ]
    assert {m.to_node for m in moves} >= {"sg/n4"}
    assert len([m for m in moves if m.to_node == "sg/n4"]) == len(new.slots_of("sg/n4"))
    assert diff(old, old) == [] and replica_diff(old, old) == []
    changes = replica_diff(old, new)
    assert changes and all(isinstance(c, ReplicaChange) and c.before != c.after for c in changes)
    with pytest.raises(AttributeError):
        moves[0].slot = 1  # type: ignore[misc]
    with pytest.raises(RingError):
        diff(old, Ring(old.nodes, slots=128))


def test_leaving_and_coming_back_restores_the_ring() -> None:
    ring = Ring({f"sg/n{i}": 1.0 + i % 3 for i in range(9)})
    again = ring.without_member("sg/n4").with_member("sg/n4", ring.members["sg/n4"])
    assert again == ring and again.assignment() == ring.assignment()


def movement(trials: int, n_range: range, seed: int = 1) -> dict[int, list[float]]:
    """Owner changes per add and per remove, in units of S/N (N: the larger membership)."""
    rnd = random.Random(seed)
    out: dict[int, list[float]] = {}
    for n in n_range:
        ratios = out.setdefault(n, [])
        for _ in range(trials):
            ids = [f"sg/n{rnd.randrange(10**9)}" for _ in range(n)]
            full = Ring(ids)
            smaller = full.without_member(rnd.choice(ids))
            ratios.append(len(diff(full, smaller)) / (S / n))  # remove one of n
            grown = smaller.with_member(f"sg/x{rnd.randrange(10**9)}")
            ratios.append(len(diff(smaller, grown)) / (S / n))  # add the n-th
    return out


def test_adding_or_removing_a_node_moves_about_s_over_n() -> None:
    figures = movement(trials=4, n_range=range(2, 33))
    every = [r for ratios in figures.values() for r in ratios]
    assert statistics.mean(every) <= 1.5
    assert max(every) <= 3.5


# -- the ring as a state machine


POOL = [f"sg/n{i}" for i in range(20)]


class RingMachine(RuleBasedStateMachine):
    """Nodes join, leave and are reweighted; every ring holds, and few slots move."""

    def __init__(self) -> None:
        super().__init__()
        self.members: dict[str, float] = {"sg/n0": 1.0}
        self.ring = Ring(self.members)

    def step(self, members: dict[str, float], forced: int) -> list[Move]:
        """Rebuild; ``forced`` slots had to move (a node left, came or changed its share)."""
        old, new = self.ring, Ring(members)
        moved = diff(old, new)
        # Beyond the forced moves, only changed capacities move slots, and not many.
        n = max(len(old.nodes), len(new.nodes))
        assert len(moved) <= forced + 3.0 * S / n
        assert {m.from_node for m in moved} <= set(old.nodes)
        assert {m.to_node for m in moved} <= set(new.nodes)
        self.members, self.ring = members, new
        return moved

    @precondition(lambda self: len(self.members) < len(POOL))
    @rule(data=st.data(), weight=st.sampled_from([0.5, 1.0, 1.0, 2.0]))
    def add(self, data: st.DataObject, weight: float) -> None:
        node = data.draw(st.sampled_from([n for n in POOL if n not in self.members]))
        members = {**self.members, node: weight}
        new_load = len(Ring(members).slots_of(node))
        moved = self.step(members, forced=new_load)
        assert len([m for m in moved if m.to_node == node]) == new_load

    @precondition(lambda self: len(self.members) > 1)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(sorted(self.members)))
        lost = len(self.ring.slots_of(node))
        self.step({n: w for n, w in self.members.items() if n != node}, forced=lost)
        assert node not in self.ring.assignment()

    @rule(data=st.data(), weight=st.sampled_from([0.5, 1.0, 2.0, 3.0]))
    def reweight(self, data: st.DataObject, weight: float) -> None:
        node = data.draw(st.sampled_from(sorted(self.members)))
        unchanged = weight == self.members[node]
        members = {**self.members, node: weight}
        # The node must gain or shed the difference of its shares.
        change = abs(len(Ring(members).slots_of(node)) - len(self.ring.slots_of(node)))
        moved = self.step(members, forced=change)
        if unchanged:
            assert moved == []

    @invariant()
    def holds(self) -> None:
        check(self.ring)


RingMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)
test_ring_machine = RingMachine.TestCase


# -- purity


def test_ring_is_pure_core() -> None:
    for module in ("cluster/ring.py", "cluster/errors.py"):
        names = imported(ROOT / module)
        assert not {n for n in names if n.split(".")[0] in FORBIDDEN}, module
        assert {n for n in names if n.split(".")[0] in ("relay", "cluster")} <= {"cluster.errors"}


# -- the figures of docs/RING.md


def report(trials: int) -> None:  # pragma: no cover - run by hand
    import time

    rnd = random.Random(7)
    print("N  cap floor  max/mean  min/mean  move avg  move worst  (S/N units; worst of runs)")
    figures = movement(trials, range(2, 33), seed=3)
    every: list[float] = []
    for n in range(1, 33):
        hi, lo = 0.0, math.inf
        for _ in range(trials):
            ring = Ring([f"sg/n{rnd.randrange(10**9)}" for _ in range(n)])
            loads = ring.loads().values()
            hi, lo = max(hi, max(loads) / (S / n)), min(lo, min(loads) / (S / n))
        ratios = figures.get(n, [0.0])
        every += figures.get(n, [])
        print(
            f"{n:2d} {ring.capacity(ring.nodes[0]):4d} {math.floor(S / n / 2):5d}  "
            f"{hi:8.3f}  {lo:8.2f}  {statistics.mean(ratios):8.2f}  {max(ratios):10.2f}"
        )
    print(f"all N: move avg {statistics.mean(every):.3f}, worst {max(every):.2f}")
    hits: list[float] = []
    for _ in range(trials * 4):
        n = rnd.randint(3, 32)
        ring = Ring([f"sg/n{rnd.randrange(10**9)}" for _ in range(n)])
        dead = rnd.choice(ring.nodes)
        after = ring.without_member(dead)
        lost = ring.slots_of(dead)
        hits.append(sum(after.owner(s) == ring.preference_list(s)[1] for s in lost) / len(lost))
    print(f"replica takes over a dead owner's slot: avg {statistics.mean(hits):.3f}")
    ids = [f"sg/n{i}" for i in range(32)]
    t = time.perf_counter()
    for i in range(50):
        Ring([f"sg/m{i}-{j}" for j in range(32)])
    print(f"build, N=32, cold: {(time.perf_counter() - t) / 50 * 1000:.1f} ms")
    Ring(ids)
    t = time.perf_counter()
    for _ in range(50):
        Ring(ids)
    print(f"build, N=32, vnodes cached: {(time.perf_counter() - t) / 50 * 1000:.1f} ms")
    channels = [f"inbox:user{i}" for i in range(100_000)]
    t = time.perf_counter()
    for c in channels:
        slot_of(c)
    print(f"slot_of: {(time.perf_counter() - t) / len(channels) * 1e9:.0f} ns per call")


if __name__ == "__main__":  # pragma: no cover
    report(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
