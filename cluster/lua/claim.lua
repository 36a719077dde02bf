-- Take a slot over if its owner record still holds the epoch the claimer saw.
-- KEYS[1] owner record (hash {owner, epoch})
-- ARGV[1] node id, ARGV[2] the epoch seen (0: no record), ARGV[3] that epoch + 1
-- Returns {1, epoch} when the node owns the slot at ARGV[3] (also when a retried claim
-- finds its own earlier success), {0, epoch, owner} when someone moved the slot first.
local rec = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
local owner, epoch = rec[1] or '', rec[2] or '0'
if epoch == ARGV[2] then
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', ARGV[3])
  return {1, ARGV[3]}
end
if epoch == ARGV[3] and owner == ARGV[1] then
  return {1, epoch}
end
return {0, epoch, owner}
