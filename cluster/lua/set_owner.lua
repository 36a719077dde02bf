-- Give a slot to a node under a new epoch, only if it is above the epoch in force.
-- KEYS[1] owner record (hash {owner, epoch})
-- ARGV[1] node id, ARGV[2] the new epoch
-- Returns 1 when set, 0 when the epoch in force is the same or higher.
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
if dec_cmp(ARGV[2], epoch) > 0 then
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', ARGV[2])
  return 1
end
return 0
