-- State as of a version or a time: the stream's prefix folded, before the
-- first event and after the last included; through ebb.core and the CLI.
local core = require "ebb.core"
local support = require "support"

local decode = core.json_decode
local FIXTURE = support.root .. "/spec/fixtures/orders_schema1.ndjson"
-- Order-old-1: v1 OrderCreated 2024-06-01T09:00, v2 ItemAdded 09:01, v3 OrderConfirmed 2024-06-03T11:00

describe("state in time", function()
  local dir, rt

  before_each(function()
    dir = support.tmpdir()
    local _, err, code = support.run { "--data", dir, "import", FIXTURE }
    assert.equal(0, code, err)
    rt = assert(core.open { data = dir, aggregates = support.root .. "/aggregates" })
  end)
  after_each(function()
    rt:close()
    support.rmdir(dir)
  end)

  local function at(opts)
    return assert(rt:state("Order", "old-1", opts))
  end

  it("folds up to a version, from before the first event to past the last", function()
    local s0 = at { version = 0 }
    assert.same({ 0, 0, "none" }, { s0.version, s0.position, s0.state.status })
    assert.same({ 1, "created", 0 }, { at({ version = 1 }).version, at({ version = 1 }).state.status,
                                       at({ version = 1 }).state.total })
    local s2 = at { version = 2 }
    assert.same({ 2, 1350, "created" }, { s2.version, s2.state.total, s2.state.status })
    assert.same({ 3, "confirmed" }, { at({ version = 99 }).version, at({ version = 99 }).state.status })
  end)

  it("folds up to a time, inclusive, in any offset", function()
    assert.equal(0, at({ at = "2024-05-01T00:00:00Z" }).version)
    assert.equal(1, at({ at = "2024-06-01T09:00:30Z" }).version)
    assert.equal(1, at({ at = "2024-06-01T11:00:30+02:00" }).version)
    assert.equal(2, at({ at = "2024-06-01T09:01:00.000Z" }).version)
    assert.equal(2, at({ at = "2024-06-03T10:59:59.999Z" }).version)
    assert.equal(3, at({ at = "2030-01-01T00:00:00Z" }).version)
  end)

  it("leaves the current state and the cache alone", function()
    assert.equal(3, rt:state("Order", "old-1").version)
    assert.equal(1, at({ version = 1 }).version)
    assert.equal(3, rt:state("Order", "old-1").version)
    local r = assert(rt:send { aggregate = "Order", id = "old-1", type = "ShipOrder" })
    assert.equal(4, r.version)
    assert.equal("confirmed", at({ version = 3 }).state.status)
    assert.equal("shipped", rt:state("Order", "old-1").state.status)
  end)

  it("refuses a time that is not RFC 3339", function()
    local r, msg, code = rt:state("Order", "old-1", { at = "yesterday" })
    assert.is_nil(r)
    assert.equal("bad_request", code)
    assert.matches("not an RFC 3339 time", msg)
  end)

  it("works from the CLI, with its usage errors", function()
    local ebb = support.cli(dir)
    local function state(...) return ebb("state", "Order", "old-1", ...) end
    assert.equal(2, decode((state("--version", "2"))).version)
    assert.equal(0, decode((state("--version", "0"))).version)
    assert.equal(1, decode((state("--at", "2024-06-01T09:00:30Z"))).version)
    local _, err, code = state("--at", "soon")
    assert.equal(7, code)
    assert.matches("not an RFC 3339 time", err)
    _, err, code = state("--version", "1", "--at", "2024-06-01T09:00:30Z")
    assert.equal(2, code)
    assert.matches("not both", err)
  end)

  it("stores imported times in one canonical form", function()
    local other = support.tmpdir()
    local line = '{"stream":"A-1","version":1,"id":"t-1","type":"X","data":{},"metadata":{},' ..
      '"recorded_at":"2024-06-01T11:00:00+02:00"}'
    local _, err, code = support.run({ "--data", other, "import" }, { stdin = line .. "\n" })
    assert.equal(0, code, err)
    assert.equal("2024-06-01T09:00:00.000Z", decode((support.run { "--data", other, "read", "A-1" })).recorded_at)
    local _, err2, code2 = support.run({ "--data", other, "import" },
      { stdin = line:gsub("2024%-06%-01T11:00:00%+02:00", "June 1st"):gsub("t%-1", "t-2") .. "\n" })
    assert.equal(7, code2)
    assert.matches("not an RFC 3339 time", err2)
    support.rmdir(other)
  end)
end)
