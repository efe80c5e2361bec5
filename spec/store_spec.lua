-- The event store through ebb.core: expected versions, atomicity,
-- idempotency, global order, filters, reads, names, payloads, int64.
local core = require "ebb.core"
local support = require "support"

local function ev(type_, data, id)
  return { type = type_, data = data or {}, id = id }
end

describe("event store", function()
  local dir, rt

  before_each(function()
    dir = support.tmpdir()
    rt = assert(core.open { data = dir, aggregates = support.root .. "/aggregates", durability = "normal" })
  end)

  after_each(function()
    rt:close()
    support.rmdir(dir)
  end)

  describe("expected version", function()
    -- expected form -> outcome on a missing stream, and on a stream at version 2
    local matrix = {
      { "any", true, true },
      { "no_stream", true, false },
      { "exists", false, true },
      { 0, true, false },
      { 2, false, true },
      { 1, false, false },
      { 5, false, false },
    }
    for _, case in ipairs(matrix) do
      local expected, on_missing, on_existing = case[1], case[2], case[3]

      it("treats " .. tostring(expected) .. " correctly on a missing stream", function()
        local r, msg, code, info = rt:append("Acc-missing", expected, { ev("Opened") })
        if on_missing then
          assert.is_table(r, msg)
          assert.equal(1, r.version)
        else
          assert.is_nil(r)
          assert.equal("wrong_expected_version", code)
          assert.equal(0, info.actual)
          assert.equal(expected, info.expected)
          assert.matches("expected", msg)
          assert.equal(0, rt:version("Acc-missing"))
        end
      end)

      it("treats " .. tostring(expected) .. " correctly on a stream at version 2", function()
        assert(rt:append("Acc-1", "no_stream", { ev("Opened"), ev("Deposited") }))
        local r, _, code, info = rt:append("Acc-1", expected, { ev("Deposited") })
        if on_existing then
          assert.is_table(r)
          assert.equal(3, r.version)
        else
          assert.is_nil(r)
          assert.equal("wrong_expected_version", code)
          assert.equal(2, info.actual)
          assert.equal(expected, info.expected)
          assert.equal(2, rt:version("Acc-1"))
        end
      end)
    end
  end)

  it("numbers versions from 1 per stream and positions globally without gaps", function()
    assert(rt:append("A-1", "any", { ev("X"), ev("Y") }))
    assert(rt:append("B-1", "any", { ev("X") }))
    assert(rt:append("A-1", 2, { ev("Z") }))
    local all = rt:events { after = 0, limit = 100 }
    assert.equal(4, #all)
    for i, e in ipairs(all) do assert.equal(i, e.position) end
    assert.same({ "A-1", "A-1", "B-1", "A-1" }, { all[1].stream, all[2].stream, all[3].stream, all[4].stream })
    assert.same({ 1, 2, 1, 3 }, { all[1].version, all[2].version, all[3].version, all[4].version })
    assert.equal(4, rt:head())
  end)

  it("appends several events all or nothing", function()
    assert(rt:append("A-1", "any", { ev("X", {}, "id-taken") }))
    local r, _, code = rt:append("A-2", "any",
      { ev("X", {}, "fresh-1"), ev("Y", {}, "fresh-2"), ev("Z", {}, "id-taken") })
    assert.is_nil(r)
    assert.equal("conflict", code)
    assert.equal(0, rt:version("A-2"))
    assert.equal(1, rt:head())
    -- the ids of the refused append are still free
    assert(rt:append("A-2", "no_stream", { ev("X", {}, "fresh-1") }))
  end)

  it("refuses a whole append when one event is invalid", function()
    local r, msg, code = rt:append("A-1", "any", { ev("X"), { type = "", data = {} } })
    assert.is_nil(r)
    assert.equal("bad_request", code)
    assert.matches("event type", msg)
    assert.equal(0, rt:head())
  end)

  describe("idempotent append", function()
    it("returns the original result for the same events at the same place", function()
      local events = { ev("X", { n = 1 }, "e-1"), ev("Y", { n = 2 }, "e-2") }
      local first = assert(rt:append("A-1", "no_stream", events))
      assert.is_false(first.idempotent)
      for _, expected in ipairs { "no_stream", 0, "any" } do
        local again = assert(rt:append("A-1", expected, events))
        assert.is_true(again.idempotent)
        assert.equal(first.position, again.position)
        assert.equal(first.first_position, again.first_position)
        assert.equal(2, again.version)
      end
      assert.equal(2, rt:head())
    end)

    it("treats a partial overlap as a conflict", function()
      assert(rt:append("A-1", "no_stream", { ev("X", {}, "e-1"), ev("Y", {}, "e-2") }))
      local r, msg, code = rt:append("A-1", 2, { ev("Y", {}, "e-2"), ev("Z", {}, "e-3") })
      assert.is_nil(r)
      assert.equal("conflict", code)
      assert.matches("e%-2", msg)
      assert.equal(2, rt:head())
    end)

    it("treats the same ids in another stream as a conflict", function()
      assert(rt:append("A-1", "any", { ev("X", {}, "e-1") }))
      local r, _, code = rt:append("A-2", "any", { ev("X", {}, "e-1") })
      assert.is_nil(r)
      assert.equal("conflict", code)
    end)

    it("treats the same ids at other versions as a conflict", function()
      assert(rt:append("A-1", "any", { ev("X", {}, "e-1"), ev("Y", {}, "e-2") }))
      local r, _, code = rt:append("A-1", "any", { ev("Y", {}, "e-2"), ev("X", {}, "e-1") })
      assert.is_nil(r)
      assert.equal("conflict", code)
    end)

    it("answers a re-send of events stored before a tombstone, and refuses anything new", function()
      local events = { ev("X", { n = 1 }, "d-1"), ev("Y", { n = 2 }, "d-2") }
      local first = assert(rt:append("Del-1", "no_stream", events))
      assert(rt:delete("Del-1"))
      for _, expected in ipairs { "no_stream", 0, "any" } do
        local again = assert(rt:append("Del-1", expected, events))
        assert.is_true(again.idempotent)
        assert.same({ first.first_position, first.position, 2 },
          { again.first_position, again.position, again.version })
      end
      local tail = assert(rt:append("Del-1", 1, { events[2] }))
      assert.is_true(tail.idempotent)
      assert.equal(first.position, tail.position)
      local cases = {
        { "any", { ev("Z", {}, "d-3") } },
        { "no_stream", { ev("X", { n = 1 }, "d-1"), ev("Z", {}, "d-3") } },
        { 2, { ev("X", { n = 1 }, "d-1") } },
        { "any", { ev("Y", { n = 2 }, "d-2"), ev("X", { n = 1 }, "d-1") } },
      }
      for _, case in ipairs(cases) do
        local r, msg, code = rt:append("Del-1", case[1], case[2])
        assert.is_nil(r)
        assert.equal("stream_deleted", code)
        assert.equal("stream Del-1 was deleted at version 3; its events stay readable", msg)
      end
      assert.equal(3, rt:head())
    end)

    it("imports an export holding a deleted stream twice", function()
      assert(rt:append("Del-2", "no_stream", { ev("X", { n = 1 }) }))
      assert(rt:delete("Del-2", { reason = "gone" }))
      assert(rt:append("Kept-1", "no_stream", { ev("X", { n = 2 }) }))
      local exported = support.cli(dir)("export", "--raw")
      local other = support.tmpdir()
      local into = support.cli(other)
      local out, err, code = into({ "import" }, { stdin = exported })
      assert.equal(0, code, err)
      assert.same({ imported = 3, skipped = 0 }, core.json_decode(out))
      out, err, code = into({ "import" }, { stdin = exported })
      support.rmdir(other)
      assert.equal(0, code, err)
      assert.same({ imported = 0, skipped = 3 }, core.json_decode(out))
    end)

    it("refuses the same id twice in one append", function()
      local r, _, code = rt:append("A-1", "any", { ev("X", {}, "dup"), ev("Y", {}, "dup") })
      assert.is_nil(r)
      assert.equal("bad_request", code)
    end)
  end)

  describe("batches and handles", function()
    it("numbers positions after another handle's appends to the same store", function()
      local other = assert(core.open { data = dir, aggregates = support.root .. "/aggregates", durability = "normal" })
      local expected_position = 0
      for i = 1, 6 do
        local handle = i % 3 == 0 and rt or other
        local r = assert(handle:append("Two-" .. (i % 2), "any", { ev("X", { i = i }), ev("Y", { i = i }) }))
        expected_position = expected_position + 2
        assert.equal(expected_position, r.position)
        assert.equal(expected_position - 1, r.first_position)
      end
      other:close()
      local all = rt:events { after = 0, limit = 100 }
      assert.equal(12, #all)
      for i, e in ipairs(all) do assert.equal(i, e.position) end
      assert.equal(6, rt:version("Two-0"))
    end)

    it("imports re-sent and new events of several streams in one batch", function()
      local cli = support.cli(dir)
      assert(rt:append("Imp-1", "no_stream", { ev("X", { n = 1 }), ev("Y", { n = 2 }) }))
      assert(rt:append("Imp-2", "no_stream", { ev("X", { n = 3 }) }))
      local first = cli("export", "--raw")
      local other = support.tmpdir()
      local into = support.cli(other)
      local out, err, code = into({ "import" }, { stdin = first })
      assert.equal(0, code, err)
      assert.same({ imported = 3, skipped = 0 }, core.json_decode(out))
      assert(rt:append("Imp-1", 2, { ev("Z", { n = 4 }) }))
      assert(rt:append("Imp-3", "no_stream", { ev("X", { n = 5 }) }))
      out, err, code = into({ "import" }, { stdin = cli("export", "--raw") })
      assert.equal(0, code, err)
      assert.same({ imported = 2, skipped = 3 }, core.json_decode(out))
      local copy = assert(core.open { data = other, aggregates = support.root .. "/aggregates" })
      local here, there = rt:events { after = 0, limit = 100 }, copy:events { after = 0, limit = 100 }
      copy:close()
      support.rmdir(other)
      assert.equal(#here, #there)
      for i = 1, #here do
        assert.same({ here[i].stream, here[i].version, here[i].id, here[i].position },
          { there[i].stream, there[i].version, there[i].id, there[i].position })
      end
    end)
  end)

  describe("reads", function()
    before_each(function()
      local events = {}
      for i = 1, 10 do events[i] = ev("E" .. (i % 2), { i = i }) end
      assert(rt:append("Order-1", "no_stream", events))
      assert(rt:append("Account-1", "no_stream", { ev("E1", { i = 100 }) }))
      assert(rt:append("Order-2", "no_stream", { ev("E0", { i = 200 }) }))
    end)

    it("reads a stream forward from a version with a limit", function()
      local list = rt:read("Order-1", { from = 4, limit = 3 })
      assert.same({ 4, 5, 6 }, { list[1].version, list[2].version, list[3].version })
      assert.equal(4, list[1].data.i)
      assert.equal(10, #rt:read("Order-1"))
    end)

    it("reads a stream backward from a version or from the end", function()
      local list = rt:read("Order-1", { backward = true, limit = 3 })
      assert.same({ 10, 9, 8 }, { list[1].version, list[2].version, list[3].version })
      list = rt:read("Order-1", { backward = true, from = 2, limit = 5 })
      assert.same({ 2, 1 }, { list[1].version, list[2].version })
    end)

    -- What the daemon reads, on PostgreSQL in one round trip, for the commands
    -- on streams it has not cached that arrive together.
    it("prefetches several streams' first events and command ids at once", function()
      assert(rt:send { aggregate = "BankAccount", id = "pf", type = "OpenAccount",
        data = { owner = "o" }, command_id = "cmd-pf" })
      local got = assert(rt:prefetch({
        { stream = "Order-1", command_id = "cmd-none" },
        { stream = "Order-404" },
        { stream = "bad name\1" },
        { stream = "BankAccount-pf", command_id = "cmd-pf" },
        { stream = "Order-2", command_id = "cmd-pf" },
        { stream = "Order-1" },
      }, 4))
      assert.equal(6, #got)
      local function versions(r)
        local v = {}
        for i, e in ipairs(r.events) do v[i] = e.version end
        return v
      end
      -- The first events of each stream, in order, at most the limit.
      assert.same({ 1, 2, 3, 4 }, versions(got[1]))
      assert.equal(1, got[1].events[1].data.i)
      assert.is_false(got[1].command_known)
      assert.same({}, versions(got[2]))
      assert.is_false(got[2].command_known)
      -- A bad name fails its item alone.
      assert.equal("bad_request", got[3].error.code)
      assert.matches("stream name", got[3].error.message)
      assert.is_nil(got[3].events)
      assert.same({ 1 }, versions(got[4]))
      assert.equal("AccountOpened", got[4].events[1].type)
      assert.is_true(got[4].command_known)
      -- A command id is looked up whatever stream it comes with.
      assert.same({ 1 }, versions(got[5]))
      assert.equal(200, got[5].events[1].data.i)
      assert.is_true(got[5].command_known)
      -- The same stream twice: each item has all of it.
      assert.same({ 1, 2, 3, 4 }, versions(got[6]))
      assert.same({}, assert(rt:prefetch({})))
      local r, _, code = rt:prefetch({ { stream = "Order-1" } }, 0)
      assert.is_nil(r)
      assert.equal("bad_request", code)
    end)

    it("reads nothing from a missing stream, and its version is 0", function()
      assert.same({}, rt:read("Order-404"))
      assert.equal(0, rt:version("Order-404"))
      assert.equal(10, rt:version("Order-1"))
    end)

    it("reads all events after a position with a limit", function()
      local list = rt:events { after = 5, limit = 4 }
      assert.same({ 6, 7, 8, 9 }, { list[1].position, list[2].position, list[3].position, list[4].position })
      assert.equal(0, #rt:events { after = 12 })
    end)

    it("filters by category, by type, and by both", function()
      local orders = rt:events { category = "Order" }
      assert.equal(11, #orders)
      for _, e in ipairs(orders) do assert.matches("^Order%-", e.stream) end
      local e1 = rt:events { type = "E1" }
      assert.equal(6, #e1)
      for _, e in ipairs(e1) do assert.equal("E1", e.type) end
      local both = rt:events { category = "Order", type = "E1" }
      assert.equal(5, #both)
      local after = rt:events { category = "Order", after = 10 }
      assert.equal(1, #after)
      assert.equal(12, after[1].position)
    end)

    it("refuses limits below 1 and negative positions", function()
      local r, _, code = rt:read("Order-1", { limit = 0 })
      assert.is_nil(r)
      assert.equal("bad_request", code)
      r, _, code = rt:events { after = -1 }
      assert.is_nil(r)
      assert.equal("bad_request", code)
    end)
  end)

  it("stores metadata, schema and recorded_at with every event", function()
    assert(rt:append("A-1", "any", { {
      type = "X", data = {}, schema = 3,
      metadata = { correlation_id = "c-1", causation_id = "k-1", user_id = "u-1", command_id = "cmd-1", tenant = "t" },
    } }))
    local e = rt:read("A-1")[1]
    assert.same({ correlation_id = "c-1", causation_id = "k-1", user_id = "u-1", command_id = "cmd-1", tenant = "t" },
      e.metadata)
    assert.equal(3, e.schema)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", e.recorded_at)
    assert.matches("^%x+%-%x+%-7%x+%-%x+%-%x+$", e.id)
  end)

  it("keeps unicode stream names and data exact", function()
    local stream = "Kunde-Zoë-東京-🚀"
    local data = { name = "Ünïcödé ✓ 東京 🚀", quote = "\"\\\n\t" }
    assert(rt:append(stream, "no_stream", { ev("Named", data) }))
    local e = rt:read(stream)[1]
    assert.equal(stream, e.stream)
    assert.same(data, e.data)
    assert.equal(1, #rt:events { category = "Kunde" })
  end)

  it("refuses invalid stream names with a precise message", function()
    local cases = {
      { "", "must not be empty" },
      { "A-\1", "control character" },
      { "A-\255", "not valid UTF%-8" },
      { ("x"):rep(513), "limit is 512" },
    }
    for _, c in ipairs(cases) do
      local r, msg, code = rt:append(c[1], "any", { ev("X") })
      assert.is_nil(r)
      assert.equal("bad_request", code)
      assert.matches(c[2], msg)
    end
    assert.equal(0, rt:head())
  end)

  it("refuses names with NUL bytes and list-shaped data with a clear message", function()
    assert.has_error(function() rt:append("A-\0x", "any", { ev("X") }) end)
    assert.has_error(function() rt:append("A-1", "any", { { type = "X\0Y", data = {} } }) end)
    local ok, msg = pcall(rt.append, rt, "A-1", "any", { { type = "X", data = { 1, 2, 3 } } })
    assert.is_false(ok)
    assert.matches("event 1: data must be a table with string keys$", msg)
    assert.equal(0, rt:head())
  end)

  it("round-trips a 1 MiB payload", function()
    local big = ("0123456789abcdef"):rep(65536)
    assert(rt:append("Big-1", "any", { ev("Blob", { body = big }) }))
    assert.equal(big, rt:read("Big-1")[1].data.body)
  end)

  it("keeps int64 edge values exact and integer", function()
    local values = { 0, -1, 1, 9007199254740993, math.maxinteger, math.mininteger, 2 ^ 53 }
    assert(rt:append("Num-1", "any", { ev("N", { values = values, big = math.maxinteger }) }))
    local data = rt:read("Num-1")[1].data
    for i, v in ipairs(values) do
      assert.equal(v, data.values[i])
      assert.equal(math.type(v), math.type(data.values[i]))
    end
    assert.equal(math.maxinteger, data.big)
    assert.equal("integer", math.type(data.big))
  end)

  it("keeps empty arrays and empty objects apart", function()
    assert(rt:append("Empty-1", "any", { ev("E", { list = core.array(), map = {} }) }))
    local data = rt:read("Empty-1")[1].data
    assert.equal('{"list":[],"map":{}}', core.json_encode { list = data.list, map = data.map }
      :gsub('{"map":{},"list":%[%]}', '{"list":[],"map":{}}'))
  end)

  it("keeps events across close and reopen", function()
    assert(rt:append("A-1", "any", { ev("X", { n = 1 }) }))
    rt:close()
    rt = assert(core.open { data = dir, aggregates = support.root .. "/aggregates", durability = "full" })
    assert.equal(1, rt:version("A-1"))
    assert.equal(1, rt:read("A-1")[1].data.n)
  end)

  it("works the same with the exclusive store lock", function()
    rt:close()
    rt = assert(core.open { data = dir, aggregates = support.root .. "/aggregates", exclusive = true })
    assert(rt:append("A-1", "no_stream", { ev("X", { n = 1 }) }))
    assert(rt:send { aggregate = "BankAccount", id = "b-1", type = "OpenAccount", data = { owner = "A" } })
    assert.equal(1, rt:read("A-1")[1].data.n)
    assert.equal(2, rt:head())
    rt:close()
    -- the lock goes with the handle: another one can open the store afterwards
    rt = assert(core.open { data = dir, aggregates = support.root .. "/aggregates" })
    assert.equal(2, rt:head())
  end)

  it("refuses an unknown durability level", function()
    assert.has_error(function() core.open { data = dir, durability = "sometimes" } end,
      'durability must be "full" or "normal", not "sometimes"')
  end)
end)
