"""The bare Autobahn server: the ceiling of this stack (Twisted + Autobahn), no relay.

Same listener options as the node (UTF-8 validation on, TCP_NODELAY, no auto-ping, same
frame limits). It parses nothing above WebSocket:

ingest
    counts each WebSocket message and answers it with a one-byte text frame (``k``), so
    the load generator runs closed-loop exactly as against the node (whose answer is a
    frame of pubacks).
fanout
    a message starting ``{"op":"sub"`` makes its connection a subscriber (answered with
    ``{"op":"subscribed"}``); any other message is sent to every subscriber as one
    frame like the node's ``msg`` frame. ``--send`` picks how: ``prepared``
    (``sendPreparedMessage``, the cheapest public Autobahn call), ``message``
    (``sendMessage``), ``lean`` (the prepared frame straight to ``transport.write``,
    skipping Autobahn's ``sendData``), ``direct`` (straight to the socket when Twisted
    holds nothing for it, as the node does; what the socket refuses goes to Twisted).

Run ``python -m bench.bare --mode ingest --reactor asyncio --ready-file F``; it writes
``{"ws": URL, "pid": PID}`` to F once listening and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def node_msg_frame(body_bytes: int = 200) -> bytes:
    """The JSON ``msg`` frame the node sends for a message like the fan-out load's."""
    from relay.frames import Format, encode_frame
    from relay.session import message_object
    from relay.store import Message

    m = Message(
        "0000000001", "fan", "anon", (1_764_000_000_000 << 16), "local", b"x" * body_bytes, 0
    )
    return encode_frame([message_object(m, Format.JSON)], Format.JSON)


def _install(reactor_name: str) -> Any:
    if reactor_name == "asyncio":
        from relay.entry import install_reactor

        install_reactor()
    elif reactor_name == "epoll":
        from twisted.internet import epollreactor

        epollreactor.install()
    else:
        raise SystemExit(f"unknown reactor {reactor_name!r}")
    from twisted.internet import reactor

    return reactor


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bare")
    ap.add_argument("--mode", choices=["ingest", "fanout"], default="ingest")
    ap.add_argument("--reactor", choices=["asyncio", "epoll"], default="asyncio")
    ap.add_argument("--send", choices=["prepared", "message", "lean", "direct"], default="prepared")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", required=True)
    a = ap.parse_args(argv)
    reactor = _install(a.reactor)

    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

    subscribers: list[Any] = []
    counts = {"messages": 0, "bytes": 0}
    msg_payload = node_msg_frame()

    class Ingest(WebSocketServerProtocol):  # type: ignore[misc]
        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            counts["messages"] += 1
            counts["bytes"] += len(payload)
            self.sendMessage(b"k", False)

    class Fanout(WebSocketServerProtocol):  # type: ignore[misc]
        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            counts["messages"] += 1
            if payload.startswith(b'{"op":"sub"'):
                subscribers.append(self)
                self.sendMessage(b'{"op":"subscribed"}', False)
                return
            if a.send == "message":
                for s in subscribers:
                    s.sendMessage(msg_payload, False)
                return
            pm = self.factory.prepareMessage(msg_payload, False)
            if a.send == "prepared":
                for s in subscribers:
                    s.sendPreparedMessage(pm)
                return
            frame = pm.payloadHybi
            if a.send == "lean":
                for s in subscribers:
                    s.transport.write(frame)
                return
            for s in subscribers:  # direct
                t = s.transport
                if not t._tempDataBuffer and t.offset == len(t.dataBuffer):
                    try:
                        n = t.socket.send(frame)
                    except BlockingIOError:
                        n = 0
                    if n < len(frame):
                        t.write(frame[n:])
                else:
                    t.write(frame)

        def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
            if self in subscribers:
                subscribers.remove(self)

    factory = WebSocketServerFactory("ws://127.0.0.1")
    factory.protocol = Ingest if a.mode == "ingest" else Fanout
    factory.setProtocolOptions(
        maxFramePayloadSize=1048576,
        maxMessagePayloadSize=1048576,
        autoPingInterval=0,
        utf8validateIncoming=True,
        failByDrop=False,
        tcpNoDelay=True,
    )
    port = reactor.listenTCP(a.port, factory, interface="127.0.0.1")
    url = f"ws://127.0.0.1:{port.getHost().port}/v1/ws"
    tmp = a.ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"ws": url, "pid": os.getpid(), "reactor": type(reactor).__name__}, f)
    os.replace(tmp, a.ready_file)
    reactor.run()
    sys.exit(0)


if __name__ == "__main__":
    main()
