-- Merge a chunk of session deltas into one partition's snapshots, fenced by its checkpoint.
-- The Lua twin of tracker.fold.apply_delta; snapshots.py builds the arguments.
--
-- KEYS[1]   the partition checkpoint
-- KEYS[2..] session hashes, and for creates the user and agent index hashes
-- ARGV[1]   the checkpoint this chunk starts after ('' at the start of the log)
-- ARGV[2]   the checkpoint to store once the chunk is applied
-- ARGV[3]   msgpack array of deltas, each a map:
--             k  index in KEYS of the session hash
--             x  true: the session was deleted
--             i  the session id
--             c  {agent_id, user_id, created_at} of the first create; ui, ai: index keys
--             tc title if that create takes effect: {} for none, {title}
--             t  last title change: {} cleared, {title} set; absent: unchanged
--             o  flat list consumer, reset_to, at_least ('' = none), offsets as decimal
--                strings since Lua numbers are doubles
-- Returns {1, new checkpoint} when applied, {0, current checkpoint} when fenced out.

local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then
  return {0, current}
end

local function greater(a, b)
  if #a ~= #b then
    return #a > #b
  end
  return a > b
end

for _, d in ipairs(cmsgpack.unpack(ARGV[3])) do
  local key = KEYS[d.k]
  local o = d.o or {}
  local fields = {'d', 'c'}
  for i = 1, #o, 3 do
    fields[#fields + 1] = 'o:' .. o[i]
  end
  local stored = redis.call('HMGET', key, unpack(fields))
  if not stored[1] then
    if d.x then
      redis.call('DEL', key)
      redis.call('HSET', key, 'd', '1')
    else
      local out = {}
      local title = d.t
      if d.c and not stored[2] then
        out[#out + 1] = 'a'; out[#out + 1] = d.c[1]
        out[#out + 1] = 'u'; out[#out + 1] = d.c[2]
        out[#out + 1] = 'c'; out[#out + 1] = d.c[3]
        redis.call('HSET', KEYS[d.ui], d.i, '1')
        redis.call('HSET', KEYS[d.ai], d.i, '1')
        title = d.tc
      end
      if title then
        if title[1] then
          out[#out + 1] = 't'; out[#out + 1] = title[1]
        else
          redis.call('HDEL', key, 't')
        end
      end
      for i = 1, #o, 3 do
        local value = stored[2 + (i + 2) / 3]
        if o[i + 1] ~= '' then
          value = o[i + 1]
        end
        if o[i + 2] ~= '' and (not value or greater(o[i + 2], value)) then
          value = o[i + 2]
        end
        if value then
          out[#out + 1] = 'o:' .. o[i]; out[#out + 1] = value
        end
      end
      if #out > 0 then
        redis.call('HSET', key, unpack(out))
      end
    end
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return {1, ARGV[2]}
