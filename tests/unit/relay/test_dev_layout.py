"""relay.dev's port layout: every port of a cluster from --port-base, none twice."""

from __future__ import annotations

import socket

from relay.dev import busy_port, port_layout


def test_layout_of_three_regions_with_a_wan() -> None:
    layout = port_layout(20000, ["sg", "fra", "iad"])
    assert layout.node(0) == (20000, 20001, 20002)
    assert layout.node(4) == (20040, 20041, 20042)
    assert [layout.redis(r) for r in ("sg", "fra", "iad")] == [20003, 20013, 20023]
    assert layout.wan_pair("sg", "fra") == 20004
    assert layout.wan_pair("sg", "iad") == 20005
    assert layout.wan_pair("iad", "fra") == 20025
    assert layout.wan_control == 20009
    planned = layout.planned(6, wan=True)
    ports = [p for p, _ in planned]
    assert len(ports) == len(set(ports)) == 6 * 3 + 3 + 1 + 6
    # Nodes added later (index 6, 7, …) never land on Redis or WAN ports.
    later = {p for i in range(6, 40) for p in layout.node(i)}
    assert not later & set(ports)


def test_layout_without_wan_has_no_proxy_ports() -> None:
    planned = port_layout(30000, ["local"]).planned(1, wan=False)
    assert planned == [
        (30000, "node 0 WebSocket"),
        (30001, "node 0 admin"),
        (30002, "node 0 mesh"),
        (30003, "Redis of local"),
    ]


def test_busy_port_names_the_first_taken() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert busy_port([(taken, "x")]) == (taken, "x")
    assert busy_port([]) is None
