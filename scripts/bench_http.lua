-- wrk script for scripts/bench http: what each request is depends on
-- EBB_BENCH_MODE:
--   health    GET /health (the HTTP baseline: no Lua, no store)
--   open      OpenAccount on a new account per request (one event each)
--   preload   OpenAccount on acc-1 .. acc-N (N = EBB_BENCH_ACCOUNTS), then /health
--   deposit   Deposit 1 on acc-1 .. acc-N round robin (cached aggregates)
--   orders    CreateOrder on a new order per request, paced: each connection
--             waits EBB_BENCH_DELAY_MS between requests (for a target rate)
-- Non-200 answers are counted and printed by done().
local mode = os.getenv("EBB_BENCH_MODE") or "health"
local accounts = tonumber(os.getenv("EBB_BENCH_ACCOUNTS") or "1000")
local pause = tonumber(os.getenv("EBB_BENCH_DELAY_MS") or "0")
-- Runs against one daemon must not reuse ids (a second CreateOrder is a 422).
local run = os.getenv("EBB_BENCH_RUN") or tostring(os.time())
local threads = {}
local headers = { ["Content-Type"] = "application/json" }

function setup(thread)
  thread:set("tid", #threads + 1)
  thread:set("nthreads", 0)
  threads[#threads + 1] = thread
end

local n, bad = 0, 0

function init()
  n = 0
  for _ in pairs(threads) do end
end

local function command(id, type_, data)
  return wrk.format("POST", "/commands", headers,
    ('{"aggregate":"bank_account","id":"%s","type":"%s","data":%s}'):format(id, type_, data))
end

function request()
  n = n + 1
  if mode == "open" then
    return command(("r%s-t%d-%d"):format(run, tid, n), "OpenAccount", '{"owner":"bench"}')
  elseif mode == "preload" then
    local k = (n - 1) * 4 + tid -- wrk -t4 at most for preload
    if k > accounts then return wrk.format("GET", "/health") end
    return command("acc-" .. k, "OpenAccount", '{"owner":"bench"}')
  elseif mode == "orders" then
    return wrk.format("POST", "/commands", headers,
      ('{"aggregate":"order","id":"r%s-t%d-%d","type":"CreateOrder","data":{"customer_id":"c-%d"}}')
        :format(run, tid, n, n % 100))
  elseif mode == "deposit" then
    return command("acc-" .. ((n * 7919 + tid) % accounts + 1), "Deposit", '{"amount":1}')
  end
  return wrk.format("GET", "/health")
end

function delay()
  return pause
end

function response(status)
  if status ~= 200 then
    bad = bad + 1
    if bad == 1 then io.stderr:write("first non-200 answer: " .. status .. "\n") end
  end
end

function done(summary, latency)
  local failed = 0
  for _, t in ipairs(threads) do failed = failed + (t:get("bad") or 0) end
  io.write(("RESULT requests=%d seconds=%.3f rps=%.0f p50_ms=%.2f p99_ms=%.2f non200=%d errors=%d\n")
    :format(summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
            latency:percentile(50) / 1000, latency:percentile(99) / 1000, failed,
            summary.errors.connect + summary.errors.read + summary.errors.write
              + summary.errors.status + summary.errors.timeout))
end
