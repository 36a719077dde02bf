-- The fenced checkpoint write. A checkpoint never covers less of the log than the one it
-- replaces: the log may already be trimmed up to the older one.
-- KEYS[1] owner record, KEYS[2] checkpoint (hash {d, id, e})
-- ARGV[1] node id, ARGV[2] epoch, ARGV[3] state, ARGV[4] the log id it covers
-- Returns {1}, {0, epoch in force, owner} when fenced, {2, newer covered id} when stale.
local rec = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2] then
  return {0, rec[2] or '0', rec[1] or ''}
end
local prev = redis.call('HGET', KEYS[2], 'id')
if prev and id_cmp(ARGV[4], prev) < 0 then
  return {2, prev}
end
redis.call('HSET', KEYS[2], 'd', ARGV[3], 'id', ARGV[4], 'e', ARGV[2])
return {1}
