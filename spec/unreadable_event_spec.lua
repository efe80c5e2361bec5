-- An event this code cannot upcast (stored by a newer ebb, say) never takes
-- down readers that do not need it: appends of a schema newer than the code
-- are refused; GET /events, /subscribe and export deliver such an event as
-- stored with an upcast_error; projections whose `from` excludes it stay
-- live; one that reads it faults at exactly that event, and `skip` drops it.
local support = require "support"
local daemon = require "daemon_support"
local json = require "cjson"

local function int(x) return ("%d"):format(x) end

local eventually = support.eventually

local function status(d, name)
  local st, body = d:get("/projections/" .. name)
  return st == 200 and body or nil
end

local PROJECTIONS = support.root .. "/projections"

describe("an event the code cannot upcast", function()
  local data, d

  before_each(function() data = support.tmpdir() end)
  after_each(function()
    if d then d:stop() end
    d = nil
    support.rmdir(data)
  end)

  it("is refused on the way in: a raw append of a newer schema is a 400 naming type and schemas", function()
    d = daemon.start({ data = data })
    local st, answer = d:post("/streams/Order-p", { events = { {
      type = "OrderCreated", schema = 3, data = { customer_id = "c", currency = "EUR" } } } })
    assert.are.equal(400, st)
    assert.are.equal("bad_request", answer.error.code)
    assert.matches("event 1: event type OrderCreated has schema 3, newer than the code knows: the " ..
                   "aggregate modules' schemas declare OrderCreated at schema 2", answer.error.message)
    assert.are.equal(404, (d:get("/streams/Order-p")))
    st = d:post("/streams/Order-p", { events = { {
      type = "OrderCreated", schema = 2, data = { customer_id = "c", currency = "EUR" } } } })
    assert.is_true(st == 200 or st == 201)
  end)

  it("stored by newer code: readers deliver it as stored, projections skip it exactly", function()
    -- Old events, then one written by a newer ebb (OrderCreated at schema 3), then more.
    d = daemon.start({ data = data })
    assert.are.equal(200, (d:command("order", "a", "CreateOrder", { customer_id = "c-1" })))
    assert.are.equal(200, (d:command("bank_account", "1", "OpenAccount", { owner = "ann" })))
    d:stop()
    local newer = support.aggregates_copy()
    local order = support.read(newer .. "/order.lua")
    support.write(newer .. "/order.lua", (order:gsub("OrderCreated = 2", "OrderCreated = 3")))
    local lines = data .. "/newer.ndjson"
    support.write(lines, '{"stream":"Order-p","version":1,"id":"poison-1","type":"OrderCreated",' ..
      '"schema":3,"data":{"customer":{"id":"c-9"}},"metadata":{},"recorded_at":"2026-01-01T00:00:00Z"}\n')
    local out, err, code = support.cli(data, newer)("import", lines)
    assert(code == 0, err)
    assert.matches('"imported":1', out)
    support.rmdir(newer)

    d = daemon.start({ data = data, args = { "--projections", PROJECTIONS } })
    assert.are.equal(200, (d:command("order", "b", "CreateOrder", { customer_id = "c-2" })))
    local st, last = d:command("bank_account", "1", "Deposit", { amount = 5 })
    assert.are.equal(200, st)
    local head = last.position

    -- GET /events: the whole page, the poison event as stored with its reason.
    local status_code, page = d:get("/events")
    assert.are.equal(200, status_code)
    assert.are.equal(5, #page.events)
    local poison = page.events[3]
    assert.are.same({ "poison-1", "OrderCreated", 3, "c-9" },
      { poison.id, poison.type, poison.schema, poison.data.customer.id })
    assert.matches("position 3 %(OrderCreated, schema 3%) is newer than the code", poison.upcast_error)
    assert.is_nil(page.events[1].upcast_error)
    assert.are.equal(2, page.events[4].schema)

    -- /subscribe: every event, no `event: error`.
    local sub = d:subscribe("?after=0")
    local got = {}
    for _ = 1, 5 do
      local ev = assert(sub:next(10))
      assert.is_nil(ev.event)
      got[#got + 1] = ev.json
    end
    sub:close()
    assert.are.equal("poison-1", got[3].id)
    assert.matches("newer than the code", got[3].upcast_error)
    assert.are.equal(head, got[5].position)

    -- A projection that does not read Order goes on; order_summary faults at the poison event.
    eventually(function()
      local s = status(d, "account_balances")
      return s and s.state == "live" and s.position >= head
    end, 15, "account_balances to be live")
    local s = eventually(function()
      local x = status(d, "order_summary")
      return x and x.state == "faulted" and x
    end, 15, "order_summary to fault")
    assert.are.equal(3, s.last_error.position)
    assert.matches("event 3 %(OrderCreated in Order%-p%)", s.last_error.message)
    -- The order before it was projected; the one after it not yet.
    assert.are.equal(200, (d:get("/projections/order_summary/get?id=a")))
    -- skip drops exactly the poison event: the order after it is projected.
    assert.are.equal(200, (d:post("/projections/order_summary/skip", {})))
    s = eventually(function()
      local x = status(d, "order_summary")
      return x and x.state == "live" and x.position >= head and x
    end, 15, "order_summary to be live again")
    assert.are.same({ 3 }, s.skipped)
    local _, b = d:get("/projections/order_summary/get?id=b&after=" .. int(head))
    assert.are.equal("c-2", b.customer_id)
    d:stop()
    d = nil

    -- export: exits 0 with every event; the poison one as stored, with its reason.
    local text, eerr, ecode = support.cli(data)("export")
    assert.are.equal(0, ecode, eerr)
    local exported = support.lines(text, json.decode)
    assert.are.equal(5, #exported)
    assert.are.equal(3, exported[3].schema)
    assert.matches("newer than the code", exported[3].upcast_error)
    assert.matches("position 3 is written as stored", eerr)
  end)
end)
