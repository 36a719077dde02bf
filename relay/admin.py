"""Admin HTTP on its own port: ``/metrics`` (Prometheus), ``/status`` (JSON), the live
dashboard (``/``, ``/dashboard``) and the chat demo (``/demo``, ``/demo/config``).

When ``admin.token`` is set every request must carry ``Authorization: Bearer <token>``
(or ``?token=`` for a browser); others get 401. The pages' scripts and styles under
``/static/`` are code only, hold no data, and are served without the token (a page
opened with ``?token=`` cannot pass a header on them).

``/status`` is the node's :meth:`~relay.server.RelayServer.status`. ``/status?view=1``
adds ``view``, what the dashboard draws (computed here): the ring's owner of every slot,
the slots this node actually owns, every member as this node sees it, its own lease age,
and the publishes waiting for ``ack=remote``. ``/status?peers=1`` adds ``view`` and ``peers``: the
``/status?view=1`` of every live member of the region, fetched by this node with its own
admin token (the nodes of a region share it), so one page on one node shows the whole
region. Both answer compact JSON.
"""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.pages import errorPage, notFound
from twisted.web.server import NOT_DONE_YET, Request

from relay.loopback import host_header_is_loopback

if TYPE_CHECKING:
    from relay.server import RelayServer

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# The pages load only their own scripts and styles; the demo opens WebSockets to any
# node (its region list names them).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PEER_TIMEOUT_S = 1.5  # a peer's /status slower than this is reported unreachable


def _secure_headers(request: Request) -> None:
    request.setHeader("x-content-type-options", "nosniff")
    request.setHeader("cache-control", "no-store")
    request.setHeader("referrer-policy", "no-referrer")


class _Authed(resource.Resource):
    isLeaf = True

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def allowed(self, request: Request) -> bool:
        if not self.token:
            return True
        header = request.getHeader("authorization") or ""
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not given:
            raw = (request.args or {}).get(b"token", [b""])[0]
            given = raw.decode("utf-8", "replace")
        return hmac.compare_digest(given.encode(), self.token.encode())

    def render_GET(self, request: Request) -> bytes | int:
        if not self.allowed(request):
            request.setResponseCode(401)
            request.setHeader("www-authenticate", 'Bearer realm="relay admin"')
            request.setHeader("content-type", "application/json")
            return b'{"error": "unauthorized", "reason": "admin token required"}\n'
        return self.render_authed(request)

    def render_authed(self, request: Request) -> bytes | int:
        raise NotImplementedError


class Metrics(_Authed):
    def __init__(self, token: str, registry: CollectorRegistry) -> None:
        super().__init__(token)
        self.registry = registry

    def render_authed(self, request: Request) -> bytes:
        request.setHeader("content-type", "text/plain; version=0.0.4; charset=utf-8")
        out: bytes = generate_latest(self.registry)
        return out


def _dumps(body: dict[str, Any], compact: bool = False) -> bytes:
    if compact:
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"
    return json.dumps(body, indent=2).encode() + b"\n"


def _flag(request: Request, name: bytes) -> bool:
    return (request.args or {}).get(name, [b""])[0] in (b"1", b"true")


