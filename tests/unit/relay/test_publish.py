"""The owner's publish decision (relay/publish.py): every case, standalone and in a region."""

from __future__ import annotations

import pytest

from relay.hlc import from_ms
from relay.node import Accepted
from relay.publish import STANDALONE, PubPlan, Wait, plan_pub, puback, puback_fields

L, N, R = Wait.LOG, Wait.NONE, Wait.REMOTE


@pytest.mark.parametrize("dup", [False, True])
@pytest.mark.parametrize("ack", ["mem", "log", "remote"])
def test_a_standalone_node_answers_mem_at_once_whatever_was_asked(dup: bool, ack: str) -> None:
    plan = plan_pub(dup=dup, ack=ack, logged=False, batch_busy=True, remote_known=True)
    assert plan == PubPlan("mem", N, False) and plan is STANDALONE  # what the session reads


@pytest.mark.parametrize(
    ("ack", "expected"),
    [
        ("mem", PubPlan("mem", N, True)),
        ("log", PubPlan("log", L, True)),
        ("remote", PubPlan("remote", L, True)),
    ],
)
def test_a_new_message_in_a_region_is_logged_and_waits_unless_mem(
    ack: str, expected: PubPlan
) -> None:
    # A new message's first wait is the log; ack=remote then waits on (appends.py).
    assert plan_pub(dup=False, ack=ack, logged=True, batch_busy=True, remote_known=True) == expected


@pytest.mark.parametrize(
    ("ack", "busy", "remote", "expected"),
    [
        ("mem", False, False, PubPlan("mem", N, False)),
        ("mem", True, True, PubPlan("mem", N, False)),  # mem never waits
        ("log", True, False, PubPlan("log", L, False)),  # first copy still on its way
        ("log", False, True, PubPlan("log", N, False)),  # first copy logged
        ("remote", True, True, PubPlan("remote", L, False)),
        ("remote", False, True, PubPlan("remote", R, False)),
        ("remote", False, False, PubPlan("log", N, False)),  # no link: logged is all there is
    ],
)
def test_a_duplicate_in_a_region_is_answered_with_its_first_copys_fate(
    ack: str, busy: bool, remote: bool, expected: PubPlan
) -> None:
    assert (
        plan_pub(dup=True, ack=ack, logged=True, batch_busy=busy, remote_known=remote) == expected
    )


def test_puback_fields() -> None:
    acc = Accepted(hlc=from_ms(1234) | 7, origin="sg", dup=True)
    fields = {"ts": 1234, "origin": "sg", "ack": "log", "dup": True}
    assert puback_fields(acc, "log") == fields
    assert puback("m1", "c", acc, "log") == {"op": "puback", "id": "m1", "ch": "c", **fields}
