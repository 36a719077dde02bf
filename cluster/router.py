"""The region node, kept importable by its old name: it lives in :mod:`cluster.region`."""

from __future__ import annotations

from cluster.region import PubWaiter, Router, Unavailable, fields_message, message_fields

__all__ = ["PubWaiter", "Router", "Unavailable", "fields_message", "message_fields"]