class Status(_Authed):
    def __init__(self, token: str, server: RelayServer) -> None:
        super().__init__(token)
        self.relay_server = server
        # Kept-alive connections: an open dashboard asks every peer once a second.
        pool = HTTPConnectionPool(server.reactor, persistent=True)
        pool.cachedConnectionTimeout = 30
        self.agent = Agent(server.reactor, connectTimeout=PEER_TIMEOUT_S, pool=pool)

    def render_authed(self, request: Request) -> bytes | int:
        request.setHeader("content-type", "application/json")
        request.setHeader("cache-control", "no-store")
        body: dict[str, Any] = self.relay_server.status()
        router = getattr(self.relay_server, "router", None)
        if _flag(request, b"slots") and router is not None:
            # Pending messages and bytes per owned slot (what a move would carry).
            body["slots"] = {str(k): v for k, v in router.slot_stats().items()}
        want_peers = _flag(request, b"peers")
        if not (want_peers or _flag(request, b"view")):
            return _dumps(body)
        body["view"] = cluster_view(self.relay_server)
        peers = _live_peers(body["view"]) if want_peers else {}
        if not peers:
            if want_peers:
                body["peers"] = {}
            return _dumps(body, compact=True)
        gone = [False]
        request.notifyFinish().addBoth(lambda _: gone.__setitem__(0, True))

        def respond(results: list[tuple[bool, Any]]) -> None:
            body["peers"] = {
                node_id: doc if ok else {"error": "unreachable"}
                for node_id, (ok, doc) in zip(peers, results, strict=True)
            }
            if not gone[0]:
                request.write(_dumps(body, compact=True))
                request.finish()

        fetches = [self._fetch(url) for url in peers.values()]
        DeferredList(fetches, consumeErrors=True).addCallback(respond)
        return NOT_DONE_YET

    def _fetch(self, admin_url: str) -> Deferred[dict[str, Any]]:
        """One peer's ``/status`` (never fails: an error becomes ``{"error": …}``)."""
        token = self.relay_server.config.admin.token
        headers = Headers({b"authorization": [b"Bearer " + token.encode()]}) if token else None
        url = (admin_url + "/status?view=1").encode()
        d: Deferred[Any] = self.agent.request(b"GET", url, headers)

        def got(response: Any) -> Deferred[Any]:
            return readBody(response).addCallback(lambda raw: (response.code, raw))

        def parsed(result: tuple[int, bytes]) -> dict[str, Any]:
            code, raw = result
            if code != 200:
                return {"error": f"HTTP {code}"}
            doc = json.loads(raw)
            return doc if isinstance(doc, dict) else {"error": "not a JSON object"}

        def failed(f: Failure) -> dict[str, Any]:
            # The client wraps what went wrong in a list of failures (``reasons``).
            reasons: list[Failure] = getattr(f.value, "reasons", None) or [f]
            if any(r.check(CancelledError, defer.TimeoutError) for r in reasons):
                return {"error": f"no answer within {PEER_TIMEOUT_S} s"}
            return {"error": reasons[0].getErrorMessage() or repr(reasons[0].value)}

        d.addCallback(got)
        d.addTimeout(PEER_TIMEOUT_S, self.relay_server.reactor)
        d.addCallback(parsed)
        d.addErrback(failed)
        return d


def _live_peers(view: dict[str, Any]) -> dict[str, str]:
    """Node id → admin URL of every other live member (the ones worth asking)."""
    return {
        m["id"]: m["admin"]
        for m in view.get("members", [])
        if m["id"] != view.get("node") and m["admin"] and m["state"] in ("alive", "suspect")
    }


def cluster_view(server: RelayServer) -> dict[str, Any]:
    """What the dashboard draws, as this node sees it (see the module docstring)."""
    node = server.node
    router = server.router
    base: dict[str, Any] = {"node": node.node_id, "region": node.region, "admin": server.admin_url}
    if router is None:
        return base | {
            "standalone": True,
            "slots": 0,
            "members": [
                {
                    "id": node.node_id,
                    "state": "alive",
                    "epoch": None,
                    "weight": None,
                    "ws": server.ws_url,
                    "admin": server.admin_url,
                    "ring_slots": 0,
                }
            ],
            "at_risk": {"remote_waiting": 0},
        }
    ring = router.ring
    ring_nodes: list[str] = list(ring.nodes) if ring is not None else []
    index = {n: i for i, n in enumerate(ring_nodes)}
    loads: dict[str, int] = ring.loads() if ring is not None else {}
    members = []
    for node_id, state in router.detector.members().items():
        m = router.members.get(node_id)
        members.append(
            {
                "id": node_id,
                "state": state.value,
                "epoch": router.detector.epoch(node_id),
                "weight": m.weight if m is not None else None,
                "ws": m.ws if m is not None else "",
                "admin": m.admin if m is not None else "",
                "ring_slots": loads.get(node_id, 0),
            }
        )
    lease: dict[str, Any] = {"ttl_s": router.lease_ttl_s, "age_s": None, "fresh": False}
    membership = router.membership
    if membership is not None and membership.lease_valid_until:
        renewed_at = membership.lease_valid_until - router.lease_ttl_s
        lease["age_s"] = round(max(0.0, time.monotonic() - renewed_at), 3)
        lease["fresh"] = router.lease_fresh()
    owners: list[int] = []
    replicas: list[int] = []
    if ring is not None:
        for slot in range(ring.slots):
            pref = ring.preference_list(slot)
            owners.append(index[pref[0]])
            replicas.append(index[pref[1]] if len(pref) > 1 else -1)
    return base | {
        "standalone": False,
        "slots": router.slots,
        "replicas": router.replicas,
        "draining": router.draining,
        # A planned change (relay ring apply) under way: slots still held by old owners.
        "ring_version": router.ring_state.version,
        "held_slots": len(ring.holds) if ring is not None else 0,
        "ring_nodes": ring_nodes,
        "ring_owner": owners,
        "ring_replica": replicas,
        "owned": sorted(router.owned),
        "claiming": sorted(router.claiming),
        "members": members,
        "lease": lease,
        # Besides ``cluster.data_at_risk`` (unlogged events, unsaved slots): publishes
        # accepted here and still waiting for ``ack=remote``.
        "at_risk": {"remote_waiting": sum(len(w) for w in router.remote_waiters.values())},
    }


