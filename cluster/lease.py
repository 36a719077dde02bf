"""Lua for leases held as ``SET key value PX ttl``: extend or release only if still ours.

A lease that expired and was taken by someone else (a newer incarnation of a node, another
node running a link) must not be extended or deleted by the old holder.
"""

from __future__ import annotations

from typing import Final

# KEYS[1] the lease, ARGV[1] our value, ARGV[2] the TTL in ms. Returns 1 if extended.
RENEW_IF_OURS: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] the lease, ARGV[1] our value. Returns 1 if deleted.
RELEASE_IF_OURS: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
