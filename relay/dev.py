"""``relay dev``: a whole local cluster in one command.

For every region it starts a local Redis (see :mod:`relay.redis_server`) and the region's
nodes as ``relay serve`` processes with anonymous access, waits until every node serves,
then writes the ready file::

    {"regions": {"<name>": {"redis": URL,
                            "nodes": [{"id", "ws", "admin", "pid"}]}}}

Ports are free ones, or every one of them predictable from ``port_base`` (see
:func:`port_layout`). A node that exits (drained, killed) is reported and the rest keeps
serving; :meth:`DevCluster.supervise` also answers requests on a control socket
(:mod:`relay.devctl`) to restart a node or start a new one. Everything is stopped on
SIGINT/SIGTERM.
"""

from __future__ import annotations

# Imports inside functions here are lazy on purpose (tests/unit/test_layers.py allows them
# only at the top layer): the CLI starts fast, and the reactor is installed before
# Twisted loads (relay/entry.py). None hides a cycle.
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from relay.child import stop_child
from relay.errors import RelayError
from relay.redis_server import RedisClusterServers, RedisServer

# Browser origins a dev node accepts: its own loopback pages (the admin port's demo).
DEV_ORIGINS = ("http://127.0.0.1:*", "http://localhost:*", "http://[[]::1]:*")
# With port_base, region k may have a WAN proxy port towards each other region in
# offsets 4..8 of its block: at most 6 regions.
MAX_WAN_REGIONS_WITH_PORT_BASE = 6


class DevError(RelayError):
    """The local cluster could not start, or a node could not be (re)started."""


@dataclass(frozen=True, slots=True)
class PortLayout:
    """Every port of a ``relay dev`` cluster started with ``--port-base``.

    Block i is ``base + 10*i`` … ``+9``. Node i (counting across regions, in order, then
    the nodes added later) listens on ``+0`` (WebSocket), ``+1`` (admin), ``+2`` (mesh)
    of block i. Region k's Redis is ``+3`` of block k; its WAN proxy ports, one towards
    each other region in order, are ``+4`` … ``+8`` of block k; the WAN proxy's control
    port is ``base + 9``.
    """

    base: int
    regions: tuple[str, ...]

    def node(self, index: int) -> tuple[int, int, int]:
        p = self.base + 10 * index
        return p, p + 1, p + 2

    def redis(self, region: str) -> int:
        return self.base + 10 * self.regions.index(region) + 3

    def wan_pair(self, src: str, dst: str) -> int:
        others = [r for r in self.regions if r != src]
        return self.base + 10 * self.regions.index(src) + 4 + others.index(dst)

    @property
    def wan_control(self) -> int:
        return self.base + 9

    def planned(self, nodes: int, wan: bool) -> list[tuple[int, str]]:
        """``(port, what it is)`` of everything started at first, ``nodes`` in all."""
        out: list[tuple[int, str]] = []
        for i in range(nodes):
            ws, admin, mesh = self.node(i)
            out += [
                (ws, f"node {i} WebSocket"),
                (admin, f"node {i} admin"),
                (mesh, f"node {i} mesh"),
            ]
        for r in self.regions:
            out.append((self.redis(r), f"Redis of {r}"))
        if wan:
            out.append((self.wan_control, "WAN proxy control"))
            for a in self.regions:
                for b in self.regions:
                    if a != b:
                        out.append((self.wan_pair(a, b), f"WAN proxy {a}-{b}"))
        return sorted(out)


def port_layout(base: int, regions: list[str]) -> PortLayout:
    """The ports a cluster of ``regions`` uses from ``base`` (see :class:`PortLayout`)."""
    return PortLayout(base, tuple(regions))


def busy_port(ports: list[tuple[int, str]], host: str = "127.0.0.1") -> tuple[int, str] | None:
    """The first of ``ports`` that cannot be bound now, or None."""
    for port, what in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return port, what
    return None


