-- Old events through the daemon: the schema-1 fixture (OrderCreated without a
-- currency, as the old code wrote it) reads at schema 2 on every HTTP read
-- path; state as of a version or a time over HTTP; upcaster failures.
local support = require "support"
local daemon = require "daemon_support"
local core_decode = require("cjson").decode

local fixture = support.root .. "/spec/fixtures/orders_schema1.ndjson"

local function imported()
  local data = support.tmpdir()
  local cli = support.cli(data)
  local out, err, code = cli("import", fixture)
  assert(code == 0, err)
  assert(out:match('"imported":4'), out)
  return data
end

describe("the schema-1 fixture through the daemon", function()
  local d
  setup(function()
    d = daemon.start({ data = imported(), args = { "--projections", support.root .. "/projections" } })
  end)
  teardown(function() d:stop() end)

  it("1. GET /streams upcasts OrderCreated to schema 2 (with the default currency)", function()
    local status, answer = d:get("/streams/Order-old-1")
    assert.are.equal(200, status)
    local created = answer.events[1]
    assert.are.equal("OrderCreated", created.type)
    assert.are.equal(2, created.schema)
    assert.are.same({ customer_id = "c-7", currency = "EUR" }, created.data)
    assert.are.equal(1, answer.events[2].schema) -- ItemAdded never changed
  end)

  it("2. GET /events upcasts too, and keeps positions and ids as stored", function()
    local _, answer = d:get("/events?type=OrderCreated")
    assert.are.equal(2, #answer.events)
    for _, e in ipairs(answer.events) do
      assert.are.equal(2, e.schema)
      assert.are.equal("EUR", e.data.currency)
    end
    assert.are.equal("0190a000-0000-7000-8000-000000000001", answer.events[1].id)
  end)

  it("3. subscriptions deliver upcast events in catch-up", function()
    local sub = d:subscribe("?category=Order")
    local ev = assert(sub:next())
    assert.are.equal("1", ev.id)
    assert.are.equal(2, ev.json.schema)
    assert.are.equal("EUR", ev.json.data.currency)
    sub:close()
  end)

  it("4. the new code folds old events, and new commands build on them", function()
    local _, state = d:get("/aggregates/order/old-1")
    assert.are.equal("EUR", state.state.currency)
    assert.are.equal(3, state.version)
    assert.are.equal("confirmed", state.state.status)
    local status = d:command("order", "old-1", "ShipOrder", {}, { expected_version = 3 })
    assert.are.equal(200, status)
    local _, after = d:get("/aggregates/order/old-1")
    assert.are.equal(4, after.version)
  end)

  it("4b. order_summary reads the old events upcast: old orders are in euros", function()
    local st, order
    for _ = 1, 250 do
      st, order = d:get("/projections/order_summary/get?id=old-2&after=4")
      if st == 200 then break end
      daemon.sleep(0.02)
    end
    assert.are.equal(200, st)
    assert.are.same({ "old-2", "c-8", "EUR", "created" },
      { order.id, order.customer_id, order.currency, order.status })
    local _, old1 = d:get("/projections/order_summary/get?id=old-1")
    assert.are.same({ "EUR", 1350, 3 }, { old1.currency, old1.total, old1.item_count })
  end)

  it("5. state as of a version and as of a time, before the first and after the last event", function()
    local _, v1 = d:get("/aggregates/order/old-1?version=1")
    assert.are.equal(1, v1.version)
    assert.are.equal(0, v1.state.total)
    local _, v0 = d:get("/aggregates/order/old-1?version=0")
    assert.are.equal(0, v0.version)
    local _, before = d:get("/aggregates/order/old-1?at=2020-01-01T00:00:00Z")
    assert.are.equal(0, before.version)
    local _, mid = d:get("/aggregates/order/old-1?at=2024-06-01T09:00:30%2B00:00")
    assert.are.equal(1, mid.version)
    local _, later = d:get("/aggregates/order/old-1?at=2099-01-01T00:00:00Z")
    assert.are.equal(4, later.version)
    local status, bad = d:get("/aggregates/order/old-1?at=yesterday")
    assert.are.equal(400, status)
    assert.matches("RFC 3339", bad.error.message)
    status = d:get("/aggregates/order/old-1?version=-1")
    assert.are.equal(400, status)
  end)
end)

describe("an upcaster that fails, through the daemon", function()
  it("leaves the event as stored with its upcast_error on reads; folds are a 500 naming it", function()
    local aggs = support.aggregates_copy()
    support.write(aggs .. "/order_upcasters.lua",
      'return { OrderCreated = { [1] = function(d) return d.nothing.here end } }')
    local d = daemon.start({ data = imported(), aggregates = aggs })
    local status, answer = d:get("/streams/Order-old-1")
    assert.are.equal(200, status)
    local first = answer.events[1]
    assert.are.same({ "OrderCreated", 1, "c-7" }, { first.type, first.schema, first.data.customer_id })
    assert.matches("position 1", first.upcast_error)
    assert.is_nil(answer.events[2].upcast_error)
    status, answer = d:get("/events")
    assert.are.equal(200, status)
    assert.are.equal(4, #answer.events)
    assert.matches("OrderCreated", answer.events[1].upcast_error)
    status, answer = d:get("/aggregates/order/old-1")
    assert.are.equal(500, status)
    assert.are.equal("script_error", answer.error.code)
    assert.matches("position 1", answer.error.message)
    assert.matches("OrderCreated", answer.error.message)
    d:stop()
    support.rmdir(aggs)
  end)
end)

-- A store made before refusals were recorded (SQLite schema 3, PostgreSQL 2:
-- commands without the rejection column) is upgraded when a daemon opens it:
-- its command ids still answer, and refusals are recorded from then on.
describe("a store from before recorded refusals", function()
  local function shell(cmd)
    local p = assert(io.popen(cmd))
    local out = p:read("a")
    p:close()
    return out
  end

  it("is upgraded on open: old command ids answer as before, new refusals stick", function()
    local data = support.tmpdir()
    local cli = support.cli(data)
    local out, err, code = cli("send", "bank_account", "m-1", "OpenAccount", '{"owner":"M","initial_deposit":100}',
                               "--command-id", "old-open")
    assert(code == 0, err)
    local first = core_decode(out)
    -- back to the previous schema
    local store = support.store_for(data)
    if store then
      shell("env -u LD_PRELOAD psql -q -X -v ON_ERROR_STOP=1 " .. support.quote(store)
        .. " -c 'ALTER TABLE commands DROP COLUMN rejection; DELETE FROM ebb_schema WHERE version >= 3;'")
    else
      assert(os.execute("sqlite3 " .. support.quote(data .. "/events.db")
        .. " 'ALTER TABLE commands DROP COLUMN rejection; PRAGMA user_version = 3;'"))
    end
    local d = daemon.start({ data = data })
    assert(d.url, daemon.logs(d))
    local status, answer = d:command("bank_account", "m-1", "OpenAccount", { owner = "M", initial_deposit = 100 },
                                     { command_id = "old-open" })
    assert.are.equal(200, status)
    assert.are.same(first, answer)
    status, answer = d:command("bank_account", "m-1", "Withdraw", { amount = 500 }, { command_id = "w" })
    assert.are.equal(422, status)
    assert.are.same({ balance = 100, requested = 500 }, answer.error.details)
    assert.are.equal(200, (d:command("bank_account", "m-1", "Deposit", { amount = 500 })))
    status, answer = d:command("bank_account", "m-1", "Withdraw", { amount = 500 }, { command_id = "w" })
    assert.are.equal(422, status)
    assert.are.same({ code = "rejected", message = "insufficient funds",
                      details = { balance = 100, requested = 500 } }, answer.error)
    d:stop()
    if store then
      assert.are.equal("4\n", shell("env -u LD_PRELOAD psql -q -X -At " .. support.quote(store)
        .. " -c 'SELECT max(version) FROM ebb_schema'"))
    else
      assert.are.equal("4\n", shell("sqlite3 -readonly " .. support.quote(data .. "/events.db")
        .. " 'PRAGMA user_version'"))
    end
    support.rmdir(data)
  end)
end)
