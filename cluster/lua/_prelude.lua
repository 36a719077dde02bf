-- Prepended to every slot-log script (cluster/slotlog/). Epochs and stream ids are
-- compared as canonical decimal strings (no sign, no leading zeros; the adapter checks
-- this), never as Lua numbers: a double loses digits above 2^53.

local function dec_cmp(a, b)
  if #a ~= #b then
    return #a < #b and -1 or 1
  end
  if a == b then
    return 0
  end
  return a < b and -1 or 1
end

-- Stream ids "<ms>-<seq>".
local function id_cmp(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  local c = dec_cmp(ams, bms)
  if c ~= 0 then
    return c
  end
  return dec_cmp(aseq, bseq)
end

