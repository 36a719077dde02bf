"""``relay dev``: a whole local cluster in one command.

For every region it starts a local Redis (see :mod:`relay.redis_server`) and the region's
nodes as ``relay serve`` processes with anonymous access, waits until every node serves,
then writes the ready file::

    {"regions": {"<name>": {"redis": URL,
                            "nodes": [{"id", "ws", "admin", "pid"}]}}}

Ports are free ones, or ``port_base + 10*i`` (WebSocket), ``+1`` (admin) and ``+2`` (mesh)
for the i-th node when ``port_base`` is given. Everything is stopped on SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from relay.errors import RelayError
from relay.redis_server import RedisServer

# Browser origins a dev node accepts: its own loopback pages (the admin port's demo).
DEV_ORIGINS = ("http://127.0.0.1:*", "http://localhost:*", "http://[[]::1]:*")


class DevError(RelayError):
    """The local cluster could not start."""


@dataclass
class DevNode:
    id: str
    proc: subprocess.Popen[bytes]
    ready_file: Path
    cmd: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class DevCluster:
    regions: list[str]
    nodes_per_region: int = 1
    port_base: int | None = None
    log_level: str = "warning"
    # Extra [cluster] keys for every node (tests shorten leases, for example).
    cluster_settings: dict[str, Any] = field(default_factory=dict)
    # Put a fault proxy (cluster/wan.py) between every pair of regions.
    wan_latency_ms: float | None = None
    wan_jitter_ms: float = 0.0
    wan: dict[str, Any] = field(default_factory=dict)
    _wan_proc: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    redis: dict[str, RedisServer] = field(default_factory=dict)
    # Each region's mesh secret (cluster.mesh_secret), fresh for every cluster.
    mesh_secrets: dict[str, str] = field(default_factory=dict)
    nodes: list[DevNode] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Start everything; return the ready document once every node serves."""
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="relay-dev-")
            self.workdir = Path(self._tmp.name)
        try:
            i = 0
            for region in self.regions:
                self.redis[region] = RedisServer().start()
            if self.wan_latency_ms is not None and len(self.regions) > 1:
                self._start_wan(timeout_s)
            for region in self.regions:
                for n in range(1, self.nodes_per_region + 1):
                    self._spawn(region, f"n{n}", i)
                    i += 1
            return self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _spawn(
        self, region: str, name: str, index: int, settings: dict[str, Any] | None = None
    ) -> None:
        assert self.workdir is not None
        node_id = f"{region}/{name}"
        d = self.workdir / region / name
        d.mkdir(parents=True, exist_ok=True)
        ws_port = admin_port = mesh_port = 0
        if self.port_base is not None:
            ws_port = self.port_base + 10 * index
            admin_port = ws_port + 1
            mesh_port = ws_port + 2
        config = d / "node.toml"
        config.touch(mode=0o600, exist_ok=True)  # it holds the mesh secret
        config.chmod(0o600)
        config.write_text(
            f'[node]\nid = "{node_id}"\ndata_dir = "{d / "data"}"\n'
            f"[client]\nport = {ws_port}\nallow_anonymous = true\n"
            # Pages on loopback only: no other site's page may open a socket here.
            f"allowed_origins = {json.dumps(list(DEV_ORIGINS))}\n"
            f"[admin]\nport = {admin_port}\n"
            f'[cluster]\nredis_url = "{self.redis[region].url}"\nmesh_port = {mesh_port}\n'
            f'mesh_secret = "{self.mesh_secret(region)}"\n'
            f"peers = {json.dumps(self.peer_urls(region))}\n"
            + "".join(
                f"{k} = {v}\n" for k, v in {**self.cluster_settings, **(settings or {})}.items()
            )
        )
        ready = d / "ready.json"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "relay",
            "serve",
            "--config",
            str(config),
            "--ready-file",
            str(ready),
            "--log-level",
            self.log_level,
        ]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.nodes.append(DevNode(node_id, proc, ready, cmd))

    def add_node(
        self,
        region: str,
        name: str,
        settings: dict[str, Any] | None = None,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """Start one more node in ``region`` (``settings``: extra [cluster] keys, e.g.
        ``{"weight": 0}`` to join with no slot); its ready entry once it serves."""
        self._spawn(region, name, len(self.nodes), settings)
        return self._await(self.nodes[-1], timeout_s)

    def _await(self, n: DevNode, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not n.ready_file.exists():
            if n.proc.poll() is not None:
                raise DevError(f"node {n.id} exited with {n.proc.returncode}")
            if time.monotonic() > deadline:
                raise DevError(f"{n.id} not serving after {timeout_s}s")
            time.sleep(0.05)  # poll interval while the node starts
        n.info = json.loads(n.ready_file.read_text())
        return {"id": n.id, "ws": n.info["ws"], "admin": n.info["admin"], "pid": n.proc.pid}

    def restart(self, node_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Start ``node_id`` again with its config and data directory (after a kill);
        return its new ready entry once it serves."""
        n = next(x for x in self.nodes if x.id == node_id)
        try:
            n.proc.wait(timeout=10)  # killed a moment ago: reap it
        except subprocess.TimeoutExpired:
            raise DevError(f"{node_id} is still running") from None
        n.ready_file.unlink(missing_ok=True)
        n.proc = subprocess.Popen(n.cmd, stdin=subprocess.DEVNULL)
        return self._await(n, timeout_s)

    def mesh_secret(self, region: str) -> str:
        """``region``'s mesh secret: what its nodes prove to each other on the mesh."""
        if region not in self.mesh_secrets:
            self.mesh_secrets[region] = secrets.token_urlsafe(32)
        return self.mesh_secrets[region]

    def peer_urls(self, region: str) -> list[str]:
        """``name=url`` of every other region's Redis, as this region's links reach it
        (through the WAN proxy when there is one)."""
        pairs = self.wan.get("pairs", {})
        out = []
        for r in self.regions:
            if r == region:
                continue
            port = pairs.get(f"{region}-{r}")
            url = f"redis://127.0.0.1:{port}/0" if port else self.redis[r].url
            out.append(f"{r}={url}")
        return out

    def _start_wan(self, timeout_s: float) -> None:
        assert self.workdir is not None
        ready = self.workdir / "wan.json"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "cluster.wan",
            "--ready-file",
            str(ready),
            "--latency-ms",
            str(self.wan_latency_ms),
            "--jitter-ms",
            str(self.wan_jitter_ms),
        ]
        for a in self.regions:
            for b in self.regions:
                if a != b:
                    cmd += ["--pair", f"{a}-{b}=0:{self.redis[b].port}"]
        self._wan_proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if self._wan_proc.poll() is not None:
                raise DevError(f"the WAN proxy exited with {self._wan_proc.returncode}")
            if time.monotonic() > deadline:
                raise DevError("the WAN proxy did not start in time")
            time.sleep(0.05)  # poll interval while the proxy starts
        self.wan = json.loads(ready.read_text())

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        waiting = list(self.nodes)
        while waiting:
            for n in list(waiting):
                if n.proc.poll() is not None:
                    raise DevError(f"node {n.id} exited with {n.proc.returncode}")
                if n.ready_file.exists():
                    n.info = json.loads(n.ready_file.read_text())
                    waiting.remove(n)
            if waiting and time.monotonic() > deadline:
                raise DevError(f"nodes not serving after {timeout_s}s: {[n.id for n in waiting]}")
            if waiting:
                time.sleep(0.05)  # poll interval while the nodes start
        return self.document()

    def document(self) -> dict[str, Any]:
        regions: dict[str, Any] = {}
        for region in self.regions:
            regions[region] = {
                "redis": self.redis[region].url,
                "nodes": [
                    {"id": n.id, "ws": n.info["ws"], "admin": n.info["admin"], "pid": n.proc.pid}
                    for n in self.nodes
                    if n.id.startswith(region + "/")
                ],
            }
        doc: dict[str, Any] = {"regions": regions}
        if self.wan:
            doc["wan"] = self.wan
        return doc

    def wait(self) -> int:
        """Block until a node exits or a signal arrives; return an exit status."""
        stop = {"signal": 0}

        def on_signal(signum: int, _frame: Any) -> None:
            stop["signal"] = signum

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["signal"]:
            for n in self.nodes:
                if n.proc.poll() is not None:
                    print(
                        f"relay dev: node {n.id} exited with {n.proc.returncode}", file=sys.stderr
                    )
                    return 1
            time.sleep(0.2)  # poll interval for child exits and signals
        return 0

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes:
            try:
                n.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                n.proc.kill()
                n.proc.wait()
        self.nodes.clear()
        if self._wan_proc is not None:
            self._wan_proc.terminate()
            try:
                self._wan_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._wan_proc.kill()
                self._wan_proc.wait()
            self._wan_proc = None
        for r in self.redis.values():
            r.stop()
        self.redis.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def page_urls(doc: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per region: its dashboard (on its first node's admin port) and its chat demo, whose
    ``?regions=`` names every region's WebSocket URL so one page can move between them."""
    ws = {r: d["nodes"][0]["ws"] for r, d in doc["regions"].items() if d["nodes"]}
    regions = quote(json.dumps(ws, separators=(",", ":")), safe=":/,")
    out: dict[str, dict[str, str]] = {}
    for region, d in doc["regions"].items():
        if not d["nodes"]:
            continue
        admin = d["nodes"][0]["admin"]
        out[region] = {
            "dashboard": f"{admin}/",
            "demo": f"{admin}/demo?region={quote(region, safe='')}&regions={regions}",
        }
    return out


def write_ready_file(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees half a document."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    # Owner-only: it holds the WAN proxy's control token.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, p)