class Page(_Authed):
    """One HTML page of ``relay/static`` (``/demo`` and ``/demo/`` alike)."""

    isLeaf = False

    def __init__(self, token: str, filename: str) -> None:
        super().__init__(token)
        self.path = STATIC_DIR / filename

    def getChild(self, path: bytes, request: Request) -> Any:
        return self if path == b"" else notFound()

    def render_authed(self, request: Request) -> bytes:
        _secure_headers(request)
        request.setHeader("content-type", CONTENT_TYPES[".html"])
        request.setHeader("content-security-policy", CSP)
        return self.path.read_bytes()


class DemoConfig(_Authed):
    """What the demo page needs from the node: its region and WebSocket URL."""

    def __init__(self, token: str, server: RelayServer) -> None:
        super().__init__(token)
        self.relay_server = server

    def render_authed(self, request: Request) -> bytes:
        s = self.relay_server
        request.setHeader("content-type", "application/json")
        request.setHeader("cache-control", "no-store")
        return _dumps(
            {
                "node": s.node.node_id,
                "region": s.node.region,
                "ws": s.ws_url,
                "regions": {s.node.region: s.ws_url},
                "anonymous": s.config.client.allow_anonymous,
            }
        )


class Static(resource.Resource):
    """The pages' scripts and styles: the files of ``relay/static`` by name, nothing else."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        names = [p.decode("utf-8", "replace") for p in request.postpath or []]
        suffix = Path(names[0]).suffix if len(names) == 1 else ""
        path = STATIC_DIR / names[0] if suffix in (".js", ".css") else None
        if path is None or not path.is_file() or path.parent != STATIC_DIR:
            request.setResponseCode(404)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return b"not found\n"
        _secure_headers(request)
        request.setHeader("content-type", CONTENT_TYPES[suffix])
        return path.read_bytes()


class _Root(resource.Resource):
    def __init__(self, loopback_only: bool) -> None:
        super().__init__()
        self.loopback_only = loopback_only

    def getChildWithDefault(self, path: bytes, request: Request) -> Any:
        # Bound to loopback: a Host that is not loopback is DNS rebinding or a proxy
        # error, never a legitimate client of this port.
        if self.loopback_only and not host_header_is_loopback(request.getHeader(b"host")):
            return errorPage(421, "Misdirected Request", "this port answers loopback hosts only")
        return super().getChildWithDefault(path, request)

    def getChild(self, path: bytes, request: Request) -> Any:
        return notFound()


def admin_root(
    server: RelayServer, registry: CollectorRegistry, token: str, *, loopback_only: bool = False
) -> resource.Resource:
    """The admin site's root resource; ``loopback_only`` (the port is bound to loopback)
    answers 421 to any request whose ``Host`` is not a loopback address."""
    root = _Root(loopback_only)
    dashboard = Page(token, "dashboard.html")
    demo = Page(token, "demo.html")
    config: Any = DemoConfig(token, server)
    demo.putChild(b"config", config)
    children: dict[bytes, Any] = {
        b"metrics": Metrics(token, registry),
        b"status": Status(token, server),
        b"": dashboard,
        b"dashboard": dashboard,
        b"demo": demo,
        b"static": Static(),
    }
    for name, child in children.items():
        root.putChild(name, child)
    return root
