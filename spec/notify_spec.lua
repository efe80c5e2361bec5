-- `ebb serve` under systemd's notify protocol (Type=notify): the spec plays
-- systemd, listening on the unix datagram socket it names in NOTIFY_SOCKET,
-- and checks READY=1, STATUS= with the head position, WATCHDOG=1 when
-- WatchdogSec is set (WATCHDOG_USEC), and STOPPING=1 when it drains.
local support = require "support"
local daemon = require "daemon_support"
local unix = require "socket.unix"

-- A bound notify socket; :next() returns the next datagram (waits up to a minute).
local function listener()
  local dir = support.tmpdir()
  local path = dir .. "/notify"
  local s = assert(unix.dgram())
  assert(s:bind(path))
  s:settimeout(60)
  return {
    path = path,
    next = function()
      local msg, err = s:receive()
      assert(msg, "no notification: " .. tostring(err))
      return msg
    end,
    close = function()
      s:close()
      support.rmdir(dir)
    end,
  }
end

-- Reads datagrams until one satisfies pred; returns it and all read so far.
local function until_msg(l, pred)
  local seen = {}
  while true do
    local m = l.next()
    seen[#seen + 1] = m
    if pred(m) then return m, seen end
  end
end

describe("ebb serve under systemd", function()
  it("1 says READY=1 with its head position once it listens, and STOPPING=1 on drain", function()
    local l = listener()
    local d = daemon.start { env = "NOTIFY_SOCKET=" .. support.quote(l.path) }
    finally(function() d:stop(); l.close(); support.rmdir(d.data) end)
    assert.truthy(d.url, daemon.logs(d))
    assert.are.equal("READY=1\nSTATUS=listening, head position 0", l.next())
    -- by the time READY=1 is sent, it answers
    local status = d:get("/health")
    assert.are.equal(200, status)
    d:signal("TERM")
    local m, seen = until_msg(l, function(x) return x:find("STOPPING=1", 1, true) end)
    assert.are.equal("STOPPING=1\nSTATUS=draining, head position 0", m)
    for _, x in ipairs(seen) do assert.is_nil(x:find("WATCHDOG", 1, true), x) end
    assert.truthy(d:wait(60))
  end)

  it("2 tells the head position in STATUS= as it moves", function()
    local l = listener()
    local data = support.tmpdir()
    -- two events committed before it starts
    local out, err, code = support.cli(data)({ "send", "Order", "o-1", "CreateOrder",
                                               '{"customer_id":"c-1"}' })
    assert.are.equal(0, code, out .. err)
    local d = daemon.start { data = data, env = "NOTIFY_SOCKET=" .. support.quote(l.path) }
    finally(function() d:stop(); l.close(); support.rmdir(data) end)
    assert.are.equal("READY=1\nSTATUS=listening, head position 1", l.next())
    local status = d:command("Order", "o-1", "AddItem", { sku = "A", qty = 1, price = 100 })
    assert.are.equal(200, status)
    local m = until_msg(l, function(x) return x:find("STATUS=", 1, true) end)
    assert.are.equal("STATUS=listening, head position 2", m)
  end)

  it("3 pings the watchdog at half of WatchdogSec while its loop turns", function()
    local l = listener()
    -- WatchdogSec=0.4 as systemd passes it; pings every 0.2 s
    local d = daemon.start { env = "NOTIFY_SOCKET=" .. support.quote(l.path) .. " WATCHDOG_USEC=400000" }
    finally(function() d:stop(); l.close(); support.rmdir(d.data) end)
    assert.are.equal("READY=1\nSTATUS=listening, head position 0", l.next())
    for _ = 1, 3 do assert.are.equal("WATCHDOG=1", l.next()) end
    -- a commit moves the head: the next ping carries the new STATUS=
    local status = d:command("Order", "o-9", "CreateOrder", { customer_id = "c-1" })
    assert.are.equal(200, status)
    local m = until_msg(l, function(x) return x:find("STATUS=", 1, true) end)
    assert.are.equal("WATCHDOG=1\nSTATUS=listening, head position 1", m)
    d:signal("TERM")
    until_msg(l, function(x) return x:find("STOPPING=1", 1, true) end)
    assert.truthy(d:wait(60))
  end)

  it("4 ignores a watchdog meant for another process (WATCHDOG_PID)", function()
    local l = listener()
    local d = daemon.start { env = "NOTIFY_SOCKET=" .. support.quote(l.path)
                                   .. " WATCHDOG_USEC=200000 WATCHDOG_PID=1" }
    finally(function() d:stop(); l.close(); support.rmdir(d.data) end)
    assert.are.equal("READY=1\nSTATUS=listening, head position 0", l.next())
    d:signal("TERM")
    local _, seen = until_msg(l, function(x) return x:find("STOPPING=1", 1, true) end)
    for _, x in ipairs(seen) do assert.is_nil(x:find("WATCHDOG", 1, true), x) end
  end)

  it("5 sends nothing and runs as before without NOTIFY_SOCKET", function()
    local d = daemon.start {}
    finally(function() d:stop(); support.rmdir(d.data) end)
    assert.truthy(d.url)
    assert.is_nil(daemon.logs(d):find("systemd", 1, true))
  end)
end)
