"""The node's hot path without sockets: ``Session.receive`` → frames → ``Node.publish`` →
replies encoded, as the edge does for every frame (``python -m bench.hotpath``).

It imports ``relay`` from ``sys.path``, so the same script measures another checkout of
the code (``relay bench hotpath --baseline REF`` puts ``git show REF:relay/…`` first on
the path of a second process).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bench.loadgen import body_of


def frames_for(conn: int, batch: int, count: int) -> list[bytes]:
    body = body_of()
    prefix = b'{"op":"pub","ch":"bench:%d","ack":"mem","body":"%s","id":"' % (conn, body)
    out = []
    seq = 0
    for _ in range(count):
        objs = [b'%s%d"}' % (prefix, k) for k in range(seq, seq + batch)]
        seq += batch
        out.append(objs[0] if batch == 1 else b"[" + b",".join(objs) + b"]")
    return out


def run(batch: int, msgs: int, conns: int = 100, profile: bool = False) -> dict[str, Any]:
    import relay
    from relay.dedupe import DedupeIndex
    from relay.frames import Format, encode_frame
    from relay.node import Node
    from relay.session import Limits, Session
    from relay.store import PendingStore

    node = Node(
        node_id="bench/n1",
        region="bench",
        store=PendingStore(channel_max_messages=10**9, channel_max_bytes=10**12),
        dedupe=DedupeIndex(window_ms=600_000, max_ids=4_000_000),
    )
    limits = Limits(rate_per_s=1e9, burst=10**9, allow_anonymous=True)
    sessions = [
        Session(node=node, fmt=Format.JSON, limits=limits, verifier=None, now_s=0.0)
        for _ in range(conns)
    ]
    per_conn = max(1, msgs // batch // conns)
    work = [(sessions[i], frames_for(i, batch, per_conn)) for i in range(conns)]
    now_ms = 1_764_000_000_000
    # The hello first, so every reply counted below is a puback.
    for s, _ in work:
        s.receive(b'{"op":"hello"}', 0.0, now_ms)

    def go() -> int:
        n = 0
        for k in range(per_conn):
            for s, frames in work:
                out = s.receive(frames[k], 1.0, now_ms + k)
                encode_frame(out.replies, Format.JSON)
                n += len(out.replies)
        return n

    if profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        go()
        pr.disable()
        pstats.Stats(pr, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        return {}
    t0, c0 = time.perf_counter(), time.process_time()
    n = go()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    total = per_conn * conns * batch
    assert n == total, (n, total)
    return {
        "relay": relay.__file__,
        "batch": batch,
        "msgs": total,
        "us_per_msg": round(dt / total * 1e6, 3),
        # CPU time: steadier than wall time on a machine shared with other work.
        "cpu_us_per_msg": round(cpu / total * 1e6, 3),
        "msgs_per_s": round(total / dt),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hotpath")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--msgs", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args(argv)
    if a.profile:
        run(a.batch, a.msgs, profile=True)
        return
    runs = [run(a.batch, a.msgs) for _ in range(a.repeat)]
    best = sorted(runs, key=lambda r: float(r["us_per_msg"]))[len(runs) // 2]
    best["runs_us_per_msg"] = [r["us_per_msg"] for r in runs]
    sys.stdout.write(json.dumps(best) + "\n")


if __name__ == "__main__":
    main()
