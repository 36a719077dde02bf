-- Trim a slot log before ARGV[1], but never past the newest checkpoint: the newest entry
-- it covers and ARGV[2] older ones always stay. Without a checkpoint nothing is trimmed.
-- KEYS[1] checkpoint, KEYS[2] slot log
-- ARGV[1] the id to trim before, ARGV[2] margin (entries)
-- Returns {entries removed, the MINID used ('0-0': none), 1 if it was lowered else 0}.
local limit = '0-0'
local covers = redis.call('HGET', KEYS[1], 'id')
if covers then
  local margin = tonumber(ARGV[2])
  local keep = redis.call('XREVRANGE', KEYS[2], covers, '-', 'COUNT', margin + 1)
  if #keep == margin + 1 then
    limit = keep[#keep][1]
  end
end
local bound, clamped = ARGV[1], 0
if id_cmp(bound, limit) > 0 then
  bound, clamped = limit, 1
end
if bound == '0-0' then
  return {0, bound, clamped}
end
return {redis.call('XTRIM', KEYS[2], 'MINID', bound), bound, clamped}
