-- wrk script: POST /v1/messages with a distinct ~2 KB prompt per request (so a caching proxy
-- misses every time), JSON answers. Usage (see docs/benchmarks.md, "Cache misses"):
--   wrk -t1 -c1 -d10s --latency -s benches/proxy/distinct.lua http://127.0.0.1:8787
-- TEMPERATURE=0 in the environment adds "temperature":0 (cached in mode deterministic).
local counter = 0
local threads = {}
local pad = string.rep("lorem ipsum ", 160)
local temperature = os.getenv("TEMPERATURE")
local nonce = tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000))

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() + (id or 0))
  nonce = nonce .. "-" .. tostring(id or 0) .. "-" .. tostring(math.random(1, 1000000000))
end

request = function()
  counter = counter + 1
  local t = ""
  if temperature then
    t = '"temperature":' .. temperature .. ','
  end
  local body = '{"model":"claude-haiku-4-5","max_tokens":100,' .. t ..
    '"messages":[{"role":"user","content":"' .. nonce .. ' #' .. counter .. ' ' .. pad .. '"}]}'
  return wrk.format("POST", "/v1/messages", {
    ["content-type"] = "application/json",
    ["x-api-key"] = "sk-ant-bench",
    ["anthropic-version"] = "2023-06-01",
  }, body)
end
