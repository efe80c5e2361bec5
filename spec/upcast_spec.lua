-- Upcasting: stored events of an older schema read at the current schema on
-- every read path (fold, ebb read/events/export, ebb.core), never changed in
-- the store; and every way an upcaster chain can fail, named precisely.
local core = require "ebb.core"
local support = require "support"

local decode = core.json_decode
local FIXTURE = support.root .. "/spec/fixtures/orders_schema1.ndjson"

describe("upcasting the example's OrderCreated from schema 1", function()
  local dir

  local function ebb(args, opts) return support.cli(dir)(args, opts) end

  before_each(function()
    dir = support.tmpdir()
    local out, err, code = ebb({ "import", FIXTURE })
    assert.equal(0, code, err)
    assert.same({ imported = 4, skipped = 0 }, decode(out))
  end)
  after_each(function() support.rmdir(dir) end)

  it("reads old events in the new shape, and as stored with --raw", function()
    local created = support.lines(ebb { "read", "Order-old-1" }, decode)[1]
    assert.equal(2, created.schema)
    assert.same({ customer_id = "c-7", currency = "EUR" }, created.data)
    local raw = support.lines(ebb { "read", "Order-old-1", "--raw" }, decode)[1]
    assert.equal(1, raw.schema)
    assert.same({ customer_id = "c-7" }, raw.data)
  end)

  it("upcasts ebb events and ebb export, and exports the stored form with --raw", function()
    for _, cmd in ipairs { { "events" }, { "events", "--type", "OrderCreated" }, { "export" } } do
      local list = support.lines(ebb(cmd), decode)
      for _, e in ipairs(list) do
        if e.type == "OrderCreated" then
          assert.equal(2, e.schema)
          assert.equal("EUR", e.data.currency)
        end
      end
    end
    assert.equal(support.read(FIXTURE), (ebb { "export", "--raw" }))
  end)

  it("folds old events through the upcaster, and new commands write the new schema", function()
    local s = decode((ebb { "state", "Order", "old-2" }))
    assert.equal("EUR", s.state.currency)
    assert.equal("c-8", s.state.customer_id)
    local out, err, code = ebb { "send", "Order", "old-2", "AddItem", '{"sku":"CUP","qty":1,"price":900}' }
    assert.equal(0, code, err)
    assert.equal(2, decode(out).version)
    out = ebb { "send", "Order", "new-1", "CreateOrder", '{"customer_id":"c-9","currency":"USD"}' }
    assert.equal(2, decode(out).events[1].schema)
    local confirmed = decode((ebb { "state", "Order", "old-1" }))
    assert.same({ "confirmed", 1350, "EUR" },
      { confirmed.state.status, confirmed.state.total, confirmed.state.currency })
  end)

  it("upcasts through ebb.core, and leaves the store as it was", function()
    local rt = assert(core.open { data = dir, aggregates = support.root .. "/aggregates" })
    assert.equal("EUR", rt:read("Order-old-1")[1].data.currency)
    assert.equal("EUR", rt:events { category = "Order" }[1].data.currency)
    assert.is_nil(rt:read("Order-old-1", { raw = true })[1].data.currency)
    assert.equal(1, rt:events { raw = true }[1].schema)
    rt:close()
  end)
end)

