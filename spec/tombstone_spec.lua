-- Soft delete: a tombstone event closes a stream; commands and appends are
-- refused with stream_deleted, reads still show every event, state says so.
local core = require "ebb.core"
local support = require "support"

local decode = core.json_decode

describe("deleting a stream", function()
  local dir, rt

  before_each(function()
    dir = support.tmpdir()
    rt = assert(core.open { data = dir, aggregates = support.root .. "/aggregates", durability = "normal" })
    assert(rt:send { aggregate = "Order", id = "o-1", type = "CreateOrder", data = { customer_id = "c" } })
    assert(rt:send { aggregate = "Order", id = "o-1", type = "AddItem", data = { sku = "A", qty = 1, price = 5 } })
  end)
  after_each(function()
    rt:close()
    support.rmdir(dir)
  end)

  it("records a tombstone and keeps every event readable", function()
    local r = assert(rt:delete("Order-o-1", { reason = "GDPR request 42" }))
    assert.same({ 3, 3 }, { r.version, r.position })
    local list = rt:read("Order-o-1")
    assert.equal(3, #list)
    assert.same({ "OrderCreated", "ItemAdded", "$deleted" }, { list[1].type, list[2].type, list[3].type })
    assert.same({ reason = "GDPR request 42" }, list[3].data)
    local version, deleted = rt:version("Order-o-1")
    assert.same({ 3, true }, { version, deleted })
    local s = assert(rt:state("Order", "o-1"))
    assert.is_true(s.deleted)
    assert.equal(5, s.state.total)
    assert.is_false(assert(rt:state("Order", "o-1", { version = 2 })).deleted)
  end)

  it("refuses commands and appends afterwards, even from a cached state", function()
    assert(rt:state("Order", "o-1")) -- cached
    local other = assert(core.open { data = dir, aggregates = support.root .. "/aggregates" })
    assert(other:delete("Order-o-1"))
    other:close()
    local r, msg, code = rt:send { aggregate = "Order", id = "o-1", type = "ConfirmOrder" }
    assert.is_nil(r)
    assert.equal("stream_deleted", code)
    assert.matches("Order%-o%-1 was deleted at version 3", msg)
    r, msg, code = rt:append("Order-o-1", "any", { { type = "X", data = {} } })
    assert.is_nil(r)
    assert.equal("stream_deleted", code)
    assert.matches("was deleted", msg)
    r, msg, code = rt:delete("Order-o-1")
    assert.is_nil(r)
    assert.equal("stream_deleted", code)
    assert.matches("was deleted", msg)
    assert.equal(3, rt:head())
    assert.is_true(rt:state("Order", "o-1").deleted)
  end)

  it("checks the expected version, and refuses a missing stream", function()
    local r, _, code, info = rt:delete("Order-o-1", { expected_version = 1 })
    assert.is_nil(r)
    assert.equal("wrong_expected_version", code)
    assert.same({ 1, 2 }, { info.expected, info.actual })
    r, _, code = rt:delete("Order-nope")
    assert.is_nil(r)
    assert.equal("not_found", code)
    assert(rt:delete("Order-o-1", { expected_version = 2 }))
  end)

  it("keeps the reserved type for ebb", function()
    local r, msg, code = rt:append("A-1", "any", { { type = "$deleted", data = {} } })
    assert.is_nil(r)
    assert.equal("bad_request", code)
    assert.matches("reserved", msg)
  end)

  it("works from the CLI with exit code 9 afterwards", function()
    rt:close()
    local base = { "--data", dir, "--aggregates", support.root .. "/aggregates" }
    local function ebb(...)
      local args = { table.unpack(base) }
      for _, a in ipairs { ... } do args[#args + 1] = a end
      return support.run(args)
    end
    local out, err, code = ebb("delete", "Order-o-1", "--reason", "closed")
    assert.equal(0, code, err)
    assert.same({ stream = "Order-o-1", deleted = true, version = 3, position = 3 }, decode(out))
    out, err, code = ebb("send", "Order", "o-1", "ConfirmOrder")
    assert.equal(9, code)
    assert.equal("", out)
    assert.matches("stream_deleted: Order%-o%-1 was deleted", err)
    assert.is_true(decode((ebb("state", "Order", "o-1"))).deleted)
    assert.equal(3, #support.lines((ebb("read", "Order-o-1")), decode))
    out, err, code = ebb("delete", "Order-zzz")
    assert.equal(3, code)
    assert.equal("", out)
    assert.matches("not_found: stream Order%-zzz does not exist", err)
    rt = assert(core.open { data = dir, aggregates = support.root .. "/aggregates" })
  end)
end)
