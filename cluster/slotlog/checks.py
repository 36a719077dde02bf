"""Argument checks shared by both slot-log implementations, so that the fake refuses
what the real one refuses: epochs, canonical stream ids (``"<ms>-<seq>"``), counts,
blocks, data, mirror origins and trim margins."""

from __future__ import annotations

import re
from typing import Final

from cluster.keys import check_region
from cluster.slotlog.api import MAX_COUNT, MAX_EPOCH

# Canonical stream ids only: the scripts compare them as decimal strings.
_ID: Final = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})")
_U64: Final = 2**64 - 1


def _check_epoch(epoch: int, *, least: int = 1) -> int:
    if type(epoch) is not int or not least <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch must be an int in {least}..{MAX_EPOCH}, got {epoch!r}")
    return epoch


def _parse_id(entry_id: str, *, zero_ok: bool = True) -> tuple[int, int]:
    m = _ID.fullmatch(entry_id) if isinstance(entry_id, str) else None
    if m is None:
        raise ValueError(f'stream id must be "<ms>-<seq>" (canonical), got {entry_id!r}')
    parsed = (int(m[1]), int(m[2]))
    if parsed[0] > _U64 or parsed[1] > _U64 or (not zero_ok and parsed == (0, 0)):
        raise ValueError(f"stream id out of range: {entry_id!r}")
    return parsed


def _check_count(count: int) -> int:
    if type(count) is not int or not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be an int in 1..{MAX_COUNT}, got {count!r}")
    return count


def _check_block(block_ms: int | None, max_block_ms: int) -> int | None:
    if block_ms is not None and (type(block_ms) is not int or not 1 <= block_ms <= max_block_ms):
        raise ValueError(f"block_ms must be None or an int in 1..{max_block_ms}, got {block_ms!r}")
    return block_ms


def _check_data(data: bytes) -> bytes:
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return data


def _check_origin(region: str, origin: str) -> str:
    if check_region(origin) == region:
        raise ValueError(f"a region does not mirror itself: origin {origin!r}")
    return origin


def _check_margin(margin: int) -> int:
    if type(margin) is not int or not 0 <= margin <= MAX_COUNT:
        raise ValueError(f"margin must be an int in 0..{MAX_COUNT}, got {margin!r}")
    return margin


def _format_id(parsed: tuple[int, int]) -> str:
    return f"{parsed[0]}-{parsed[1]}"