describe("upcaster chains", function()
  local dir, aggs, rt

  local DOC = [[
local doc = { type = "Doc", schemas = { Written = 4, Renamed = 2, Gapped = 3, Failing = 2, Bad = 2,
                                        Listy = 2 } }
function doc.initial() return { fields = {} } end
doc.apply = {
  Written = function(s, e) s.fields = e.data; return s end,
  Renamed = function(s, e) s.renamed = e.data; return s end,
}
doc.handle = { Write = function() return { { type = "Written", data = { a = 1, b = 2, c = 3 } } } end }
doc.upcast = {
  Written = {
    [1] = function(d) d.b = d.b or 2; return d end,
    [2] = function(d) d.c = (d.b or 0) + 1; return d end,
    [3] = function(d) d.trail = (d.trail or "") .. "3"; return d end,
  },
  OldName = { [1] = function(d) d.moved = true; return d, "Renamed" end },
  Gapped = { [1] = function(d) return d end },
  Failing = { [1] = function(d) return d.missing.field end },
  Bad = { [1] = function() return "not a table" end },
  Listy = { [1] = function() return { 1, 2, 3 } end },
}
return doc
]]

  before_each(function()
    dir = support.tmpdir()
    aggs = support.tmpdir()
    support.write(aggs .. "/doc.lua", DOC)
    rt = assert(core.open { data = dir, aggregates = aggs, durability = "normal" })
  end)
  after_each(function()
    rt:close()
    support.rmdir(dir)
    support.rmdir(aggs)
  end)

  local function stored(stream, type_, schema, data)
    return assert(rt:append(stream, "any", { { type = type_, schema = schema, data = data } }))
  end

  it("runs every step from schema 1 to 4, and none for current events", function()
    stored("Doc-1", "Written", 1, { a = 1 })
    stored("Doc-1", "Written", 3, { a = 9, b = 9, c = 9 })
    stored("Doc-1", "Written", 4, { a = 0 })
    local list = rt:read("Doc-1")
    assert.same({ a = 1, b = 2, c = 3, trail = "3" }, list[1].data)
    assert.same({ a = 9, b = 9, c = 9, trail = "3" }, list[2].data)
    assert.same({ a = 0 }, list[3].data)
    for _, e in ipairs(list) do assert.equal(4, e.schema) end
  end)

  it("folds upcast events into the state", function()
    stored("Doc-1", "Written", 2, { a = 5, b = 6 })
    local s = assert(rt:state("Doc", "1"))
    assert.same({ a = 5, b = 6, c = 7, trail = "3" }, s.state.fields)
  end)

  it("lets an upcaster rename the event type, continuing with the new type's chain", function()
    stored("Doc-1", "OldName", 1, { x = 1 })
    local e = rt:read("Doc-1")[1]
    assert.equal("Renamed", e.type)
    assert.equal(2, e.schema)
    assert.same({ x = 1, moved = true }, e.data)
    assert.same({ x = 1, moved = true }, rt:state("Doc", "1").state.renamed)
  end)

  local failures = {
    { "a missing step", "Gapped", 1,
      "position 1 %(Gapped, schema 2%) cannot be read: no upcaster upcast.Gapped%[2%]" },
    { "a failing upcaster", "Failing", 1,
      "upcaster upcast.Failing%[1%] failed on the event at position 1: .*doc%.lua:%d+:" },
    { "an upcaster returning no table", "Bad", 1,
      "upcaster upcast.Bad%[1%] returned string for the event at position 1" },
    { "an upcaster returning a list", "Listy", 1,
      "upcaster upcast.Listy%[1%] returned a list for the event at position 1" },
    { "an event newer than the code", "Written", 7, "position 1 %(Written, schema 7%) is newer than the code" },
  }
  -- Stores an event as a newer ebb (whose Doc declares Written at schema 7) would.
  local function stored_by_newer_code(stream, type_, schema, data)
    rt:close()
    local newer = support.tmpdir()
    support.write(newer .. "/doc.lua", (DOC:gsub("Written = 4", "Written = 7")))
    local nrt = assert(core.open { data = dir, aggregates = newer, durability = "normal" })
    assert(nrt:append(stream, "any", { { type = type_, schema = schema, data = data } }))
    nrt:close()
    support.rmdir(newer)
    rt = assert(core.open { data = dir, aggregates = aggs, durability = "normal" })
  end

  for _, f in ipairs(failures) do
    it("refuses " .. f[1] .. " on every fold, and exports it as stored, naming why", function()
      if f[3] > 4 then stored_by_newer_code("Doc-1", f[2], f[3], { a = 1 })
      else stored("Doc-1", f[2], f[3], { a = 1 }) end
      for _, read in ipairs {
        function() return rt:read("Doc-1") end,
        function() return rt:events() end,
        function() return rt:state("Doc", "1") end,
        function() return rt:send { aggregate = "Doc", id = "1", type = "Write" } end,
      } do
        local r, msg, code = read()
        assert.is_nil(r)
        assert.equal("script_error", code)
        assert.matches(f[4], msg)
      end
      assert.equal(1, rt:head())
      local raw = rt:read("Doc-1", { raw = true })[1]
      assert.same({ f[2], f[3] }, { raw.type, raw.schema })
      -- A backup never fails for one event: it goes out as stored, saying why.
      local out, err, code = support.run { "--data", dir, "--aggregates", aggs, "export" }
      assert.equal(0, code, err)
      local line = decode(out)
      assert.same({ f[2], f[3], 1 }, { line.type, line.schema, line.data.a })
      assert.matches(f[4], line.upcast_error)
      assert.matches("position 1 is written as stored", err)
      local plain = support.run { "--data", dir, "--aggregates", aggs, "export", "--raw" }
      assert.is_nil(decode(plain).upcast_error)
    end)
  end

  it("refuses to store an event of a schema newer than the code, on every append path", function()
    local r, msg, code = rt:append("Doc-1", "any", { { type = "Written", schema = 5, data = {} } })
    assert.is_nil(r)
    assert.equal("bad_request", code)
    assert.matches("event type Written has schema 5, newer than the code knows: the aggregate " ..
                   "modules' schemas declare Written at schema 4", msg)
    assert(rt:append("Doc-1", "any", { { type = "Written", schema = 4, data = {} } }))
    assert(rt:append("Doc-1", "any", { { type = "Undeclared", schema = 9, data = {} } }))
    rt:close()
    local lines = support.tmpdir() .. "/in.ndjson"
    support.write(lines, table.concat({
      '{"stream":"Doc-2","version":1,"id":"i-1","type":"Written","schema":4,"data":{},' ..
        '"metadata":{},"recorded_at":"2024-01-01T00:00:00Z"}',
      '{"stream":"Doc-2","version":2,"id":"i-2","type":"Written","schema":6,"data":{},' ..
        '"metadata":{},"recorded_at":"2024-01-01T00:00:00Z"}', "" }, "\n"))
    local out, err, ecode = support.run { "--data", dir, "--aggregates", aggs, "import", lines }
    assert.matches('"imported":1', out)
    assert.not_equal(0, ecode)
    assert.matches("line 2: event type Written has schema 6, newer than the code knows", err)
    rt = assert(core.open { data = dir, aggregates = aggs, durability = "normal" })
    assert.equal(1, #rt:read("Doc-2", { raw = true })) -- the line before it is imported
    assert.equal(3, rt:head())
  end)

  it("refuses two modules declaring the same event type", function()
    support.write(aggs .. "/other.lua", [[return { type = "Other", initial = function() return {} end,
      apply = {}, handle = {}, schemas = { Written = 1 } }]])
    rt:close()
    rt = assert(core.open { data = dir, aggregates = aggs })
    local problems = rt:check()
    assert.equal(1, #problems)
    assert.matches("other%.lua: event type Written is already declared by the Doc aggregate", problems[1])
  end)
end)
