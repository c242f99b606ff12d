local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local period = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local st = redis.call('HMGET', KEYS[1], 't', 'l1', 'l2', 'l3', 'h1', 'h2', 'h3', 's1', 's2', 's3',
  'r1', 'r2', 'r3')
local last = tonumber(st[1])
-- The ledger of upward reconciliation: units held by grants in flight, units settled grants
-- finally cost, units settled grants gave back (both monotonic).
local held = {}
local settled = {}
local returned = {}
for i = 1, 3 do
  held[i] = tonumber(st[4 + i]) or 0
  settled[i] = tonumber(st[7 + i]) or 0
  returned[i] = tonumber(st[10 + i]) or 0
end
local caps = {}
local levels = {}
for i = 1, 3 do
  local cap = tonumber(ARGV[3 + i])
  if cap >= 0 then
    local l = tonumber(st[i + 1])
    if l == nil then
      l = cap
    elseif last ~= nil and now > last and cap > 0 then
      l = l + (now - last) * cap / period
    end
    if l > cap then l = cap end
    if l < -cap then l = -cap end
    caps[i] = cap
    levels[i] = l
  end
end
local function out(status, wait, place)
  local r = {status, string.format('%.0f', math.ceil(wait))}
  for i = 1, 3 do
    if levels[i] then r[#r + 1] = string.format('%.6f', levels[i]) else r[#r + 1] = '' end
  end
  for i = 1, 3 do r[#r + 1] = string.format('%.0f', settled[i]) end
  for i = 1, 3 do r[#r + 1] = string.format('%.0f', returned[i]) end
  r[#r + 1] = string.format('%.0f', place or 0)
  return r
end
local function save(with_caps)
  local fields = {'t', string.format('%.0f', now)}
  for i = 1, 3 do
    if levels[i] then
      fields[#fields + 1] = 'l' .. i
      fields[#fields + 1] = string.format('%.6f', levels[i])
      -- Capacities go with headers, and with a hash this call creates (it had expired).
      if with_caps or last == nil then
        fields[#fields + 1] = 'c' .. i
        fields[#fields + 1] = string.format('%.0f', caps[i])
      end
    end
    fields[#fields + 1] = 'h' .. i
    fields[#fields + 1] = string.format('%.0f', held[i])
    fields[#fields + 1] = 's' .. i
    fields[#fields + 1] = string.format('%.0f', settled[i])
    fields[#fields + 1] = 'r' .. i
    fields[#fields + 1] = string.format('%.0f', returned[i])
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if mode == 'acquire' then
  local wait = 0
  for i = 1, 3 do
    if levels[i] then
      local n = tonumber(ARGV[6 + i])
      if n > caps[i] then return out('large', 0) end
      if n > levels[i] then
        local w = (n - levels[i]) * period / caps[i]
        if w > wait then wait = w end
      end
    end
  end
  -- Arrival order across processes: a waiter holds a ticket (ARGV[10], '0': none) in the
  -- line KEYS[2] (score: arrival) and KEYS[3] (score: last seen); tickets not seen for
  -- ARGV[11] µs are dropped. Nobody takes quota while an older ticket waits.
  local ticket = ARGV[10] or '0'
  -- A ticket's place (ARGV[14], µs; '0': now) is the same in the line of every key its
  -- waiter waits on: the time it first queued in any of them (returned with 'wait'), so
  -- that the heads of two nodes cannot each be first on a different key (issue 12).
  local place = tonumber(ARGV[14] or '0') or 0
  if place <= 0 then place = now end
  if ticket ~= '0' then
    local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[11]))
    for _, m in ipairs(gone) do
      redis.call('ZREM', KEYS[2], m)
      redis.call('ZREM', KEYS[3], m)
    end
    local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
    if wait > 0 or (head and head ~= ticket) then
      redis.call('ZADD', KEYS[2], 'NX', place, ticket)
      redis.call('ZADD', KEYS[3], now, ticket)
      redis.call('PEXPIRE', KEYS[2], ttl)
      redis.call('PEXPIRE', KEYS[3], ttl)
      if head and head ~= ticket and wait < 20000 then wait = 20000 end
      return out('wait', wait, tonumber(redis.call('ZSCORE', KEYS[2], ticket)))
    end
    redis.call('ZREM', KEYS[2], ticket)
    redis.call('ZREM', KEYS[3], ticket)
  end
  if wait > 0 then return out('wait', wait) end
  for i = 1, 3 do
    if levels[i] then
      levels[i] = levels[i] - tonumber(ARGV[6 + i])
      held[i] = held[i] + tonumber(ARGV[6 + i])
    end
  end
  -- The grant's id (ARGV[12], '0': none): its settle counts once, and a process whose call
  -- timed out can give back a grant it never heard of (see 'settle').
  local id = ARGV[12] or '0'
  if id ~= '0' then
    redis.call('HSET', KEYS[4], id, string.format('%.0f', now))
    redis.call('PEXPIRE', KEYS[4], ttl)
  end
  -- The waiter's successor (ARGV[13], '0': none): the next request waiting on the same
  -- process takes its place in the line now, behind every ticket already there, so that a
  -- process between two waiters cannot lose its turn (issue 12).
  local next = ARGV[13] or '0'
  local next_place = 0
  if next ~= '0' then
    redis.call('ZADD', KEYS[2], 'NX', now, next)
    redis.call('ZADD', KEYS[3], now, next)
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('PEXPIRE', KEYS[3], ttl)
    next_place = now
  end
  local r = out('ok', 0, next_place)
  save()
  return r
elseif mode == 'settle' then
  -- A grant with an id (ARGV[16]) settles once: a settle sent again (it timed out, or was
  -- held while Redis was marked down) or for a grant that was never taken is a no-op.
  local id = ARGV[16] or '0'
  if id ~= '0' and redis.call('HDEL', KEYS[4], id) == 0 then
    return out('ok', 0)
  end
  for i = 1, 3 do
    if levels[i] then
      local l = levels[i] + tonumber(ARGV[6 + i])
      if l > caps[i] then l = caps[i] end
      -- A debt is bounded by one capacity (as in the in-process bucket).
      if l < -caps[i] then l = -caps[i] end
      levels[i] = l
    end
    -- charged (ARGV 10..12) leaves the held units; the final cost (13..15) is settled.
    local c = tonumber(ARGV[9 + i] or '0')
    local cost = tonumber(ARGV[12 + i] or '0')
    held[i] = math.max(0, held[i] - c)
    settled[i] = settled[i] + cost
    returned[i] = returned[i] + math.max(0, c - cost)
  end
  save()
  return out('ok', 0)
elseif mode == 'observe' or mode == 'seed' then
  if mode == 'seed' and last ~= nil then
    -- Another process created these buckets: they do not count this process's probe.
    for i = 1, 3 do
      if levels[i] then levels[i] = levels[i] - tonumber(ARGV[12 + i]) end
    end
  end
  for i = 1, 3 do
    local r = tonumber(ARGV[6 + i])
    -- The answer to a grant (ARGV[16] = 1) may predate what settled grants gave back since
    -- it was taken (its returned mark: ARGV 23..25) and the refill since (ARGV[26] µs ago):
    -- only a level above that too proves that someone else used the quota.
    local slack = 0
    if ARGV[16] == '1' and levels[i] then
      slack = math.max(0, returned[i] - tonumber(ARGV[22 + i]))
        + math.min(caps[i], tonumber(ARGV[26]) * caps[i] / period)
    end
    if levels[i] and r >= 0 and levels[i] > r + tonumber(ARGV[9 + i]) + slack then
      levels[i] = r
    end
    -- Upward reconciliation (ARGV[16] = 1): the answer to a grant whose mark is ARGV 17..19
    -- and which holds ARGV 27..29 showed `r` left in a bucket of the same limit (ARGV 20..22
    -- = 1): at least r - (held - its own) - (settled - mark) is there (the server took that
    -- grant before it answered), plus the refill of the time since the grant was taken
    -- beyond the send grace (ARGV[30] µs, up to the capacity): the server had counted the
    -- grant by then, so that refill is certain (the refill before it may be in `r`).
    if ARGV[16] == '1' and levels[i] and r >= 0 and ARGV[19 + i] == '1' then
      local since = math.max(0, settled[i] - tonumber(ARGV[16 + i]))
      local others = math.max(0, held[i] - tonumber(ARGV[26 + i] or '0'))
      local certain = math.floor(tonumber(ARGV[30] or '0') * caps[i] / period)
      local counted = r + certain
      if counted > caps[i] then counted = math.max(r, caps[i]) end
      local floor = counted - others - since
      if floor > levels[i] then levels[i] = math.min(floor, caps[i]) end
    end
  end
  if mode == 'seed' then
    -- The grants the seeding process let through blind behind its probe and still out
    -- (issue 12, seventh pass): taken from the levels (ARGV 31..33: every one but the
    -- grant these headers answer, which the server's count holds) and held (ARGV 34..36),
    -- so that raises subtract them and their settles give back here.
    for i = 1, 3 do
      if levels[i] then
        local l = levels[i] - tonumber(ARGV[30 + i] or '0')
        if l < -caps[i] then l = -caps[i] end
        levels[i] = l
      end
      held[i] = held[i] + tonumber(ARGV[33 + i] or '0')
    end
  end
  save(true)
  return out('ok', 0)
end
return redis.error_reply('unknown mode')
