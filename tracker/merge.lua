-- Merge a chunk of session deltas into one partition's snapshots, fenced by its checkpoint.
-- The Lua twin of tracker.fold.apply_delta; snapshots.py (_wire) builds the arguments.
--
-- KEYS[1]   the partition checkpoint
-- KEYS[2..] session hashes, and for creates the user and agent index hashes
-- ARGV[1]   the checkpoint this chunk starts after ('' at the start of the log)
-- ARGV[2]   the checkpoint to store once the chunk is applied
-- ARGV[3]   the deltas as one msgpack array of strings, flat, each:
--   k flags n  f1..fn  r1..rn  a1..an  [create: ui ai id agent user created tc? tc]  [title: t? t]
--   k       index in KEYS of the session hash
--   flags   'x' deleted, or any of 'c' (a create follows) and 't' (a title change follows)
--   f, r, a offset field names ('o<consumer>'), reset_to and at_least ('' for none);
--           offsets are decimal strings because Lua numbers are doubles
--   create  index keys, session id, fields, and the title if that create takes effect
--           (tc? is '1' for a title, '0' for none)
--   title   t? is '1' to set t, '0' to clear the title
-- Returns {1, new checkpoint} when applied, {0, current checkpoint} when fenced out.

local SLICE = 1000  -- fields per HMGET/HSET: unpack() of thousands of values overflows Lua's stack

local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then
  return {0, current}
end

local delta = cmsgpack.unpack(ARGV[3])
local i = 1
local last = #delta
while i <= last do
  local key = KEYS[tonumber(delta[i])]
  local flags = delta[i + 1]
  local n = tonumber(delta[i + 2])
  local fields = i + 3
  i = fields + 3 * n
  local create, title
  if string.find(flags, 'c', 1, true) then
    create = i
    i = i + 8
  end
  if string.find(flags, 't', 1, true) then
    title = i
    i = i + 2
  end
  local stored
  if n <= SLICE then
    stored = redis.call('HMGET', key, 'd', 'c', unpack(delta, fields, fields + n - 1))
  else
    stored = redis.call('HMGET', key, 'd', 'c')
    for from = fields, fields + n - 1, SLICE do
      local last = math.min(from + SLICE, fields + n) - 1
      local values = redis.call('HMGET', key, unpack(delta, from, last))
      for j = 1, #values do
        stored[#stored + 1] = values[j] or false
      end
    end
  end
  if not stored[1] then
    if flags == 'x' then
      redis.call('DEL', key)
      redis.call('HSET', key, 'd', '1')
    else
      local out = {}
      local size = 0
      if create and not stored[2] then
        size = 6
        out[1], out[2] = 'a', delta[create + 3]
        out[3], out[4] = 'u', delta[create + 4]
        out[5], out[6] = 'c', delta[create + 5]
        redis.call('HSET', KEYS[tonumber(delta[create])], delta[create + 2], '1')
        redis.call('HSET', KEYS[tonumber(delta[create + 1])], delta[create + 2], '1')
        title = create + 6
      end
      if title then
        if delta[title] == '1' then
          out[size + 1], out[size + 2] = 't', delta[title + 1]
          size = size + 2
        else
          redis.call('HDEL', key, 't')
        end
      end
      for j = 0, n - 1 do
        local value = stored[3 + j]
        local reset, least = delta[fields + n + j], delta[fields + 2 * n + j]
        if reset ~= '' then
          value = reset
        end
        if least ~= '' and (not value or #least > #value or (#least == #value and least > value)) then
          value = least
        end
        if value then
          out[size + 1], out[size + 2] = delta[fields + j], value
          size = size + 2
        end
      end
      for from = 1, size, 2 * SLICE do
        redis.call('HSET', key, unpack(out, from, math.min(from + 2 * SLICE, size + 1) - 1))
      end
    end
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return {1, ARGV[2]}
