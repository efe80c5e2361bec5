-- The command path through ebb.core: dispatch, metadata, every error kind
-- (each leaving the store untouched), command-id deduplication, the sandbox.
local core = require "ebb.core"
local support = require "support"

-- A test aggregate whose commands misbehave on purpose.
local PROBE = [[
local ebb = require "ebb"
local probe = { type = "Probe" }
function probe.initial() return { count = 0 } end
probe.apply = {
  Counted = function(s, e) s.count = s.count + 1; s.saw_position = e.position ~= nil; return s end,
  Broken = function() error("apply failed") end,
}
local function run(code)
  return function(s, c)
    local f = assert(load(code))
    f(s, c)
    return { { type = "Counted", data = {} } }
  end
end
probe.handle = {
  Count = function(_, c, ctx)
    return { { type = "Counted", data = { n = c.data.n, id = ctx.id(), now = ctx.now } ,
               metadata = { source = "probe" } } }
  end,
  Nothing = function() return {} end,
  Several = function(_, c)
    local out = {}
    for i = 1, c.data.n do
      out[i] = { type = i % 2 == 1 and "Counted" or "Tallied",
                 data = { i = i, pad = string.rep("d", c.data.pad or 0) },
                 metadata = { k = i, pad = string.rep("m", c.data.pad or 0) } }
    end
    return out
  end,
  Nulls = function(_, c)
    assert(c.data.gone == ebb.null and ebb.null ~= nil, "JSON null must arrive as ebb.null")
    return { { type = "Counted", data = { gone = ebb.null, none = ebb.array(), list = c.data.list } } }
  end,
  Slow = function(_, _, ctx)
    local x = 0
    for i = 1, 3000000 do x = x + i end
    return { { type = "Counted", data = { token = ctx.id(), x = x } } }
  end,
  Reject = function(s) ebb.reject("not today", { count = s.count, why = "probe" }) end,
  NeedsCount = function(s)
    if s.count == 0 then ebb.reject("nothing counted yet", { count = s.count, list = { 1, "\"two\"" } }) end
    return { { type = "Counted", data = {} } }
  end,
  FailsUncounted = function(s)
    if s.count == 0 then error("not yet") end
    return { { type = "Counted", data = {} } }
  end,
  SlowMaybe = function(_, c)
    local x = 0
    for i = 1, 3000000 do x = x + i end
    if not c.data.ok then ebb.reject("refused by " .. c.data.who) end
    return { { type = "Counted", data = { who = c.data.who, x = x } } }
  end,
  MutateThenReject = function(s) s.count = 999; ebb.reject("changed my mind") end,
  MutateThenFail = function(s) s.count = 999; error("half done") end,
  Fail = function() local t = nil; return t.field end,
  ReturnString = function() return "oops" end,
  ReturnNil = function() end,
  ReturnMap = function() return { a = { type = "Counted", data = {} } } end,
  NoType = function() return { { data = {} } } end,
  DataString = function() return { { type = "Counted", data = "x" } } end,
  DataFunction = function() return { { type = "Counted", data = { f = print } } } end,
  Unapplicable = function() return { { type = "Broken", data = {} } } end,
  Io = run "return io.open('/etc/passwd')",
  OsExecute = run "return os.execute('true')",
  OsGetenv = run "return os.getenv('HOME')",
  OsTimeNow = run "return os.time()",
  Debug = run "return debug.getinfo(1)",
  Package = run "return package.loaded",
  RequireC = run "return require 'cjson'",
  RequireParent = run "return require '..secret'",
  Dofile = run "return dofile('/etc/passwd')",
  Loadfile = run "return loadfile('/etc/passwd')",
  Dump = run "return ('').dump(print)",
  Binary = run "return load('\27Lua' .. string.rep('x', 40))()",
  Random = run "return math.random()",
  Gc = run "return setmetatable({}, { __gc = function() end })",
  LeakString = run "local _, t = pairs(string); t.upper = function() return 'HIJACKED' end",
  RewriteEbb = run "require('ebb').reject = function() end",
  RawsetEbb = run "rawset(require('ebb'), 'reject', function() end)",
  Shout = function(_, c) return { { type = "Counted", data = { text = c.data.text:upper() } } } end,
  PoisonArrays = function(_, c)
    rawset(getmetatable(c.data.xs), "__gc", function() while true do end end)
    rawset(getmetatable(c.data.xs), "__mode", "v")
    return { { type = "Counted", data = { xs = c.data.xs } } }
  end,
  EmptyRep = function() return { { type = "Counted", data = { s = string.rep("", math.maxinteger) } } } end,
  Reps = function()
    local out = {}
    for _, c in ipairs { { "ab", 0 }, { "ab", -3 }, { "ab", 1 }, { "ab", 5 }, { "abc", 7, "-" }, { "x", 1, "--" },
                          { "", 4, "," }, { "a", 3, "" }, { "xyz", 1000, "<>" }, { "q", 100000 } } do
      out[#out + 1] = string.rep(c[1], c[2], c[3])
    end
    return { { type = "Counted", data = { reps = out } } }
  end,
  HugeMove = function() table.move({}, 1, 1 << 62, 1, {}) end,
  Hoard = function() while true do hoard = { hoard } end end,
  Loop = function() while true do end end,
  LoopInPcall = function() while true do pcall(function() while true do end end) end end,
  LoopInCoroutine = function()
    while true do coroutine.resume(coroutine.create(function() while true do end end)) end
  end,
  MemoryBomb = function()
    local t = {}
    while true do t[#t + 1] = string.rep("x", 1000000) .. #t end
  end,
  MemoryBombInPcall = function()
    while true do
      pcall(function()
        local t = {}
        while true do t[#t + 1] = string.rep("y", 1000000) .. #t end
      end)
    end
  end,
}
return probe
]]

describe("commands", function()
  local dir, aggs, rt

  local function open()
    return assert(core.open { data = dir, aggregates = aggs, durability = "normal",
                              memory_limit = 32 * 1024 * 1024, instruction_budget = 5000000 })
  end

  before_each(function()
    dir = support.tmpdir()
    aggs = support.aggregates_copy()
    support.write(aggs .. "/probe.lua", PROBE)
    rt = open()
  end)

  after_each(function()
    rt:close()
    support.rmdir(dir)
    support.rmdir(aggs)
  end)

  local function send(type_, data, extra)
    local c = { aggregate = "Probe", id = "p-1", type = type_, data = data or {} }
    for k, v in pairs(extra or {}) do c[k] = v end
    return rt:send(c)
  end

  it("runs a command and appends its events with causal metadata", function()
    local r = assert(send("Count", { n = 7 }, { metadata = { user_id = "u-9", tenant = "acme" } }))
    assert.equal("Probe-p-1", r.stream)
    assert.equal(1, r.version)
    assert.equal(1, r.position)
    assert.equal(1, #r.events)
    local e = rt:read("Probe-p-1")[1]
    assert.equal("Counted", e.type)
    assert.equal(7, e.data.n)
    assert.equal("integer", math.type(e.data.n))
    assert.equal(e.recorded_at, e.data.now)
    assert.matches("^%x+%-", e.data.id)
    assert.equal("u-9", e.metadata.user_id)
    assert.equal("acme", e.metadata.tenant)
    assert.equal("probe", e.metadata.source)
    assert.equal(e.metadata.command_id, e.metadata.causation_id)
    assert.equal(e.metadata.command_id, e.metadata.correlation_id)
    assert.same(r.events[1], e)
  end)

  it("keeps a given correlation id and uses the command id as causation", function()
    assert(send("Count", {}, { command_id = "cmd-1", metadata = { correlation_id = "flow-1" } }))
    local m = rt:read("Probe-p-1")[1].metadata
    assert.equal("flow-1", m.correlation_id)
    assert.equal("cmd-1", m.causation_id)
    assert.equal("cmd-1", m.command_id)
  end)

  it("folds earlier events with apply before deciding", function()
    for _ = 1, 3 do assert(send("Count")) end
    local s = assert(rt:state("Probe", "p-1"))
    assert.equal(3, s.version)
    assert.equal(3, s.state.count)
    local _, _, _, info = send("Reject")
    assert.equal(3, info.details.count)
  end)

  it("gives handlers JSON null as ebb.null, and keeps empty arrays apart from objects", function()
    local r = assert(send("Nulls", '{"gone":null,"list":[]}'))
    assert.equal(core.null, r.events[1].data.gone)
    local e = rt:read("Probe-p-1")[1]
    assert.equal(core.null, e.data.gone)
    assert.equal('[]', core.json_encode(e.data.none))
    assert.equal('[]', core.json_encode(e.data.list))
  end)

  -- A decision keeps a few events in itself and more elsewhere, and each
  -- event's type, data and metadata in one block that grows for big ones.
  it("appends every event a handler returns, in order, whatever their number and size", function()
    local version = 0
    for _, case in ipairs { { 1, 0 }, { 4, 0 }, { 5, 0 }, { 9, 3 }, { 2, 6000 }, { 7, 700 } } do
      local n, pad = case[1], case[2]
      local r = assert(send("Several", { n = n, pad = pad }))
      assert.equal(version + n, r.version)
      assert.equal(n, #r.events)
      local stored = rt:read("Probe-p-1", { from = version + 1 })
      assert.equal(n, #stored)
      for i = 1, n do
        local e = stored[i]
        assert.equal(i % 2 == 1 and "Counted" or "Tallied", e.type)
        assert.equal(version + i, e.version)
        assert.same({ i = i, pad = string.rep("d", pad) }, e.data)
        assert.equal(i, e.metadata.k)
        assert.equal(string.rep("m", pad), e.metadata.pad)
        assert.equal(e.metadata.command_id, e.metadata.causation_id)
        assert.same(r.events[i], e)
      end
      version = version + n
    end
    assert.equal(16, rt:state("Probe", "p-1").state.count) -- the Counted ones
  end)

  it("accepts a handler that returns no events", function()
    local r = assert(send("Nothing"))
    assert.equal(0, r.version)
    assert.same({}, r.events)
    assert.equal(0, rt:head())
  end)

  it("appends with the loaded version, or a matching expected_version", function()
    assert(send("Count"))
    assert(send("Count", {}, { expected_version = 1 }))
    local r, msg, code, info = send("Count", {}, { expected_version = 1 })
    assert.is_nil(r)
    assert.equal("wrong_expected_version", code)
    assert.same({ 1, 2 }, { info.expected, info.actual })
    assert.matches("expected 1, actual 2", msg)
    assert.equal(2, rt:head())
  end)

  describe("refuses without appending anything", function()
    local function refused(expected_code, pattern, type_, data, extra)
      local head = rt:head()
      local r, msg, code, info = send(type_, data, extra)
      assert.is_nil(r)
      assert.equal(expected_code, code)
      if pattern then assert.matches(pattern, msg) end
      assert.equal(head, rt:head())
      assert.equal(0, rt:version("Probe-p-1"))
      return msg, info
    end

    it("an unknown aggregate", function()
      local r, msg, code = rt:send { aggregate = "Nope", id = "1", type = "X" }
      assert.is_nil(r)
      assert.equal("not_found", code)
      assert.matches("unknown aggregate Nope", msg)
    end)

    it("an unknown command", function() refused("not_found", "Probe has no command Missing", "Missing") end)

    it("a rejection, with its message and details", function()
      local _, info = refused("rejected", "^not today$", "Reject")
      assert.same({ count = 0, why = "probe" }, info.details)
    end)

    it("a Lua error, with module and line", function() refused("script_error", "probe%.lua:%d+:", "Fail") end)

    it("a handler returning a string", function()
      refused("script_error", "handle.ReturnString returned string", "ReturnString")
    end)
    it("a handler returning nothing", function()
      refused("script_error", "handle.ReturnNil returned nil", "ReturnNil")
    end)
    it("a handler returning a map", function() refused("script_error", "not a list of events", "ReturnMap") end)
    it("an event without a type", function() refused("script_error", "without a string `type`", "NoType") end)
    it("event data that is not a table", function() refused("script_error", "data is string", "DataString") end)
    it("event data that cannot be stored", function() refused("script_error", "cannot be stored", "DataFunction") end)
    it("an event that apply cannot fold", function() refused("script_error", "apply failed", "Unapplicable") end)

    it("malformed command data", function()
      refused("bad_request", "not valid JSON", "Count", '{"n": 1,}')
      refused("bad_request", "must be a JSON object", "Count", "[1,2]")
    end)

    it("invalid names", function()
      local r, _, code = rt:send { aggregate = "Probe", id = "bad\1id", type = "Count" }
      assert.is_nil(r)
      assert.equal("bad_request", code)
    end)
  end)

  describe("command ids", function()
    it("return the original result and append nothing the second time", function()
      local first = assert(send("Count", { n = 1 }, { command_id = "c-1" }))
      local again = assert(send("Count", { n = 2 }, { command_id = "c-1" }))
      assert.same(first, again)
      assert.equal(1, rt:head())
    end)

    it("hold across a reopen", function()
      local first = assert(send("Count", { n = 1 }, { command_id = "c-1" }))
      rt:close()
      rt = open()
      assert.same(first, assert(send("Count", { n = 1 }, { command_id = "c-1" })))
      assert.equal(1, rt:head())
    end)

    it("remember commands that recorded no event", function()
      assert(send("Nothing", {}, { command_id = "c-0" }))
      assert(send("Count"))
      local again = assert(send("Nothing", {}, { command_id = "c-0" }))
      assert.equal(0, again.version)
      assert.equal(1, rt:head())
    end)

    it("answer a process that lost the race with what the winner stored", function()
      rt:close()
      local q = support.quote
      local store = support.store_for(dir)
      local cmd = table.concat({ q(support.ebb), "--data", q(dir), "--aggregates", q(aggs),
                                 "--durability", "normal", store and "--store " .. q(store) or "",
                                 "send", "Probe", "p-1", "Slow", "--command-id", "same" }, " ")
      local out1, out2 = os.tmpname(), os.tmpname()
      assert(os.execute("(" .. cmd .. " > " .. out1 .. ") & (" .. cmd .. " > " .. out2 .. "); wait"))
      rt = open()
      local stored = rt:read("Probe-p-1")
      assert.equal(1, #stored)
      for _, f in ipairs { out1, out2 } do
        local r = core.json_decode(support.read(f))
        assert.equal(stored[1].id, r.events[1].id)
        assert.equal(stored[1].data.token, r.events[1].data.token)
        os.remove(f)
      end
      assert.same({ 1, 1 }, { rt:state("Probe", "p-1").version, rt:state("Probe", "p-1").state.count })
    end)

    it("answer a re-sent command that recorded nothing with the same position", function()
      assert(send("Count"))
      local first = assert(send("Nothing", {}, { command_id = "c-empty" }))
      assert.same({ 1, 1 }, { first.version, first.position })
      assert.same(first, assert(send("Nothing", {}, { command_id = "c-empty" })))
      rt:close()
      rt = open()
      assert.same(first, assert(send("Nothing", {}, { command_id = "c-empty" })))
    end)

    it("answer a refused command with its refusal, even once the aggregate would accept it", function()
      local r, msg, code, info = send("NeedsCount", {}, { command_id = "c-no" })
      assert.is_nil(r)
      assert.same({ "rejected", "nothing counted yet" }, { code, msg })
      assert.same({ count = 0, list = { 1, '"two"' } }, info.details)
      assert(send("Count"))
      assert.equal(1, rt:head())
      for _ = 1, 2 do
        local r2, msg2, code2, info2 = send("NeedsCount", {}, { command_id = "c-no" })
        assert.is_nil(r2)
        assert.same({ "rejected", "nothing counted yet" }, { code2, msg2 })
        assert.same(info.details, info2.details)
        assert.equal(1, rt:head())
        rt:close()
        rt = open()
      end
      assert.equal(1, rt:state("Probe", "p-1").state.count)
      -- a new command id is decided anew
      assert(send("NeedsCount", {}, { command_id = "c-yes" }))
      assert.equal(2, rt:head())
    end)

    it("refused, conflict when reused for another command or aggregate", function()
      assert.is_nil(send("NeedsCount", {}, { command_id = "c-no" }))
      local r, _, code = send("Count", {}, { command_id = "c-no" })
      assert.is_nil(r)
      assert.equal("conflict", code)
      r, _, code = send("NeedsCount", {}, { command_id = "c-no", id = "p-2" })
      assert.is_nil(r)
      assert.equal("conflict", code)
      assert.equal(0, rt:head())
    end)

    it("keep no trace of a command that failed otherwise: it may be sent again", function()
      local r, _, code = send("FailsUncounted", {}, { command_id = "c-fail" })
      assert.is_nil(r)
      assert.equal("script_error", code)
      r, _, code = send("Count", { n = "x" }, { command_id = "c-bad", expected_version = 5 })
      assert.is_nil(r)
      assert.equal("wrong_expected_version", code)
      assert(send("Count"))
      assert(send("FailsUncounted", {}, { command_id = "c-fail" }))
      assert(send("Count", {}, { command_id = "c-bad", expected_version = 2 }))
      assert.equal(3, rt:head())
    end)

    it("answer a refusal and an acceptance racing on one id with whichever was stored first", function()
      rt:close()
      local q = support.quote
      local store = support.store_for(dir)
      local function cmd(ok, who)
        return table.concat({ q(support.ebb), "--data", q(dir), "--aggregates", q(aggs),
                              "--durability", "normal", store and "--store " .. q(store) or "",
                              "send", "Probe", "p-1", "SlowMaybe",
                              q(core.json_encode { ok = ok, who = who }), "--command-id", "same" }, " ")
      end
      local out1, out2 = os.tmpname(), os.tmpname()
      assert(os.execute("(" .. cmd(false, "a") .. " > " .. out1 .. " 2>&1) & (" .. cmd(true, "b")
        .. " > " .. out2 .. " 2>&1); wait"))
      rt = open()
      local stored = rt:read("Probe-p-1")
      local a, b = support.read(out1), support.read(out2)
      os.remove(out1)
      os.remove(out2)
      if #stored == 0 then -- the refusal won: both answer it
        support.contains(a, "refused by a")
        support.contains(b, "refused by a")
      else
        assert.equal(1, #stored)
        for _, text in ipairs { a, b } do
          assert.equal(stored[1].id, core.json_decode(text).events[1].id)
        end
      end
      local r, msg = send("SlowMaybe", { ok = #stored == 0, who = "c" }, { command_id = "same" })
      if #stored == 0 then
        assert.is_nil(r)
        assert.equal("refused by a", msg)
      else
        assert.equal(stored[1].id, r.events[1].id)
      end
    end)

    it("conflict when reused for another command or aggregate", function()
      assert(send("Count", {}, { command_id = "c-1" }))
      local r, _, code = send("Nothing", {}, { command_id = "c-1" })
      assert.is_nil(r)
      assert.equal("conflict", code)
      r, _, code = send("Count", {}, { command_id = "c-1", id = "p-2" })
      assert.is_nil(r)
      assert.equal("conflict", code)
      assert.equal(1, rt:head())
    end)
  end)

  describe("sandbox", function()
    local forbidden = { "Io", "OsExecute", "OsGetenv", "OsTimeNow", "Debug", "Package", "RequireC",
                        "RequireParent", "Dofile", "Loadfile", "Dump", "Binary", "Random", "Gc" }
    for _, name in ipairs(forbidden) do
      it("refuses " .. name .. " as a script error", function()
        local r, msg, code = send(name)
        assert.is_nil(r, "the sandbox let " .. name .. " through")
        assert.equal("script_error", code)
        assert.is_string(msg)
        assert.equal(0, rt:head())
      end)
    end

    it("keeps the standard library and the ebb library read-only for every module", function()
      for _, name in ipairs { "LeakString", "RewriteEbb", "RawsetEbb" } do
        local r, msg, code = send(name)
        assert.is_nil(r, name)
        assert.equal("script_error", code)
        assert.matches("read%-only", msg)
      end
      assert.equal("HELLO", assert(send("Shout", { text = "hello" })).events[1].data.text)
      local _, _, code, info = send("Reject")
      assert.equal("rejected", code)
      assert.equal("probe", info.details.why)
    end)

    it("does not let a script change the metatable shared by decoded arrays", function()
      assert(send("PoisonArrays", { xs = { 1, 2 } }))
      local r = send("PoisonArrays", { xs = { 3, 4 } })
      assert.is_table(r)
      assert.same({ 3, 4 }, r.events[1].data.xs)
      rt:close()
      rt = open()
      assert.same({ 3, 4 }, rt:read("Probe-p-1")[2].data.xs)
    end)

    it("starts afresh after a kill that left its garbage reachable", function()
      rt:close()
      rt = assert(core.open { data = dir, aggregates = aggs, durability = "normal",
                              memory_limit = 4 * 1024 * 1024 })
      assert(send("Count"))
      local r, msg, code = send("Hoard")
      assert.is_nil(r)
      assert.equal("script_error", code)
      assert.matches("memory", msg)
      for _ = 1, 3 do assert(send("Count")) end
      assert.equal(4, rt:state("Probe", "p-1").state.count)
    end)

    it("bounds C loops that allocate nothing", function()
      local r = assert(send("EmptyRep"))
      assert.equal("", r.events[1].data.s)
      -- the sandbox's own string.rep gives what Lua's does
      local want = {}
      for _, c in ipairs { { "ab", 0 }, { "ab", -3 }, { "ab", 1 }, { "ab", 5 }, { "abc", 7, "-" }, { "x", 1, "--" },
                            { "", 4, "," }, { "a", 3, "" }, { "xyz", 1000, "<>" }, { "q", 100000 } } do
        want[#want + 1] = string.rep(c[1], c[2], c[3])
      end
      assert.same(want, assert(send("Reps")).events[1].data.reps)
      local r2, msg, code = send("HugeMove")
      assert.is_nil(r2)
      assert.equal("script_error", code)
      assert.matches("too large", msg)
    end)

    for _, name in ipairs { "Loop", "LoopInPcall", "LoopInCoroutine", "MemoryBomb", "MemoryBombInPcall" } do
      it("ends " .. name .. " as a script error at its bound, and lives on", function()
        local r, msg, code = send(name)
        assert.is_nil(r)
        assert.equal("script_error", code)
        -- Allocation is charged to the budget: at 5M instructions a bomb
        -- spends it before the 32 MiB memory cap is reached.
        assert.matches(name:match("Memory") and "instruction budget of %d+ exceeded %(allocating"
                       or "instruction budget", msg)
        assert.equal(0, rt:head())
        assert(send("Count"))
        assert.equal(1, rt:head())
      end)
    end
  end)

  describe("state cache", function()
    it("keeps no trace of a handler that changed the state and then failed", function()
      assert(send("Count"))
      assert.equal(1, rt:state("Probe", "p-1").state.count)
      local count = 1
      for _, name in ipairs { "MutateThenReject", "MutateThenFail" } do
        assert.is_nil(send(name))
        assert.equal(count, rt:state("Probe", "p-1").state.count)
        count = assert(send("Count")).version
        assert.equal(count, rt:state("Probe", "p-1").state.count)
      end
    end)

    it("catches up with events appended by another writer", function()
      assert(send("Count"))
      assert.equal(1, rt:cache_stats().size)
      local other = open()
      assert(other:send { aggregate = "Probe", id = "p-1", type = "Count" })
      assert(rt:append("Probe-p-1", 2, { { type = "Counted", data = {} } }))
      other:close()
      local r = assert(send("Count"))
      assert.equal(4, r.version)
      assert.equal(4, rt:state("Probe", "p-1").state.count)
      assert.is_true(rt:cache_stats().hits >= 2)
    end)

    it("judges expected_version against the store, not a stale cached state", function()
      assert(send("Count"))
      local other = open()
      assert(other:send { aggregate = "Probe", id = "p-1", type = "Count" })
      other:close()
      local r = assert(send("Count", {}, { expected_version = 2 }))
      assert.equal(3, r.version)
      local _, _, code, info = send("Count", {}, { expected_version = 2 })
      assert.equal("wrong_expected_version", code)
      assert.same({ 2, 3 }, { info.expected, info.actual })
    end)

    it("folds the same with and without the cache: apply never sees a position", function()
      assert(send("Count"))
      assert.is_false(rt:state("Probe", "p-1").state.saw_position)
      rt:close()
      rt = open()
      assert.is_false(rt:state("Probe", "p-1").state.saw_position)
    end)

    it("holds at most cache_size streams", function()
      rt:close()
      rt = assert(core.open { data = dir, aggregates = aggs, durability = "normal", cache_size = 2 })
      for i = 1, 5 do assert(send("Count", {}, { id = "p-" .. i })) end
      local stats = rt:cache_stats()
      assert.same({ 2, 2, 3 }, { stats.size, stats.max, stats.evictions })
      for i = 1, 5 do assert.equal(1, rt:state("Probe", "p-" .. i).state.count) end
    end)

    it("can be turned off", function()
      rt:close()
      rt = assert(core.open { data = dir, aggregates = aggs, durability = "normal", cache_size = -1 })
      assert(send("Count"))
      assert(send("Count"))
      assert.same({ 0, 0 }, { rt:cache_stats().size, rt:cache_stats().hits })
      assert.equal(2, rt:state("Probe", "p-1").state.count)
    end)
  end)

  describe("modules", function()
    it("reports a broken module with file and line, and keeps the others working", function()
      support.write(aggs .. "/broken.lua", "local x = {\nreturn x\n")
      support.write(aggs .. "/shapeless.lua", "return { type = 'Shapeless', handle = {} }")
      rt:close()
      rt = open()
      local problems = rt:check()
      assert.equal(2, #problems)
      assert.matches("broken%.lua:%d+:", problems[1])
      assert.matches("shapeless%.lua: `initial` must be a function", problems[2])
      assert(send("Count"))
    end)

    it("finds an aggregate by type or by module name", function()
      assert(rt:send { aggregate = "probe", id = "p-1", type = "Count" })
      assert.equal(1, rt:version("Probe-p-1"))
    end)
  end)
end)
