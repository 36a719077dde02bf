"""Admin HTTP on its own port: ``/metrics`` (Prometheus) and ``/status`` (JSON).

When ``admin.token`` is set every request must carry ``Authorization: Bearer <token>``
(or ``?token=`` for a browser); others get 401.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from twisted.web import resource
from twisted.web.pages import notFound
from twisted.web.server import Request

if TYPE_CHECKING:
    from relay.server import RelayServer


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

    def render_GET(self, request: Request) -> bytes:
        if not self.allowed(request):
            request.setResponseCode(401)
            request.setHeader("www-authenticate", 'Bearer realm="relay admin"')
            request.setHeader("content-type", "application/json")
            return b'{"error": "unauthorized", "reason": "admin token required"}\n'
        return self.render_authed(request)

    def render_authed(self, request: Request) -> bytes:
        raise NotImplementedError


class Metrics(_Authed):
    def __init__(self, token: str, registry: CollectorRegistry) -> None:
        super().__init__(token)
        self.registry = registry

    def render_authed(self, request: Request) -> bytes:
        request.setHeader("content-type", "text/plain; version=0.0.4; charset=utf-8")
        out: bytes = generate_latest(self.registry)
        return out


class Status(_Authed):
    def __init__(self, token: str, server: RelayServer) -> None:
        super().__init__(token)
        self.relay_server = server

    def render_authed(self, request: Request) -> bytes:
        request.setHeader("content-type", "application/json")
        body: dict[str, Any] = self.relay_server.status()
        return json.dumps(body, indent=2).encode() + b"\n"


class _Root(resource.Resource):
    def getChild(self, path: bytes, request: Request) -> Any:
        return notFound()


def admin_root(server: RelayServer, registry: CollectorRegistry, token: str) -> resource.Resource:
    """The admin site's root resource."""
    root = _Root()
    children: dict[bytes, Any] = {
        b"metrics": Metrics(token, registry),
        b"status": Status(token, server),
    }
    for name, child in children.items():
        root.putChild(name, child)
    return root
