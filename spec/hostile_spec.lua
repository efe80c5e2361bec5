-- hostile_spec.lua: modules that try to stall, starve or break the daemon
-- from inside the sandbox (spec/fixtures/hostile/). Against a real daemon
-- over HTTP: each attack ends as a script_error (500) within the call's
-- bounds; meanwhile GET /health keeps answering (a poller in another
-- process measures its latency), other aggregates and projections keep
-- working, and the daemon still stops on SIGTERM with status 0.
local support = require "support"
local daemon = require "daemon_support"
local json = require "cjson"
local socket = require "socket"

local FIX = support.root .. "/spec/fixtures/hostile"
local q = support.quote

-- Fresh copies of the fixture modules (specs may edit them).
local function dirs()
  local agg, proj = support.tmpdir(), support.tmpdir()
  assert(os.execute("cp " .. q(FIX) .. "/aggregates/*.lua " .. q(agg)))
  assert(os.execute("cp " .. q(FIX) .. "/projections/*.lua " .. q(proj)))
  return agg, proj
end

-- Starts `ebb serve` under a shell that records its exit status.
local function start(agg, proj)
  local d = { data = support.tmpdir(), out = os.tmpname(), log = os.tmpname(), status = os.tmpname() }
  os.remove(d.status)
  local args = support.store_args { "serve", "--data", d.data, "--aggregates", agg, "--projections", proj,
                                    "--listen", "127.0.0.1:0", "--log-format", "json", "--durability", "normal" }
  local parts = { q(support.ebb) }
  for _, a in ipairs(args) do parts[#parts + 1] = q(a) end
  local cmd = ("%s > %s 2> %s"):format(table.concat(parts, " "), q(d.out), q(d.log))
  os.execute(("(%s; echo $? > %s) > /dev/null 2>&1 &"):format(cmd, q(d.status)))
  for _ = 1, 1000 do
    local url = support.read(d.out):match("ebb listening on (http://%S+)")
    local lock = io.open(d.data .. "/ebb.lock")
    local pid = lock and lock:read("a"):match('"pid":(%d+)')
    if lock then lock:close() end
    if url and pid then
      d.url, d.pid = url, tonumber(pid)
      d.host, d.port = url:match("http://([%d%.]+):(%d+)")
      d.port = tonumber(d.port)
      break
    end
    daemon.sleep(0.01)
  end
  assert(d.url, "the daemon did not start: " .. support.read(d.log))
  return setmetatable(d, { __index = daemon })
end

-- Stops it with SIGTERM; returns its exit status (nil if it did not stop).
local function terminate(d)
  d:signal("TERM")
  for _ = 1, 3000 do
    local f = io.open(d.status)
    if f then
      local text = f:read("a")
      f:close()
      if text:match("%d") then return tonumber(text:match("%d+")) end
    end
    daemon.sleep(0.01)
  end
  d:signal("KILL")
  return nil
end

-- A /health poller in another process (health_poller.lua).
local function start_poller(d)
  local p = { out = os.tmpname(), stop = os.tmpname() }
  os.remove(p.out)
  os.remove(p.stop)
  os.execute(("lua5.4 %s %s %d %s %s > /dev/null 2>&1 &"):format(q(FIX .. "/health_poller.lua"), d.host, d.port,
                                                                  q(p.out), q(p.stop)))
  function p.read()
    local f = io.open(p.out)
    if not f then return nil end
    local max, polls, failed = f:read("a"):match("^(%S+) (%d+) (%d+)")
    f:close()
    if not max then return nil end
    return tonumber(max), tonumber(polls), tonumber(failed)
  end
  function p.wait_polls(n)
    for _ = 1, 3000 do
      local _, polls = p.read()
      if polls and polls >= n then return end
      daemon.sleep(0.01)
    end
    error("the /health poller made fewer than " .. n .. " polls")
  end
  function p.finish()
    local _, polls = p.read()
    p.wait_polls((polls or 0) + 1) -- one more poll after the last attack
    support.write(p.stop, "")
    local max, n, failed = p.read()
    os.remove(p.out)
    return max, n, failed
  end
  return p
end

local BOUND = "instruction budget of %d+ exceeded"

-- Commands of hostile.lua and what their script_error must say (nil: any
-- message; the point is that they end).
local attacks = {
  { "Loop", BOUND }, { "PcallLoop", BOUND }, { "CoroutineLoop", BOUND }, { "WrapLoop", BOUND },
  { "XpcallLoop", BOUND }, { "Recursion", "call depth of %d+ exceeded" }, { "Sort", BOUND },
  { "Find", BOUND }, { "Match", BOUND }, { "Gmatch", BOUND }, { "Gsub", BOUND }, { "PcallFind", BOUND },
  { "Balance", BOUND }, { "BackReference", BOUND }, { "BigSet", BOUND }, { "PlainFind", BOUND },
  { "Rep" }, { "RepSep" }, { "Concat" }, { "Format" }, { "GsubAmplify" }, { "GsubFunction" }, { "Tables" },
  { "HugeError" }, { "LargeError" }, { "TostringLoop", BOUND }, { "TostringHuge" },
  { "Gc", "__gc field is not allowed" }, { "Close", BOUND }, { "CoroutineClose", BOUND },
  { "EncodeBomb", BOUND }, { "SharedString", BOUND },
}

-- Sanitizer builds run several times slower: the bounds on time scale.
local SLOW = (os.getenv("EBB_BUILD") or ""):match("asan") and 4 or 1

-- A command: status, decoded answer, answer text. Like daemon_support's
-- requests, with a longer timeout: the attacks end within their bounds,
-- but on a loaded machine a bounded call can still take seconds.
local function command(d, aggregate, id, type_)
  local body = json.encode({ aggregate = aggregate, id = id, type = type_, data = {} })
  local c = assert(socket.tcp())
  c:settimeout(30 * SLOW)
  assert(c:connect(d.host, d.port))
  assert(c:send(("POST /commands HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nContent-Type: application/json\r\n"
      .. "Content-Length: %d\r\n\r\n%s"):format(d.host, #body, body)))
  local status, _, text = daemon.read_response(c)
  c:close()
  local ok, decoded = pcall(json.decode, text or "")
  return status, ok and decoded or nil, text
end

local function victim_works(d, id)
  local st, body = command(d, "victim", id, "Add")
  assert.are.equal(200, st, "victim: " .. tostring(body and body.error and body.error.message))
end

describe("hostile modules", function()
  local d, agg, proj
  before_each(function() agg, proj = dirs() end)
  after_each(function()
    if d then
      d:signal("KILL")
      d = nil
    end
    support.rmdir(agg)
    support.rmdir(proj)
  end)

  it("each end as script_error while /health answers, others work, and SIGTERM still stops the daemon", function()
    d = start(agg, proj)
    local poller = start_poller(d)
    poller.wait_polls(3)
    for i, a in ipairs(attacks) do
      local name, expect = a[1], a[2]
      local st, body, text = command(d, "hostile", "h" .. i, name)
      assert.are.equal(500, st, name .. ": " .. tostring(text))
      assert.are.equal("script_error", body.error.code, name)
      if expect then assert.matches(expect, body.error.message, 1, false, name) end
      assert.is_true(#text < 1024 * 1024, name .. ": an answer of " .. #text .. " bytes")
      victim_works(d, "v" .. i)
      if os.getenv("EBB_HOSTILE_TRACE") then print(name, poller.read()) end
    end
    -- the kill inside pcall was not caught: nothing was recorded for it
    local _, escaped = d:get("/streams/Hostile-h12")
    assert.are.equal(0, #(escaped and escaped.events or {}))

    -- hostile projection queries; the other projection keeps answering
    for _, query in ipairs { "loop", "find", "bomb" } do
      -- after a kill the projection rebuilds its Lua state: 503 until then
      -- (the runner does so on its next round, which a new event starts)
      victim_works(d, "before-" .. query)
      local st, body, text
      for _ = 1, 600 do
        st, body, text = d:get("/projections/hostile_queries/" .. query)
        if st ~= 503 then break end
        daemon.sleep(0.05)
      end
      assert.are.equal(500, st, query .. ": " .. tostring(text) .. " "
                        .. tostring(select(3, d:get("/projections/hostile_queries"))))
      assert.are.equal("script_error", body.error.code)
      assert.matches(BOUND, body.error.message)
      local cst, count = d:get("/projections/calm/count")
      assert.are.equal(200, cst, query)
      assert.is_number(count.n)
    end

    -- hostile upcasters, run when stored events of schema 1 are read (last:
    -- projections read every event through the upcasters, and fault)
    assert.are.equal(200, (d:post("/streams/Upcasty-u1", { events = { { type = "Thing", schema = 1, data = {} } } })))
    assert.are.equal(200, (d:post("/streams/Upcasty-u2", { events = { { type = "Bomb", schema = 1, data = {} } } })))
    for _, stream in ipairs { "Upcasty-u1", "Upcasty-u2" } do
      -- A reader never fails a page for an event it cannot upcast: the event
      -- comes as stored, with why the upcaster was stopped.
      local st, body = d:get("/streams/" .. stream)
      assert.are.equal(200, st, stream)
      assert.are.equal(1, #body.events, stream)
      assert.are.equal(1, body.events[1].schema, stream)
      assert.matches(BOUND, body.events[1].upcast_error, stream)
    end
    -- a command folds the stream through the looping upcaster (the bomb's
    -- data is only applied, never encoded, there)
    local st, body = command(d, "upcasty", "u1", "Touch")
    assert.are.equal(500, st)
    assert.matches(BOUND, body.error.message)
    victim_works(d, "after-upcasters")

    local max, polls, failed = poller.finish()
    assert.are.equal(0, failed)
    assert.is_true(polls > 3)
    -- generous: it must not flake on a loaded machine (on a 2-core box with
    -- a load average of 17 the worst seen was 3 s; without the bounds a
    -- single pattern or encoding bomb holds the daemon for minutes or for
    -- ever); the figure measured on a quiet machine is in the README
    assert.is_true(max < 8.0 * SLOW, ("/health took %.3f s at worst"):format(max))
    print(("\n[hostile_spec] max /health latency %.1f ms over %d polls"):format(max * 1000, polls))
    assert.are.equal(0, terminate(d))
    d = nil
  end)

  it("cannot change how the runtime treats another module's rejections and empty lists", function()
    d = start(agg, proj)
    local st, body = command(d, "hostile", "t", "Tamper")
    assert.are.equal(422, st)
    assert.are.equal("tampered", body.error.message)
    st, body = command(d, "victim", "v", "Refuse")
    assert.are.equal(422, st)
    assert.are.equal("rejected", body.error.code)
    assert.are.equal("always", body.error.details.why)
    local _, text
    st, _, text = command(d, "victim", "v", "Add")
    assert.are.equal(200, st)
    assert.matches('"tags":[]', text, 1, true)
    assert.matches('"meta":{}', text, 1, true)
    assert.are.equal(0, terminate(d))
    d = nil
  end)

  it("after a kill, brings back the code that was running, not a broken edit saved since", function()
    d = start(agg, proj)
    victim_works(d, "before")
    -- an edit saved without SIGHUP, and broken
    support.write(agg .. "/victim.lua", "this is not Lua (")
    local st = command(d, "hostile", "k", "Loop")
    assert.are.equal(500, st)
    victim_works(d, "after")
    local _, body = command(d, "victim", "v2", "Refuse")
    assert.are.equal("rejected", body.error.code)
    -- and SIGHUP still checks what is on disk, keeping the running code
    d:signal("HUP")
    daemon.sleep(0.5)
    victim_works(d, "after-hup")
    assert.are.equal(0, terminate(d))
    d = nil
  end)
end)
