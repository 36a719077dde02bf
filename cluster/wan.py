"""A process of fault proxies standing for the WAN between regions (``relay dev``, tests).

``python -m cluster.wan --pair NAME=LISTEN_PORT:TARGET_PORT … --latency-ms 80`` runs one
:class:`~cluster.faultproxy.FaultProxy` per pair on loopback, and an HTTP control port:

- ``GET /status``: every pair's settings and byte counts (JSON);
- ``POST /set`` with ``pair=NAME&latency_ms=…&jitter_ms=…&blackhole=0|1&bandwidth=…``
  (query or form body): change a pair live (``pair=*`` for all);
- ``POST /reset`` with ``pair=NAME``: reset every connection of a pair.

Every request needs ``Authorization: Bearer <token>`` and a loopback ``Host`` (a web page
elsewhere can neither set the header nor pass a rebinding name); a bad value is answered
400. It writes ``{"control": URL, "token": T, "pairs": {NAME: port}}`` (mode 0600) to
``--ready-file`` once listening, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import secrets
import sys
from typing import Any


def main(argv: list[str] | None = None) -> None:
    from relay.entry import install_reactor

    install_reactor()
    from twisted.internet import reactor as _reactor
    from twisted.web import resource, server

    from cluster.faultproxy import FaultProxy
    from cluster.shaping import ShapeError
    from relay.loopback import host_header_is_loopback
    from relay.server import redacted_access_log

    reactor: Any = _reactor
    ap = argparse.ArgumentParser(prog="python -m cluster.wan", description=__doc__)
    ap.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="NAME=LISTEN:TARGET",
        help="a proxy from 127.0.0.1:LISTEN (0: any free port) to TARGET",
    )
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--control-port", type=int, default=0)
    ap.add_argument("--ready-file", required=True)
    args = ap.parse_args(argv)

    proxies: dict[str, FaultProxy] = {}
    for spec in args.pair:
        name, _, ports = spec.partition("=")
        listen, _, target = ports.partition(":")
        p = FaultProxy(
            reactor,
            "127.0.0.1",
            int(listen),
            "127.0.0.1",
            int(target),
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
        )
        p.start()
        proxies[name] = p

    def chosen(request: Any) -> list[FaultProxy]:
        name = (request.args.get(b"pair") or [b"*"])[0].decode()
        return list(proxies.values()) if name == "*" else [proxies[name]]

    def arg(request: Any, key: str) -> str | None:
        v = request.args.get(key.encode())
        return v[0].decode() if v else None

    token = secrets.token_urlsafe(24)

    def refused(request: Any) -> bytes | None:
        """The answer to a request that may not control the proxies, else None."""
        if not host_header_is_loopback(request.getHeader(b"host")):
            request.setResponseCode(421)
            return b'{"error": "loopback hosts only"}'
        given = request.getHeader(b"authorization") or b""
        if not hmac.compare_digest(given, f"Bearer {token}".encode()):
            request.setResponseCode(401)
            return b'{"error": "the token from the ready file is required"}'
        return None

    class Control(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            if request.path in (b"/set", b"/reset"):
                request.setResponseCode(405)
                request.setHeader(b"allow", b"POST")
                return b'{"error": "use POST"}'
            return self.render_POST(request)

        def render_POST(self, request: Any) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            no = refused(request)
            if no is not None:
                return no
            try:
                path = request.path.decode()
                if path == "/set":
                    bh = arg(request, "blackhole")
                    if bh not in (None, "0", "1"):  # checked before anything changes
                        raise ValueError(f"blackhole must be 0 or 1, not {bh!r}")
                    for p in chosen(request):
                        lat, jit = arg(request, "latency_ms"), arg(request, "jitter_ms")
                        if lat is not None or jit is not None:
                            p.set_latency(float(lat or 0), float(jit or 0))
                        if bh is not None:
                            p.blackhole(bh == "1")
                        bw = arg(request, "bandwidth")
                        if bw is not None:
                            p.set_bandwidth(int(bw) if bw != "none" else None)
                elif path == "/reset":
                    for p in chosen(request):
                        p.reset_all()
                elif path != "/status":
                    request.setResponseCode(404)
                    return b'{"error": "not found"}'
                doc = {
                    name: {
                        "port": p.port,
                        "blackholed": p.blackholed,
                        "latency_ms": p.shape.latency_ms,
                        **_stats(p),
                    }
                    for name, p in proxies.items()
                }
                return json.dumps(doc).encode()
            except (KeyError, ValueError, ShapeError) as e:
                request.setResponseCode(400)
                return json.dumps({"error": str(e)}).encode()

    # Dated by the wall clock: the reactor's clock is monotonic (relay/entry.py).
    site = server.Site(Control(), logFormatter=redacted_access_log)
    control = reactor.listenTCP(args.control_port, site, interface="127.0.0.1")
    ready = {
        "control": f"http://127.0.0.1:{control.getHost().port}",
        "token": token,
        "pairs": {name: p.port for name, p in proxies.items()},
    }
    tmp = args.ready_file + ".tmp"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(ready, f)
    os.replace(tmp, args.ready_file)
    reactor.run()


def _stats(p: Any) -> dict[str, Any]:
    s = p.stats
    return {
        k: getattr(s, k)
        for k in dir(s)
        if not k.startswith("_") and isinstance(getattr(s, k), int | float | bool)
    }


if __name__ == "__main__":
    main(sys.argv[1:])
