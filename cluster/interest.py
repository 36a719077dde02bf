"""Who subscribes where: the owner's view (which peers have subscribers for a channel it
owns) and the subscriber's (the owner each locally subscribed channel is registered
with), and when a channel must be registered again.

Pure: the edge sends the mesh messages and runs the re-subscriptions this module names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class Interest:
    """``peers`` (owner side) and ``registered`` (subscriber side) are the live dicts."""

    def __init__(self) -> None:
        self.peers: dict[str, set[str]] = {}
        self.registered: dict[str, str] = {}

    # -- owner side

    def add(self, peer: str, ch: str) -> None:
        """``peer`` has subscribers for ``ch`` (it subscribed, or said so)."""
        self.peers.setdefault(ch, set()).add(peer)

    def remove(self, peer: str, ch: str) -> None:
        """``peer`` has no subscribers for ``ch`` now (or cannot be reached)."""
        peers = self.peers.get(ch)
        if peers is not None:
            peers.discard(peer)
            if not peers:
                del self.peers[ch]

    def drop_channels(self, channels: Iterable[str]) -> None:
        """These channels are not ours now (their slot was lost): nobody to deliver to."""
        for ch in channels:
            self.peers.pop(ch, None)

    # -- subscriber side

    def register(self, ch: str, owner: str) -> None:
        self.registered[ch] = owner

    def unregister(self, ch: str) -> str | None:
        """Forget where ``ch`` is registered; the owner it was registered with, if any."""
        return self.registered.pop(ch, None)

    def follows(self, ch: str, peer: str) -> bool:
        """Deliveries of ``ch`` from ``peer`` are for us (we registered with it)."""
        return self.registered.get(ch) == peer

    def moved(self, owner_of: Callable[[str], str | None]) -> list[str]:
        """Channels registered with an owner that is not theirs now: to register again."""
        return [ch for ch, owner in list(self.registered.items()) if owner_of(ch) != owner]

    # -- both

    def peer_down(self, peer: str) -> list[str]:
        """``peer`` left the mesh: it has no subscribers anywhere now; the channels we had
        registered with it are returned, to register again with their owners."""
        for ch in list(self.peers):
            self.remove(peer, ch)
        return [ch for ch, owner in list(self.registered.items()) if owner == peer]
