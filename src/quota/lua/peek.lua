local c = redis.call('HMGET', KEYS[1], 'c1', 'c2', 'c3')
if c[1] or c[2] or c[3] then
  return {'ok', '0', c[1] or '', c[2] or '', c[3] or ''}
end
-- A waiter that stays (another process learns, or this one's probe is out: ARGV[5] = '1')
-- takes its place in the line now.
local function queue()
  local ticket = ARGV[3] or '0'
  if ticket ~= '0' then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    redis.call('ZADD', KEYS[3], 'NX', now, ticket)
    redis.call('ZADD', KEYS[4], now, ticket)
    redis.call('PEXPIRE', KEYS[3], ARGV[4])
    redis.call('PEXPIRE', KEYS[4], ARGV[4])
  end
end
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] then
  if ARGV[5] == '1' then queue() end
  return {'learn', '0', '', '', ''}
end
-- A process that already learns another key of the group leaves a free lock to the others
-- for a moment (ARGV[6] = '1'): one probe per node, not one node's probe per key (issue 12).
if not holder and ARGV[6] == '1' then
  queue()
  return {'defer', '0', '', '', ''}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[5] == '1' then queue() end
  return {'learn', '0', '', '', ''}
end
local ttl = redis.call('PTTL', KEYS[2])
if ttl < 0 then ttl = 0 end
queue()
return {'wait', string.format('%.0f', ttl * 1000), '', '', ''}
