-- The library itself: ebb (rejections, JSON shapes) and ebb.testing (the
-- given/when/then helper), driven with small aggregate modules made here.
package.path = "runtime/lua/?.lua;runtime/lua/?/init.lua;aggregates/?.lua;" .. package.path

local ebb = require "ebb"
local t = require "ebb.testing"
local support = require "support"

local failure, contains = support.failure, support.contains

-- A counter: Add{n} adds n (a positive integer) unless the counter is locked.
-- `handle` entries for the helper's error cases are added per test.
local function counter()
  local m = { type = "Counter", schemas = { Added = 2 }, upcast = { Added = {} } }
  function m.initial() return { total = 0, locked = false } end
  m.apply = {
    Added = function(s, e) s.total = s.total + e.data.n end,
    Locked = function(s) s.locked = true end,
  }
  m.handle = {
    Add = function(s, c)
      if s.locked then ebb.reject("counter is locked", { total = s.total }) end
      if math.type(c.data.n) ~= "integer" then ebb.reject("n must be an integer") end
      return { { type = "Added", data = { n = c.data.n } } }
    end,
    Nothing = function() return {} end,
  }
  return m
end

describe("ebb", function()
  it("raises a rejection as a table the runtime recognises", function()
    local ok, err = pcall(ebb.reject, "no", { why = 1 })
    assert.is_false(ok)
    assert.is_true(ebb.is_rejection(err))
    assert.are.equal("rejection", getmetatable(err).__ebb)
    assert.are.equal("no", err.message)
    assert.are.same({ why = 1 }, err.details)
    assert.are.equal("rejected: no", tostring(err))
  end)

  it("refuses a rejection without a string message", function()
    local err = failure(function() ebb.reject(42) end)
    contains(err, "ebb.reject: message must be a string, got number")
  end)

  it("tells rejections from other values", function()
    assert.is_false(ebb.is_rejection("rejected: no"))
    assert.is_false(ebb.is_rejection({ message = "no" }))
    assert.is_false(ebb.is_rejection(nil))
    assert.is_false(ebb.is_rejection(setmetatable({}, { __ebb = "other" })))
  end)

  it("marks arrays and objects by metatable, keeping the table", function()
    local list = { 1, 2 }
    assert.are.equal(list, ebb.array(list))
    assert.are.equal("array", getmetatable(list).__jsontype)
    assert.are.equal("array", getmetatable(ebb.array()).__jsontype)
    assert.are.equal("object", getmetatable(ebb.object()).__jsontype)
    assert.are.equal(getmetatable(ebb.array()), getmetatable(ebb.array()))
    contains(failure(function() ebb.array("x") end), "ebb.array: expected a table or nothing")
  end)

  it("has no null sentinel in plain Lua", function()
    assert.is_nil(ebb.null)
  end)
end)

