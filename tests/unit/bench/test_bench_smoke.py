"""The benchmark code runs, with tiny counts (real benchmark runs are not tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import hotpath, memory
from bench.commands import register
from bench.procs import run_loadgen, server, tail_on_failure
from bench.wire import FrameReader, Masker


def test_masked_frames_unmask_to_the_payload() -> None:
    m = Masker(b"\x01\x02\x03\x04")
    for n in (0, 5, 125, 126, 300, 65535, 65536):
        payload = bytes(i % 251 for i in range(n))
        frame = m.frame(payload)
        assert frame[0] == 0x81 and frame[1] & 0x80
        head = 2 + (2 if 126 <= n < 65536 else 8 if n >= 65536 else 0)
        key, masked = frame[head : head + 4], frame[head + 4 :]
        assert key == m.key
        assert bytes(b ^ key[i % 4] for i, b in enumerate(masked)) == payload


def test_frame_reader_splits_server_frames_fed_a_byte_at_a_time() -> None:
    got: list[tuple[int, bytes]] = []
    r = FrameReader(lambda op, p: got.append((op, p)))
    frames = [bytes((0x81, 3)) + b"abc", bytes((0x82, 126)) + (200).to_bytes(2, "big") + b"x" * 200]
    for b in b"".join(frames):
        r.feed(bytes([b]))
    assert got == [(1, b"abc"), (2, b"x" * 200)]


def test_hotpath_and_memory_run_small() -> None:
    r = hotpath.run(batch=10, msgs=1000, conns=10)
    assert r["msgs"] == 1000 and r["us_per_msg"] > 0
    m = memory.run(messages=2000, channels=200, body_bytes=200, id_chars=20)
    assert m["messages"] == 2000 and m["channels"] == 200 and m["encoded_msg_bytes"] > 200


def test_ingest_against_a_node_and_fanout_against_the_bare_server() -> None:
    with server("node") as srv:
        r = run_loadgen(srv, "ingest", conns=2, batch=3, window=2, duration=0.3, warmup=0.1)
    assert r["msgs"] > 0 and r["errors"] == 0 and r["msgs"] % 3 == 0
    with server("bare-asyncio", mode="fanout") as srv:
        f = run_loadgen(srv, "fanout", conns=3, window=2, duration=0.3, warmup=0.1)
    assert f["deliveries"] > 0 and f["subs"] == 3


def test_relay_bench_lists_its_commands() -> None:
    import click

    @click.group()
    def group() -> None:
        pass

    register(group)
    out = CliRunner().invoke(group, ["--help"]).output
    for name in ("ingest", "delivery", "memory", "hotpath"):
        assert name in out


def test_a_failed_run_prints_the_tail_of_the_log_and_raises_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "nodes.log"
    log.write_text("\n".join(f"line {i}" for i in range(50)))
    with pytest.raises(RuntimeError, match="boom"), tail_on_failure(log, "the nodes'"):
        raise RuntimeError("boom")
    err = capsys.readouterr().err.splitlines()
    assert err == ["last lines of the nodes' output:", *(f"line {i}" for i in range(10, 50))]
