-- `ebb read --url` and `ebb events --url` page by what the daemon's answers
-- say (their events' versions, `next`), parsed as JSON: data holding objects
-- in arrays once made them count too many events and stop early (1,000 of
-- 1,500 printed, exit 0). An answer that is not what it should be is an
-- error with a non-zero exit, not silence.
local support = require "support"
local daemon = require "daemon_support"
local json = require "cjson"

local N = 1500

describe("ebb read/events --url over many events with nested data", function()
  local d
  setup(function()
    d = daemon.start()
    for batch = 0, 2 do
      local events = {}
      for i = 1, 500 do
        local n = batch * 500 + i
        events[i] = { type = "Nested", data = { n = n, items = { { a = 1 }, { b = { { c = 2 } } } } } }
      end
      assert.are.equal(200, (d:post("/streams/Obj-1", { events = events })))
    end
  end)
  teardown(function() d:stop() end)

  local function ebb(...)
    local args = { ... }
    args[#args + 1] = "--url"
    args[#args + 1] = d.url
    local out, err, code = support.run(args)
    return support.lines(out, json.decode), err, code
  end

  it("ebb read prints every event, forward and backward", function()
    local list, err, code = ebb("read", "Obj-1")
    assert.are.equal(0, code, err)
    assert.are.equal(N, #list)
    for i, e in ipairs(list) do assert.are.equal(i, e.version) end
    list = ebb("read", "Obj-1", "--backward")
    assert.are.equal(N, #list)
    for i, e in ipairs(list) do assert.are.equal(N + 1 - i, e.version) end
    list = ebb("read", "Obj-1", "--limit", "1200")
    assert.are.equal(1200, #list)
  end)

  it("ebb events prints as many as asked, in order", function()
    local list, err, code = ebb("events", "--limit", "1200")
    assert.are.equal(0, code, err)
    assert.are.equal(1200, #list)
    list = ebb("events", "--limit", "5000")
    assert.are.equal(N, #list)
    for i, e in ipairs(list) do assert.are.equal(i, e.position) end
  end)
end)

describe("ebb read/events --url with an answer it cannot read", function()
  -- A stand-in daemon answering every request with a fixed 200 body.
  local function serve(body)
    local script = os.tmpname()
    local portfile = os.tmpname()
    support.write(script, ([[
      local socket = require "socket"
      local s = assert(socket.bind("127.0.0.1", 0))
      local _, port = s:getsockname()
      local f = io.open(%q, "w") f:write(port) f:close()
      s:settimeout(20)
      for _ = 1, 4 do
        local c = s:accept()
        if not c then break end
        c:settimeout(5)
        repeat local l = c:receive("*l") until not l or l == ""
        local body = %q
        c:send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " .. #body ..
               "\r\nConnection: close\r\n\r\n" .. body)
        c:close()
      end
    ]]):format(portfile, body))
    os.remove(portfile)
    local p = io.popen("lua5.4 " .. script .. " >/dev/null 2>&1 & echo $!")
    local pid = p:read("l")
    p:close()
    local port
    for _ = 1, 500 do
      local f = io.open(portfile)
      if f then port = f:read("a"):match("%d+") f:close() end
      if port then break end
      daemon.sleep(0.01)
    end
    assert(port, "the stand-in server did not start")
    return "http://127.0.0.1:" .. port, function()
      os.execute("kill " .. pid .. " 2>/dev/null")
      os.remove(script)
      os.remove(portfile)
    end
  end

  for _, case in ipairs {
    { "not JSON", "<html>oops</html>" },
    { "no events array", '{"stream":"Obj-1","version":3}' },
    { "events without versions", '{"events":[{"x":1}],"next":1}' },
    { "versions as text", '{"events":[{"version":"1","position":1}],"next":1}' },
    { "events as an object", '{"events":{},"next":1}' },
  } do
    it("fails with a non-zero exit when the answer is " .. case[1], function()
      local url, stop = serve(case[2])
      local out, err, code = support.run { "read", "Obj-1", "--url", url }
      assert.are.equal("", out)
      assert.are_not.equal(0, code)
      assert.matches("the daemon's answer to GET /streams/Obj%-1.* cannot be read", err)
      out, err, code = support.run { "events", "--url", url }
      assert.are.equal("", out)
      assert.are_not.equal(0, code)
      assert.matches("cannot be read", err)
      stop()
    end)
  end
end)