describe("ebb.testing", function()
  describe("given and state", function()
    it("folds the given events, skipping types without apply", function()
      t.scenario(counter(), "c-1")
        :given { { type = "Added", data = { n = 2 } }, { type = "Noted", data = {} },
                 { type = "Added", data = { n = 3 } } }
        :expect_state { total = 5, locked = false }
    end)

    it("accepts one event as :given(type, data)", function()
      t.scenario(counter()):given("Added", { n = 4 }):given("Added", { n = 1 })
        :expect_state { total = 5 }
    end)

    it("fills the stored fields of given events", function()
      local m, seen = counter(), {}
      m.apply.Added = function(s, e) seen[#seen + 1] = e; return s end
      t.scenario(m, "c-1"):at("2026-05-01T00:00:00.000Z")
        :given { { type = "Added", data = { n = 1 }, metadata = { user_id = "u" } },
                 { type = "Added", data = { n = 1 }, id = "e-x", schema = 2,
                   recorded_at = "2025-01-01T00:00:00.000Z", position = 77 } }
        :expect_state(function() end)
      assert.are.same({ "Counter-c-1", 1, "event-1", "2026-05-01T00:00:00.000Z", 2, "u" },
                      { seen[1].stream, seen[1].version, seen[1].id,
                        seen[1].recorded_at, seen[1].schema, seen[1].metadata.user_id })
      assert.are.same({ 2, "e-x", "2025-01-01T00:00:00.000Z" },
                      { seen[2].version, seen[2].id, seen[2].recorded_at })
      -- as in the runtime, apply never sees a global position
      assert.is_nil(seen[1].position)
      assert.is_nil(seen[2].position)
    end)

    it("upcasts given events from their schema to the current one", function()
      local m = counter()
      m.upcast.Added[1] = function(d) d.n = d.count; d.count = nil; return d end
      local schema
      m.apply.Added = function(s, e) s.total = s.total + e.data.n; schema = e.schema end
      t.scenario(m):given { { type = "Added", data = { count = 7 }, schema = 1 } }
        :expect_state { total = 7 }
      assert.are.equal(2, schema)
    end)

    it("refuses given events it cannot upcast, as the runtime does", function()
      local m = counter()
      m.schemas.Added = 3
      local r = t.scenario(m):given { { type = "Added", data = { n = 1 }, schema = 1 } }:result()
      assert.equal("script_error", r.outcome)
      assert.matches("no upcaster upcast.Added%[1%]", r.message)
    end)

    it("replaces the state with what apply returns", function()
      local m = counter()
      m.apply.Locked = function() return { total = -1, locked = true } end
      t.scenario(m):given("Added", { n = 1 }):given("Locked", {}):expect_state { total = -1 }
    end)

    it("fails when the state differs, showing both", function()
      local err = failure(function()
        t.scenario(counter(), "c-1"):given("Added", { n = 2 }):expect_state { total = 3 }
      end)
      contains(err, "Counter-c-1, given events only: states differ at state.total: "
                    .. "expected 3 (integer), got 2 (integer)")
      contains(err, "expected:\n  { total = 3 }\ngot:\n  { locked = false, total = 2 }")
    end)

    it("tells an integer from a float", function()
      local err = failure(function()
        t.scenario(counter()):given("Added", { n = 2.0 }):expect_state { total = 2 }
      end)
      contains(err, "at state.total: expected 2 (integer), got 2.0 (float)")
    end)

    it("fails when a state function returns false, and lets its asserts fail", function()
      contains(failure(function()
        t.scenario(counter()):expect_state(function(s) return s.total == 1 end)
      end), "the state check returned false")
      contains(failure(function()
        t.scenario(counter()):expect_state(function(s) assert.are.equal(1, s.total) end)
      end), "Expected objects to be equal")
    end)

    it("fails when the state cannot be encoded as JSON", function()
      local m = counter()
      m.apply.Locked = function(s) s.locked = function() end end
      contains(failure(function() t.scenario(m):given("Locked", {}):expect_state {} end),
               "the state of Counter-1 cannot be shown as JSON: cannot encode data.locked: function")
    end)

    it("requires a declared JSON array where the expectation says so", function()
      local m = counter()
      function m.initial() return { items = {} } end
      contains(failure(function() t.scenario(m):expect_state { items = ebb.array() } end),
               "at state.items: expected a JSON array, got a JSON object")
    end)
  end)

  describe("when and events", function()
    it("matches the new events and applies them", function()
      t.scenario(counter(), "c-1"):given("Added", { n = 1 })
        :when("Add", { n = 2 })
        :expect_events { { type = "Added", data = { n = 2 } } }
        :expect_state { total = 3 }
    end)

    it("accepts an empty list as no events", function()
      t.scenario(counter()):when("Nothing"):expect_events {}:expect_state { total = 0 }
    end)

    it("fails on a wrong value with the path and both lists", function()
      local err = failure(function()
        t.scenario(counter(), "c-1"):when("Add", { n = 2 })
          :expect_events { { type = "Added", data = { n = 3 } } }
      end)
      contains(err, "Counter-c-1, Add: events differ at [1].data.n: expected 3 (integer), got 2 (integer)")
      contains(err, "expected:\n  { { type = \"Added\", data = { n = 3 } } }")
      contains(err, "got:\n  { { type = \"Added\", data = { n = 2 } } }")
    end)

    it("fails on a float where an integer was expected", function()
      contains(failure(function()
        t.scenario(counter()):when("Add", { n = 2 }):expect_events { { type = "Added", data = { n = 2.0 } } }
      end), "at [1].data.n: expected 2.0 (float), got 2 (integer)")
    end)

    it("fails on missing, extra and unexpected parts", function()
      local function expecting(events)
        return failure(function() t.scenario(counter()):when("Add", { n = 2 }):expect_events(events) end)
      end
      contains(expecting {}, "at [1]: unexpected event Added")
      contains(expecting { { type = "Added", data = { n = 2 } }, { type = "Added", data = {} } },
               "at [2]: missing event Added")
      contains(expecting { { type = "Locked", data = { n = 2 } } },
               "at [1].type: expected \"Locked\" (string), got \"Added\" (string)")
      contains(expecting { { type = "Added", data = {} } }, "at [1].data.n: unexpected 2 (integer)")
    end)

    it("fails when events were expected but the command was rejected", function()
      contains(failure(function()
        t.scenario(counter()):given("Locked", {}):when("Add", { n = 1 }):expect_events {}
      end), "but it was rejected: \"counter is locked\", details { total = 0 }")
    end)

    it("gives new events stored fields and the command's metadata", function()
      local r = t.scenario(counter(), "c-1"):given("Added", { n = 1 })
        :when { type = "Add", data = { n = 2 }, metadata = { user_id = "u-1" }, command_id = "cmd-9" }
        :result()
      local e = r.events[1]
      assert.are.same({ "ok", 2, "Counter-c-1", 2, 2, "event-2", t.NOW },
                      { r.outcome, r.version, e.stream, e.version, e.position, e.id, e.recorded_at })
      assert.are.same({ user_id = "u-1", command_id = "cmd-9", causation_id = "cmd-9",
                        correlation_id = "cmd-9" }, e.metadata)
      assert.are.equal(2, e.schema)
    end)

    it("links events to a command without an id, keeping a given correlation", function()
      local e = t.scenario(counter()):when("Add", { n = 1 }, { correlation_id = "flow-1" }):result().events[1]
      assert.are.same({ causation_id = "command-1", command_id = "command-1", correlation_id = "flow-1" },
                      e.metadata)
    end)

    it("applies a new event as the handler built it, without a position", function()
      local m, seen = counter(), {}
      m.handle.Add = function() return { seen.returned } end
      m.apply.Added = function(_, e) seen.applied = e end
      seen.returned = { type = "Added" }
      t.scenario(m, "c-1"):given("Added", {}):when("Add"):expect_events { { type = "Added", data = {} } }
      local e = seen.applied
      assert.are.equal(seen.returned.data, e.data)
      assert.are.same({ "Counter-c-1", 2, "event-2", 2, t.NOW }, { e.stream, e.version, e.id, e.schema, e.recorded_at })
      assert.is_nil(e.position)
    end)

    it("compares metadata on the keys the expectation names", function()
      local m = counter()
      m.handle.Add = function() return { { type = "Added", data = { n = 1 }, metadata = { why = "x" } } } end
      t.scenario(m):when("Add", {}, { user_id = "u" })
        :expect_events { { type = "Added", data = { n = 1 }, metadata = { why = "x", user_id = "u" } } }
      contains(failure(function()
        t.scenario(m):when("Add"):expect_events { { type = "Added", data = { n = 1 }, metadata = { why = "y" } } }
      end), "at [1].metadata.why: expected \"y\" (string), got \"x\" (string)")
    end)

    it("runs once however many expectations follow", function()
      local m, calls = counter(), 0
      local add = m.handle.Add
      m.handle.Add = function(...) calls = calls + 1; return add(...) end
      t.scenario(m):when("Add", { n = 1 })
        :expect_events { { type = "Added", data = { n = 1 } } }
        :expect_state { total = 1 }
      assert.are.equal(1, calls)
    end)

    it("keeps the events it reports apart from what apply does to them", function()
      local m = counter()
      m.apply.Added = function(s, e) s.total = s.total + e.data.n; e.data.n = 0 end
      t.scenario(m):when("Add", { n = 5 }):expect_events { { type = "Added", data = { n = 5 } } }
    end)
  end)

  describe("ctx", function()
    local function recorder()
      local m, seen = counter(), {}
      m.handle.Look = function(_, c, ctx)
        seen.command, seen.now, seen.metadata = c, ctx.now, ctx.metadata
        seen.ids = { ctx.id(), ctx.id(), ctx.id() }
        return {}
      end
      return m, seen
    end

    it("has a fixed clock, numbered ids and the command's metadata", function()
      local m, seen = recorder()
      t.scenario(m, "c-7"):when("Look", { a = 1 }, { user_id = "u" }):expect_events {}
      assert.are.equal(t.NOW, seen.now)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", seen.now)
      assert.are.same({ "id-1", "id-2", "id-3" }, seen.ids)
      assert.are.same({ user_id = "u" }, seen.metadata)
      assert.are.same({ "Look", "c-7", { a = 1 }, { user_id = "u" } },
                      { seen.command.type, seen.command.id, seen.command.data, seen.command.metadata })
    end)

    it("is the same on every run, and :at sets the clock", function()
      local m, seen = recorder()
      t.scenario(m):when("Look"):expect_events {}
      local first = seen.ids
      t.scenario(m):at("2030-02-03T04:05:06.789Z"):when("Look"):expect_events {}
      assert.are.same(first, seen.ids)
      assert.are.equal("2030-02-03T04:05:06.789Z", seen.now)
    end)
  end)

  describe("rejections", function()
    it("are matched on the exact message and, when given, the details", function()
      t.scenario(counter()):given("Locked", {}):when("Add", { n = 1 })
        :expect_rejection("counter is locked")
        :expect_rejection("counter is locked", { total = 0 })
        :expect_state { total = 0, locked = true }
    end)

    it("fail on another message, other details or success", function()
      local function locked() return t.scenario(counter()):given("Locked", {}):when("Add", { n = 1 }) end
      contains(failure(function() locked():expect_rejection("counter is") end),
               "expected the rejection \"counter is\"\nbut it was rejected: \"counter is locked\"")
      contains(failure(function() locked():expect_rejection("counter is locked", { total = 1 }) end),
               "rejection details differ at details.total: expected 1 (integer), got 0 (integer)")
      contains(failure(function()
        t.scenario(counter()):when("Add", { n = 1 }):expect_rejection("counter is locked")
      end), "but it succeeded with events { { type = \"Added\", data = { n = 1 } } }")
    end)

    it("keep details as the runtime would send them, dropping what JSON cannot hold", function()
      local m = counter()
      m.handle.No = function(_, c) ebb.reject("no", c.data.details) end
      t.scenario(m):when("No", { details = { list = { 1, 2 } } })
        :expect_rejection("no", { list = ebb.array { 1, 2 } })
      m.handle.No = function() ebb.reject("no", { f = print }) end
      local r = t.scenario(m):when("No"):result()
      assert.are.same({ "rejected", "no" }, { r.outcome, r.rejection.message })
      assert.is_nil(r.rejection.details)
    end)
  end)

  describe("script errors", function()
    local function returning(value)
      local m = counter()
      m.handle.Bad = function() return value end
      return t.scenario(m):when("Bad")
    end

    it("catch handler results the runtime would refuse", function()
      returning(nil):expect_error("handle.Bad returned nil; it must return a list of events (or {} for none)")
      returning("Added"):expect_error("handle.Bad returned string; it must return a list of events")
      returning({ type = "Added", data = {} })
        :expect_error("handle.Bad returned a table that is not a list of events (a single event? wrap it")
      returning({ 42 }):expect_error("handle.Bad returned event 1 as number, expected a table {type=, data=}")
      returning({ { data = {} } }):expect_error("handle.Bad returned event 1 without a string `type`")
      returning({ { type = "", data = {} } }):expect_error("handle.Bad returned event 1 without a string `type`")
      returning({ { type = "Add\ned", data = {} } })
        :expect_error("handle.Bad returned event 1: event type contains a control character at byte 3")
      returning({ { type = "Added", data = 5 } })
        :expect_error("handle.Bad returned event 1 (Added) whose data is number, expected a table")
      returning({ { type = "Added", data = {}, metadata = "m" } })
        :expect_error("handle.Bad returned event 1 (Added) whose metadata is string, expected a table")
      returning({ { type = "Added", data = { f = print } } })
        :expect_error("the data of event 1 (Added) from handle.Bad cannot be stored: cannot encode data.f: function")
      returning({ { type = "Added", data = { 1, 2 } } })
        :expect_error("the data of event 1 (Added) from handle.Bad must be a table with string keys (a JSON object)")
      returning({ { type = "Added", data = { x = { 1, nil, 3 } } } }):expect_error("cannot encode data.x: sparse array")
      returning({ { type = "Added", data = { x = { 1, y = 2 } } } })
        :expect_error("cannot encode data.x: mixed integer and string keys")
      returning({ { type = "Added", data = { x = ebb.array { y = 1 } } } })
        :expect_error("cannot encode data.x: array with a string key")
      returning({ { type = "Added", data = { x = ebb.object { 1 } } } })
        :expect_error("cannot encode data.x: object with a non-string key")
      returning({ { type = "Added", data = { x = 0 / 0 } } }):expect_error("cannot encode data.x: NaN")
      returning({ { type = "Added", data = { ["a b"] = math.huge } } })
        :expect_error('cannot encode data["a b"]: infinity')
      returning({ { type = "Added", data = { s = "\xff" } } })
        :expect_error("cannot encode data.s: string is not valid UTF-8")
      local deep = {}
      for _ = 1, 300 do deep = { d = deep } end
      returning({ { type = "Added", data = deep } }):expect_error("nesting deeper than 256")
      returning({ { type = "Added", data = {}, metadata = { f = print } } })
        :expect_error("the metadata of event 1 (Added) from handle.Bad cannot be stored: cannot encode data.f")
    end)

    it("accept an event without data as empty data", function()
      returning({ { type = "Noted" } }):expect_events { { type = "Noted", data = {} } }
    end)

    it("stop at the first bad event, after applying the ones before", function()
      local m, applied = counter(), 0
      m.handle.Bad = function() return { { type = "Locked" }, { type = 1 } } end
      m.apply.Locked = function() applied = applied + 1 end
      t.scenario(m):when("Bad"):expect_error("returned event 2 without a string `type`")
      assert.are.equal(1, applied)
    end)

    it("catch errors raised by handlers, apply and initial", function()
      local m = counter()
      m.handle.Boom = function() error("boom") end
      t.scenario(m):when("Boom"):expect_error("spec/testing_spec.lua:%d+: boom$")
      m.handle.Boom = function() error(setmetatable({}, { __tostring = function() return "custom" end })) end
      t.scenario(m):when("Boom"):expect_error("^custom$")
      m.apply.Locked = function() error("bad apply") end
      t.scenario(m):given("Locked", {}):expect_error("bad apply")
      m.apply.Locked = function() error({}) end
      t.scenario(m):given("Locked", {}):expect_error("a table was raised as an error")
      m.apply.Locked = function() ebb.reject("not here") end
      t.scenario(m):given("Locked", {}):expect_error("a table was raised as an error")
      m.initial = function() end
      t.scenario(m):expect_error("Counter.initial() returned nil, expected a table")
    end)

    it("catch a handler that changes the state it was given", function()
      local m = counter()
      m.handle.Sneak = function(s) s.total = 99; return {} end
      t.scenario(m):when("Sneak"):expect_error("handle.Sneak changed the state it was given "
                                               .. "(at state.total: expected 0 (integer), got 99 (integer))")
    end)

    it("fail when the error does not match, or there was none", function()
      local m = counter()
      m.handle.Boom = function() error("boom") end
      contains(failure(function() t.scenario(m):when("Boom"):expect_error("bang") end),
               "expected a script error matching \"bang\"\n"
               .. "but it failed with a script error:\n  spec/testing_spec.lua:")
      contains(failure(function() t.scenario(m):when("Boom"):expect_events {} end),
               "but it failed with a script error:")
      contains(failure(function() t.scenario(m):when("Add", { n = 1 }):expect_error("boom") end),
               "but it succeeded with events")
    end)
  end)

  it("reports a command without a handler as not found", function()
    t.scenario(counter()):when("Reset"):expect_not_found()
    contains(failure(function() t.scenario(counter()):when("Reset"):expect_events {} end),
             "no handler was found: Counter has no command Reset")
    contains(failure(function() t.scenario(counter()):when("Add", { n = 1 }):expect_not_found() end),
             "expected no handler")
  end)

  describe("misuse", function()
    it("is reported at the caller", function()
      local err = failure(function() t.scenario(counter()):given("Added", { n = 1 }):when("Add"):when("Add") end)
      assert.matches("^spec/testing_spec%.lua:%d+: ebb%.testing: a scenario has one :when", err)
      err = failure(function() t.scenario(counter()):given("Added", { f = print }) end)
      assert.matches("^spec/testing_spec%.lua:%d+: ebb%.testing: given event 1 data: cannot encode data%.f: function",
                     err)
    end)

    it("covers bad modules, order of calls and bad arguments", function()
      local function loading(m) return failure(function() t.scenario(m) end) end
      contains(loading(42), "ebb.testing: scenario: the module is a number, expected a table")
      contains(loading {}, "scenario: `type` must be a non-empty string")
      contains(loading { type = "A-B" }, "`type` must not contain '-' (it names the category)")
      contains(loading { type = "X", apply = {}, handle = {} },
               "`initial` must be a function returning the initial state")
      local m = counter()
      m.handle[1] = print
      contains(loading(m), "handle[1] must be a function keyed by a name, not number")
      m = counter()
      m.snapshot_every = 0
      contains(loading(m), "`snapshot_every` must be a positive integer")
      m = counter()
      m.schemas.Added = 1.5
      contains(loading(m), "schemas[Added] must be a positive integer")
      m = counter()
      m.upcast.Added[0] = print
      contains(loading(m), "upcast[Added] must map schema numbers to functions")
      contains(failure(function() t.scenario(counter()):when("Add"):given("Added", {}) end),
               ":given after :when")
      local sc = t.scenario(counter())
      sc:expect_state {}
      contains(failure(function() sc:given("Added", {}) end), "the scenario already ran")
      contains(failure(function() t.scenario(counter()):expect_events {} end), ":expect_events needs a :when")
      contains(failure(function() t.scenario(counter()):when("Add", "x") end),
               "command data must be a table, got string")
      contains(failure(function() t.scenario(counter()):when("Add"):expect_events { "Added" } end),
               "expected event 1 must be a table with a string type")
    end)
  end)

  describe("render and diff", function()
    it("render values as sorted Lua source", function()
      assert.are.equal('{ 1, 2.5, "x", a = true, b = { c = ebb.array() } }',
                       t.render({ 1, 2.5, "x", b = { c = ebb.array() }, a = true }))
    end)

    it("diff returns nil for equal values and the first difference otherwise", function()
      assert.is_nil(t.diff({ a = { 1, 2 } }, { a = { 1, 2 } }))
      assert.are.equal("at .a[2]: expected 2 (integer), got 3 (integer)",
                       t.diff({ a = { 1, 2 } }, { a = { 1, 3 } }))
    end)
  end)
end)
