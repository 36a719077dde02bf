-- The fenced append of several slots in one call (one Redis server, not a Cluster: the
-- slots' keys hash apart). Per slot exactly what append.lua does; one call instead of one
-- per slot is what keeps a busy node's group commit cheap on both sides.
-- KEYS[2k-1] slot k's owner record, KEYS[2k] its slot log
-- ARGV[1] node id, then per slot: its epoch, n, its n batches (appended in this order)
-- Returns, per slot, {1, entry id, ...} or {0, epoch in force, owner} (nothing written).
local out = {}
local a = 2
for k = 1, #KEYS / 2 do
  local owner_key, log_key = KEYS[2 * k - 1], KEYS[2 * k]
  local epoch, n = ARGV[a], tonumber(ARGV[a + 1])
  local rec = redis.call('HMGET', owner_key, 'owner', 'epoch')
  if rec[1] == ARGV[1] and rec[2] == epoch then
    local last = redis.call('XREVRANGE', log_key, '+', '-', 'COUNT', 1)
    local prev = last[1] and last[1][1] or '0-0'
    local ids = {1}
    for i = 1, n do
      prev = redis.call('XADD', log_key, '*', 'd', ARGV[a + 1 + i], 'e', epoch, 'p', prev)
      ids[i + 1] = prev
    end
    out[k] = ids
  else
    out[k] = {0, rec[2] or '0', rec[1] or ''}
  end
  a = a + 2 + n
end
return out