@dataclass
class DevNode:
    id: str
    proc: subprocess.Popen[bytes]
    ready_file: Path
    cmd: list[str] = field(default_factory=list)
    config: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # The supervisor has said that this process exited.
    reported: bool = False


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
    # > 0: each region's Redis is a local Redis Cluster of this many primaries, with a
    # replica each (free ports; no WAN proxy: a cluster's clients reach every node).
    redis_cluster: int = 0
    redis: dict[str, RedisServer | RedisClusterServers] = field(default_factory=dict)
    # Each region's mesh secret (cluster.mesh_secret), fresh for every cluster.
    mesh_secrets: dict[str, str] = field(default_factory=dict)
    nodes: list[DevNode] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    # Redis servers and the WAN proxy whose exit was reported.
    _gone: set[str] = field(default_factory=set)
    # Called with the new ready document after a node is restarted or added.
    on_change: Callable[[dict[str, Any]], None] | None = None
    # Where supervise() prints what happens (node exits, restarts).
    report: Callable[[str], None] = field(
        default=lambda line: print(f"relay dev: {line}", file=sys.stderr, flush=True)
    )

    @property
    def layout(self) -> PortLayout | None:
        return None if self.port_base is None else port_layout(self.port_base, self.regions)

    @property
    def control_path(self) -> Path:
        """The control socket :meth:`supervise` answers on (:mod:`relay.devctl`)."""
        assert self.workdir is not None
        path = self.workdir / "control.sock"
        if len(str(path)) > 100:  # a Unix socket's path is limited to ~104 bytes
            path = Path(tempfile.gettempdir()) / f"relay-dev-{os.getpid()}.sock"
        return path

    def check_ports(self) -> None:
        """Raise DevError naming the first port of ``port_base``'s layout that is busy."""
        layout = self.layout
        if layout is None:
            return
        wan = self.wan_latency_ms is not None and len(self.regions) > 1
        if wan and len(self.regions) > MAX_WAN_REGIONS_WITH_PORT_BASE:
            raise DevError(
                f"--port-base lays out at most {MAX_WAN_REGIONS_WITH_PORT_BASE} regions "
                "with a WAN proxy"
            )
        planned = layout.planned(len(self.regions) * self.nodes_per_region, wan)
        top = planned[-1][0]
        if top > 65535:
            raise DevError(f"--port-base {layout.base} is too high: the cluster needs up to {top}")
        busy = busy_port(planned)
        if busy is not None:
            raise DevError(
                f"port {busy[0]} ({busy[1]}) is in use: choose another --port-base "
                f"(this cluster uses {layout.base}-{top})"
            )

    def start(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Start everything; return the ready document once every node serves."""
        self.check_ports()
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="relay-dev-")
            self.workdir = Path(self._tmp.name)
        try:
            i = 0
            for region in self.regions:
                if self.redis_cluster:
                    self.redis[region] = RedisClusterServers(
                        primaries=self.redis_cluster, replicas=1
                    ).start(timeout_s)
                    continue
                port = self.layout.redis(region) if self.layout else 0
                self.redis[region] = RedisServer(port=port).start()
            if self.wan_latency_ms is not None and len(self.regions) > 1:
                if self.redis_cluster:
                    raise DevError("a WAN proxy cannot stand before a Redis Cluster")
                self._start_wan(timeout_s)
            for region in self.regions:
                for n in range(1, self.nodes_per_region + 1):
                    self._spawn(region, f"n{n}", i)
                    i += 1
            return self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _write_config(
        self,
        node_id: str,
        index: int,
        settings: dict[str, Any] | None,
        ports: tuple[int, int, int] | None = None,
    ) -> Path:
        assert self.workdir is not None
        region, _, name = node_id.partition("/")
        d = self.workdir / region / name
        d.mkdir(parents=True, exist_ok=True)
        ws_port, admin_port, mesh_port = ports or (0, 0, 0)
        if ports is None and self.layout is not None:
            ws_port, admin_port, mesh_port = self.layout.node(index)
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
        return config

    def _spawn(
        self, region: str, name: str, index: int, settings: dict[str, Any] | None = None
    ) -> None:
        assert self.workdir is not None
        node_id = f"{region}/{name}"
        config = self._write_config(node_id, index, settings)
        ready = config.parent / "ready.json"
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
        self.nodes.append(DevNode(node_id, _popen(cmd), ready, cmd, config))

    def add_node(
        self,
        region: str,
        name: str,
        settings: dict[str, Any] | None = None,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """Start one more node in ``region`` (``settings``: extra [cluster] keys, e.g.
        ``{"weight": 0}`` to join with no slot); its ready entry once it serves."""
        if region not in self.regions:
            raise DevError(f"no region {region!r} in this cluster ({', '.join(self.regions)})")
        if any(n.id == f"{region}/{name}" for n in self.nodes):
            raise DevError(f"{region}/{name} exists; restart it instead")
        if self.layout is not None:
            top = self.layout.node(len(self.nodes))[2]
            if top > 65535:
                raise DevError(f"no port left above --port-base for {region}/{name}")
        self._spawn(region, name, len(self.nodes), settings)
        try:
            return self._await(self.nodes[-1], timeout_s)
        except DevError:
            self.nodes[-1].reported = True  # said by the error itself
            raise

    def _await(self, n: DevNode, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not n.ready_file.exists():
            if n.proc.poll() is not None:
                raise DevError(f"node {n.id} exited with {n.proc.returncode}")
            if time.monotonic() > deadline:
                raise DevError(f"{n.id} not serving after {timeout_s}s")
            time.sleep(0.05)  # poll interval while the node starts
        n.info = json.loads(n.ready_file.read_text())
        n.reported = False
        return self.entry(n)

    @staticmethod
    def entry(n: DevNode) -> dict[str, Any]:
        return {"id": n.id, "ws": n.info["ws"], "admin": n.info["admin"], "pid": n.proc.pid}

    def restart(self, node_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Start ``node_id`` again with its config, data directory and ports (after a
        kill or a drain); return its new ready entry once it serves."""
        n = self._node(node_id)
        try:
            n.proc.wait(timeout=10)  # killed a moment ago: reap it
        except subprocess.TimeoutExpired:
            raise DevError(f"{node_id} is still running") from None
        if n.info and n.config is not None:
            # Same client and admin ports as before, so the URLs people use stay good.
            ws = int(n.info["ws"].rsplit(":", 1)[1].split("/", 1)[0])
            admin = int(n.info["admin"].rsplit(":", 1)[1])
            text = n.config.read_text()
            text = text.replace("[client]\nport = 0\n", f"[client]\nport = {ws}\n")
            text = text.replace("[admin]\nport = 0\n", f"[admin]\nport = {admin}\n")
            n.config.write_text(text)
        n.ready_file.unlink(missing_ok=True)
        n.proc = _popen(n.cmd)
        return self._await(n, timeout_s)

    def mesh_secret(self, region: str) -> str:
        """``region``'s mesh secret: what its nodes prove to each other on the mesh."""
        if region not in self.mesh_secrets:
            self.mesh_secrets[region] = secrets.token_urlsafe(32)
        return self.mesh_secrets[region]

    def stop_node(self, node_id: str, timeout_s: float = 15.0) -> None:
        """SIGTERM ``node_id`` (it drains) and wait for it to exit."""
        n = self._node(node_id)
        stop_child(n.proc, timeout_s)
        n.reported = True

    def _node(self, node_id: str) -> DevNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise DevError(f"no node {node_id} in this cluster ({', '.join(x.id for x in self.nodes)})")

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
        layout = self.layout
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
            "--control-port",
            str(layout.wan_control if layout else 0),
        ]
        for a in self.regions:
            for b in self.regions:
                if a != b:
                    listen = layout.wan_pair(a, b) if layout else 0
                    cmd += ["--pair", f"{a}-{b}={listen}:{self.redis[b].port}"]
        self._wan_proc = _popen(cmd)
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
                    self.entry(n)
                    for n in self.nodes
                    if n.id.startswith(region + "/") and n.info and n.proc.poll() is None
                ],
            }
        doc: dict[str, Any] = {"regions": regions}
        if self.wan:
            doc["wan"] = self.wan
        return doc

    # -- supervision ---------------------------------------------------------------

    def wait(self) -> int:
        """Supervise until SIGINT/SIGTERM (see :meth:`supervise`); return 0."""
        return self.supervise()

    def supervise(self, poll_s: float = 0.2) -> int:
        """Block until SIGINT, SIGTERM or SIGHUP, then return 0. Meanwhile report every node that
        exits (the others keep serving) and answer control requests (:mod:`relay.devctl`):
        restart a node, start a new one, list them."""
        from relay.devctl import ControlServer

        stop = {"signal": 0}

        def on_signal(signum: int, _frame: Any) -> None:
            stop["signal"] = signum

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        # A closed terminal or a dropped ssh session: stop everything, as on Ctrl-C (the
        # nodes run in sessions of their own and would outlive us). Under nohup (SIGHUP
        # ignored) it keeps running, as asked.
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            signal.signal(signal.SIGHUP, on_signal)
        control = ControlServer(self.control_path, self.handle)
        try:
            while not stop["signal"]:
                self._report_exits()
                control.serve_once(poll_s)
        finally:
            control.close()
        return 0

    def _report_exits(self) -> None:
        for n in self.nodes:
            if n.reported or n.proc.poll() is None:
                continue
            n.reported = True
            code = n.proc.returncode
            how = "killed by signal " + str(-code) if code < 0 else f"exited with {code}"
            self.report(
                f"node {n.id} {how}; the rest of the cluster keeps serving "
                f"(`relay dev restart {n.id}` starts it again)"
            )
            self._changed()
        others = {
            f"Redis of {r}": s.proc for r, s in self.redis.items() if isinstance(s, RedisServer)
        }
        for r, s in self.redis.items():
            if isinstance(s, RedisClusterServers):
                others.update({f"Redis of {r} ({x.port})": x.proc for x in s.servers})
        others["the WAN proxy"] = self._wan_proc
        for name, proc in others.items():
            if proc is not None and proc.poll() is not None and name not in self._gone:
                self._gone.add(name)
                self.report(f"{name} exited with {proc.returncode}; restart relay dev")

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.document())

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Carry out one control request; the answer to send back."""
        cmd = request.get("cmd")
        try:
            if cmd == "nodes":
                return {"ok": True, "nodes": [self._row(n) for n in self.nodes]}
            node_id = str(request.get("node", ""))
            if cmd == "restart":
                if self._node(node_id).proc.poll() is None:
                    self.stop_node(node_id)
                entry = self.restart(node_id)
                self.report(f"node {node_id} serving again at {entry['ws']} (pid {entry['pid']})")
            elif cmd == "start":
                region, sep, name = node_id.partition("/")
                if not sep or not name:
                    raise DevError(f'node id must be "region/name", got {node_id!r}')
                weight = request.get("weight")
                settings = {} if weight is None else {"weight": float(weight)}
                entry = self.add_node(region, name, settings)
                self.report(f"node {node_id} started at {entry['ws']} (pid {entry['pid']})")
            else:
                return {"ok": False, "error": f"unknown command {cmd!r}"}
        except (DevError, ValueError) as e:
            return {"ok": False, "error": str(e)}
        self._changed()
        return {"ok": True, "node": entry}

    def _row(self, n: DevNode) -> dict[str, Any]:
        code = n.proc.poll()
        row: dict[str, Any] = {"id": n.id, "state": "serving" if code is None else "exited"}
        if code is not None:
            row["exit_code"] = code
        if n.info:
            row.update(ws=n.info["ws"], admin=n.info["admin"])
        row["pid"] = n.proc.pid
        return row

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
            stop_child(self._wan_proc, 10)
            self._wan_proc = None
        for r in self.redis.values():
            r.stop()
        self.redis.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _popen(cmd: list[str]) -> subprocess.Popen[bytes]:
    # A session of its own: Ctrl-C in the terminal reaches only `relay dev`, which then
    # stops its children in order (quietly) instead of every process at once.
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)


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
