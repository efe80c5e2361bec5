-- subscriber_buffer bounds the bytes queued for a subscriber at every
-- moment, during catch-up as well as live: subscribers that never read,
-- catching up on large events, hold at most that much each and are cut off
-- with `event: overflow` and resume_after once their client takes nothing for
-- a heartbeat interval; a subscriber that reads catches up on everything.
local support = require "support"
local daemon = require "daemon_support"

local eventually = support.eventually

-- A figure of the process's /proc/PID/status, in kB.
local function proc_kb(d, field)
  return tonumber(support.read("/proc/" .. d.pid .. "/status"):match(field .. ":%s*(%d+) kB"))
end

local function metric(d, name)
  local _, _, text = d:get("/metrics")
  return tonumber(text:match(name .. " (%d+)"))
end

describe("subscribers catching up on large events", function()
  local d
  local EVENTS, SIZE, SUBS = 40, 600000, 10
  local function start(heartbeat_ms)
    d = daemon.start({ args = { "--heartbeat-ms", heartbeat_ms } })
    local big = string.rep("x", SIZE)
    for i = 1, EVENTS do
      assert.are.equal(200, (d:post("/streams/Big-" .. i, { events = { { type = "Blob", data = { pad = big } } } })))
    end
  end
  after_each(function() d:stop() end)

  it("hold at most subscriber_buffer each when they never read, and are cut off with resume_after", function()
    start("200")
    local before = proc_kb(d, "VmRSS")
    local subs = {}
    for i = 1, SUBS do
      subs[i] = d:subscribe("?after=0")
      assert.are.equal(200, subs[i].status)
    end
    eventually(function() return metric(d, "ebb_subscriber_overflows_total") == SUBS end, 30,
      "every subscriber to be cut off")
    -- Peak resident memory: 10 subscribers x 24 MB of events were queued in
    -- full before; now each holds at most 4 MiB (plus a page being read).
    local grown_mb = (proc_kb(d, "VmHWM") - before) / 1024
    assert.is_true(grown_mb < 120, ("the daemon grew by %.0f MB"):format(grown_mb))
    -- Reading now: the events sent, in order, then the overflow naming where to resume.
    local sub = subs[1]
    local last, final, n = 0, nil, 0
    while true do
      local ev = sub:next(5)
      if not ev then break end
      if ev.event == "overflow" then final = ev break end
      n = n + 1
      assert.are.equal(last + 1, tonumber(ev.id))
      last = tonumber(ev.id)
    end
    assert.is_not_nil(final)
    assert.are.equal("too_large", final.json.code)
    assert.are.equal(last, final.json.resume_after)
    assert.is_true(n < EVENTS, "a non-reading subscriber was sent everything")
    for _, s in ipairs(subs) do s:close() end
  end)

  it("a subscriber that reads gets every event, and is not cut off", function()
    -- The default heartbeat: only a client that takes nothing for 15 s is stalled.
    start("15000")
    local overflows = metric(d, "ebb_subscriber_overflows_total")
    local sub = d:subscribe("?after=0")
    for i = 1, EVENTS do
      local ev = assert(sub:next(10))
      assert.are.equal(i, tonumber(ev.id))
      assert.are.equal(SIZE, #ev.json.data.pad)
    end
    sub:close()
    assert.are.equal(overflows, metric(d, "ebb_subscriber_overflows_total"))
  end)
end)
