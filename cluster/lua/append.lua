-- The fenced append: XADD to the slot log only if the owner record names this node and
-- this epoch, so a node whose slot was given away (paused, partitioned) cannot write.
-- Each entry records the id of the entry before it ('p': trims never remove a log's
-- newest entry, so that is the last one in the stream), so a reader can tell that
-- entries were trimmed under it.
-- KEYS[1] owner record, KEYS[2] slot log
-- ARGV[1] node id, ARGV[2] epoch, ARGV[3..] the batches, appended in this order
-- Returns {1, entry id, ...} or {0, epoch in force, owner} when fenced (nothing written).
local rec = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if rec[1] == ARGV[1] and rec[2] == ARGV[2] then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  local prev = last[1] and last[1][1] or '0-0'
  local out = {1}
  for i = 3, #ARGV do
    prev = redis.call('XADD', KEYS[2], '*', 'd', ARGV[i], 'e', ARGV[2], 'p', prev)
    out[i - 1] = prev
  end
  return out
end
return {0, rec[2] or '0', rec[1] or ''}
