-- Give a slot up on purpose (a planned move): empty the owner name if the record still
-- names this node at this epoch. Appends and checkpoints are then fenced, and the new
-- owner, which waits for this, claims the slot at the same epoch + 1.
-- KEYS[1] owner record
-- ARGV[1] node id, ARGV[2] its epoch
-- Returns 1 when released, 0 when the record had moved on already.
local rec = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if rec[1] == ARGV[1] and rec[2] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'owner', '')
  return 1
end
return 0
