-- Projections in the daemon: the example read models, queries and their
-- arguments, read-your-writes with after=, faults with retry and skip,
-- exactly-once across kill -9, and hot reload (code change, broken change,
-- version bump with a blue/green rebuild, removal).
local support = require "support"
local daemon = require "daemon_support"
local null = require("cjson").null

-- cjson reads every number as a float: positions go back into URLs as integers.
local function int(x) return ("%d"):format(x) end

local eventually = support.eventually

local function status(d, name)
  local st, body = d:get("/projections/" .. name)
  return st == 200 and body or nil
end

local function live(d, name, position)
  local last
  local ok, err = pcall(eventually, function()
    last = status(d, name)
    return last and last.state == "live" and last.position >= (position or 0) and last
  end, 15, name .. " to be live")
  if not ok then error(tostring(err) .. ": " .. require("cjson").encode(last or {}) .. "\n" .. d:logs(), 2) end
  return err
end

local function command(d, agg, id, type_, data)
  local st, answer = d:command(agg, id, type_, data)
  assert(st == 200, "command failed: " .. tostring(st))
  return answer
end

describe("example projections", function()
  local d
  setup(function()
    d = daemon.start({ args = { "--projections", support.root .. "/projections" } })
  end)
  teardown(function() d:stop() end)

  it("1. order_summary answers get and list, filtered by customer and status, paginated", function()
    command(d, "order", "a", "CreateOrder", { customer_id = "c-1" })
    command(d, "order", "a", "AddItem", { sku = "BOOK", qty = 2, price = 1250 })
    command(d, "order", "b", "CreateOrder", { customer_id = "c-1", currency = "USD" })
    command(d, "order", "c", "CreateOrder", { customer_id = "c-2" })
    local last = command(d, "order", "a", "ConfirmOrder", {})
    local st, order = d:get("/projections/order_summary/get?id=a&after=" .. int(last.position))
    assert.are.equal(200, st)
    assert.are.same({ "a", "c-1", "EUR", "confirmed", 2500, 2 },
      { order.id, order.customer_id, order.currency, order.status, order.total, order.item_count })
    local _, mine = d:get("/projections/order_summary/list?customer_id=c-1")
    assert.are.equal(2, #mine)
    local _, confirmed = d:get("/projections/order_summary/list?status=confirmed")
    assert.are.equal(1, #confirmed)
    assert.are.equal("a", confirmed[1].id)
    local _, page = d:get("/projections/order_summary/list?limit=1&offset=1")
    assert.are.equal(1, #page)
    local _, none = d:get("/projections/order_summary/get?id=nope")
    assert.are.equal(null, none)
  end)

  it("2. account_balances keeps balances and ranks the top accounts", function()
    command(d, "bank_account", "x", "OpenAccount", { owner = "Xu", initial_deposit = 500 })
    command(d, "bank_account", "y", "OpenAccount", { owner = "Yo", initial_deposit = 100 })
    local last = command(d, "bank_account", "y", "Deposit", { amount = 1000 })
    local st, top = d:get("/projections/account_balances/top?limit=2&after=" .. int(last.position))
    assert.are.equal(200, st)
    assert.are.same({ "y", 1100 }, { top[1].id, top[1].balance })
    assert.are.same({ "x", 500 }, { top[2].id, top[2].balance })
  end)

  it("3. status lists every projection with version, state, position and lag", function()
    local st, all = d:get("/projections")
    assert.are.equal(200, st)
    local names = {}
    for _, p in ipairs(all) do names[p.name] = p end
    assert.is_not_nil(names.order_summary)
    assert.are.equal(1, names.order_summary.version)
    assert.is_number(names.order_summary.position)
    assert.is_number(names.order_summary.lag_events)
    assert.is_not_nil(names.order_summary.events_per_second)
    assert.are.equal(404, (d:get("/projections/nope")))
    local _, _, metrics = d:get("/metrics")
    assert.matches('ebb_projection_position{projection="order_summary"}', metrics, 1, true)
    assert.matches('ebb_projection_state{projection="order_summary",state="live"} 1', metrics, 1, true)
  end)

  it("4. query arguments: numbers as numbers; unknown projections and queries are 404", function()
    local _, page = d:get("/projections/order_summary/list?limit=1")
    assert.are.equal(1, #page)
    assert.are.equal(404, (d:get("/projections/order_summary/nope")))
    assert.are.equal(404, (d:get("/projections/nope/get")))
    local st, body = d:get("/projections/order_summary/get?id=a&after=x")
    assert.are.equal(400, st)
    assert.matches("after", body.error.message)
  end)

  it("5. after= beyond what the projection reached answers 504 with its position", function()
    local st, body = d:get("/projections/order_summary/get?id=a&after=999999")
    assert.are.equal(504, st)
    assert.are.equal("timeout", body.error.code)
    assert.is_number(body.error.position)
  end)

  it("6. ebb projections (CLI) lists and queries through the daemon", function()
    local out, err, code = support.run({ "projections", "--url", d.url })
    assert.are.equal(0, code, err)
    assert.matches('"name":"order_summary"', out)
    out, err, code = support.run({ "projections", "query", "order_summary", "get", '{"id":"a"}',
                                   "--url", d.url })
    assert.are.equal(0, code, err)
    assert.matches('"id":"a"', out)
    out, err, code = support.run({ "projections", "status", "order_summary", "--url", d.url })
    assert.are.equal(0, code, err)
    assert.matches('"version":1', out)
    out, err, code = support.run({ "projections", "rebuild", "order_summary", "--url", d.url })
    assert.are.equal(0, code, err)
    assert.matches('"rebuilding":{"version":1', out)
    local _, err2, code2 = support.run({ "projections", "retry", "order_summary", "--url", d.url })
    assert.are.equal(4, code2) -- not faulted: a conflict
    assert.matches("not faulted", err2)
    local _, err3, code3 = support.run({ "projections", "status", "nope", "--url", d.url })
    assert.are.equal(3, code3)
    assert.matches("no projection nope", err3)
    live(d, "order_summary", 1)
  end)
end)

-- A projection used to test the runner itself: a row per handled event,
-- keyed by position, so handling an event twice would fail the insert.
local counter = [[
local p = { name = "NAME", version = VERSION, from = { "BankAccount", "Order" } }
function p.setup(db)
  db:exec "CREATE TABLE seen (position INTEGER PRIMARY KEY, stream TEXT, type TEXT, shape TEXT)"
end
local function handle(db, e)
  if e.data.poison then error("poisoned event " .. e.position) end
  local x = 0
  for i = 1, WORK do x = x + i end
  db:exec("INSERT INTO seen VALUES (?, ?, ?, ?)", e.position, e.stream, e.type, "SHAPE")
end
p.on = { AccountOpened = handle, MoneyDeposited = handle, OrderCreated = handle }
p.queries = {
  count = function(db)
    return db:row("SELECT count(*) AS n, coalesce(sum(position), 0) AS sum, max(shape) AS shape FROM seen")
  end,
  fail = function() error("this query always fails") end,
  spin = function(db)
    return db:value("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c")
  end,
}
return p
]]

local function counter_module(dir, name, opts)
  opts = opts or {}
  local src = counter:gsub("NAME", name):gsub("VERSION", tostring(opts.version or 1))
      :gsub("WORK", tostring(opts.work or 0)):gsub("SHAPE", opts.shape or "v1")
  support.write(dir .. "/" .. name .. ".lua", src)
end

describe("the projection runner", function()
  local d, dir
  before_each(function() dir = support.tmpdir() end)
  after_each(function()
    if d then d:stop() end
    d = nil
    support.rmdir(dir)
  end)

  it("1. a handler error faults only that projection, at the event; retry and skip resume it", function()
    counter_module(dir, "counter")
    counter_module(dir, "other")
    d = daemon.start({ args = { "--projections", dir } })
    command(d, "bank_account", "a", "OpenAccount", { owner = "o" })
    local bad = command(d, "order", "p", "CreateOrder", { customer_id = "c" })
    -- poison: an order event whose data makes the handler fail
    local st, poisoned = d:post("/streams/Order-poison",
                                { events = { { type = "OrderCreated", data = { poison = true } } } })
    assert.are.equal(200, st)
    local after = command(d, "bank_account", "b", "OpenAccount", { owner = "o" })
    local s = eventually(function()
      local x = status(d, "counter")
      return x and x.state == "faulted" and x
    end, 10, "the fault")
    assert.are.equal(poisoned.position, s.last_error.position)
    assert.matches("poisoned event", s.last_error.message)
    assert.matches("counter.lua:%d+", s.last_error.message)
    assert.are.equal(bad.position, s.position) -- everything before it is in
    -- `other` faults too (same code), but a projection without the poison goes on:
    local _, all = d:get("/projections")
    assert.are.equal(2, #all)
    -- retry: faults again on the same event
    st = d:post("/projections/counter/retry", {})
    assert.are.equal(200, st)
    eventually(function() local x = status(d, "counter") return x.state == "faulted" end, 10)
    -- skip: the event is recorded as skipped, and the projection goes on
    st = d:post("/projections/counter/skip", {})
    assert.are.equal(200, st)
    s = live(d, "counter", after.position)
    assert.are.same({ poisoned.position }, s.skipped)
    local _, count = d:get("/projections/counter/count")
    assert.are.equal(3, count.n)
    -- skipping a projection that is not faulted is refused
    assert.are.equal(409, (d:post("/projections/counter/skip", {})))
  end)

  it("2. query errors are 500 with the message", function()
    counter_module(dir, "counter")
    d = daemon.start({ args = { "--projections", dir } })
    local st, body = d:get("/projections/counter/fail")
    assert.are.equal(500, st)
    assert.are.equal("script_error", body.error.code)
    assert.matches("this query always fails", body.error.message)
  end)

  it("2b. SQL that runs away is stopped by the SQL budget, and the projection goes on", function()
    counter_module(dir, "counter")
    d = daemon.start({ args = { "--projections", dir } })
    -- 100M SQL steps take seconds on a loaded machine: wait for the answer as long as it takes.
    local st, body = d:get("/projections/counter/spin", { timeout = 600 })
    assert.are.equal(500, st)
    assert.matches("SQL budget of %d+ steps exceeded", body.error.message)
    local after = command(d, "bank_account", "a", "OpenAccount", { owner = "o" })
    live(d, "counter", after.position)
    local _, c = d:get("/projections/counter/count")
    assert.are.equal(1, c.n)
  end)

  it("3. exactly once across kill -9 in the middle of catch-up; a restart changes nothing", function()
    local data = support.tmpdir()
    d = daemon.start({ data = data })
    -- 20,000 events, 200 per append
    for i = 1, 100 do
      local events = {}
      for k = 1, 200 do events[k] = { type = "AccountOpened", data = { owner = "o", n = k } } end
      assert.are.equal(200, (d:post("/streams/BankAccount-bulk" .. i, { events = events })))
    end
    d:stop()
    -- Slow handlers, so that catch-up is still going when the kill comes, on any machine.
    counter_module(dir, "counter", { work = 10000 })
    d = daemon.start({ data = data, args = { "--projections", dir } })
    local s = eventually(function()
      local x = status(d, "counter")
      return x and x.position > 0 and x
    end, 10, "catch-up to start")
    assert.are.equal("catching_up", s.state)
    assert.is_true(s.position < 20000)
    d:signal("KILL")
    assert.is_true(d:wait(10))
    d = daemon.start({ data = data, args = { "--projections", dir } })
    live(d, "counter", 20000)
    local _, count = d:get("/projections/counter/count")
    assert.are.equal(20000, count.n)
    assert.are.equal(20000 * 20001 // 2, count.sum)
    -- a fresh rebuild of the same code gives the same read model
    counter_module(dir, "fresh", { work = 0 })
    d:signal("HUP")
    live(d, "fresh", 20000)
    local _, again = d:get("/projections/fresh/count")
    assert.are.same(count, again)
    -- restarting processes nothing again
    d:stop()
    d = daemon.start({ data = data, args = { "--projections", dir } })
    live(d, "counter", 20000)
    local _, after = d:get("/projections/counter/count")
    assert.are.same(count, after)
    support.rmdir(data)
  end)
end)

describe("hot reload of projections", function()
  local d, dir
  before_each(function()
    dir = support.tmpdir()
    counter_module(dir, "counter")
    d = daemon.start({ args = { "--projections", dir } })
    command(d, "bank_account", "a", "OpenAccount", { owner = "o" })
    live(d, "counter", 1)
  end)
  after_each(function()
    d:stop()
    support.rmdir(dir)
  end)

  it("1. a changed module is loaded without a restart and keeps its read model", function()
    counter_module(dir, "counter", { shape = "v1-edited" })
    eventually(function() return status(d, "counter").reloads == 1 end, 5, "the reload")
    command(d, "bank_account", "b", "OpenAccount", { owner = "o" })
    eventually(function()
      local _, c = d:get("/projections/counter/count")
      return c and c.shape == "v1-edited" and c.n == 2
    end, 5, "the edited handler")
    assert.are.equal(1, status(d, "counter").version)
  end)

  it("2. a broken change leaves the running version serving, and reports the error", function()
    support.write(dir .. "/counter.lua", "this is not Lua")
    local s = eventually(function()
      local x = status(d, "counter")
      return x and x.load_error ~= null and x
    end, 5, "the load error")
    assert.matches("counter.lua", s.load_error)
    assert.are.equal(1, s.load_failures)
    local st, c = d:get("/projections/counter/count")
    assert.are.equal(200, st)
    assert.are.equal(1, c.n)
    local _, _, metrics = d:get("/metrics")
    assert.matches('ebb_projection_load_failures_total{projection="counter"} 1', metrics, 1, true)
  end)

  it("3. a version bump rebuilds beside the old read model, then swaps the new one in", function()
    for i = 1, 30 do
      local events = {}
      for k = 1, 100 do events[k] = { type = "MoneyDeposited", data = { amount = 1, k = k } } end
      d:post("/streams/BankAccount-many" .. i, { events = events })
    end
    live(d, "counter", 3001)
    -- Slow handlers, so that the rebuild is seen in progress, on any machine; a batch of
    -- them together takes far more than the instruction budget, which is per event.
    counter_module(dir, "counter", { version = 2, shape = "v2", work = 30000 })
    -- During the rebuild the old version answers, in the old shape.
    local s = eventually(function()
      local x = status(d, "counter")
      return x and x.state == "rebuilding" and x
    end, 5, "the rebuild to start")
    assert.are.equal(1, s.version)
    local _, c = d:get("/projections/counter/count")
    assert.are.equal("v1", c.shape)
    assert.are.equal(3001, c.n)
    -- Then the new one, complete.
    eventually(function()
      local x = status(d, "counter")
      return x and x.version == 2 and x.state == "live" and x
    end, 20, "the swap")
    local _, c2 = d:get("/projections/counter/count")
    assert.are.equal("v2", c2.shape)
    assert.are.equal(3001, c2.n)
  end)

  it("4. POST /projections/{name}/rebuild forces the same blue/green rebuild", function()
    local st = d:post("/projections/counter/rebuild", {})
    assert.are.equal(200, st)
    live(d, "counter", 1)
    local _, c = d:get("/projections/counter/count")
    assert.are.equal(1, c.n)
  end)

  it("5. a removed module is dropped", function()
    os.remove(dir .. "/counter.lua")
    eventually(function() return d:get("/projections/counter") == 404 end, 5, "the removal")
    local _, all = d:get("/projections")
    assert.are.equal(0, #all)
  end)
end)

describe("ebb check and projections", function()
  it("validates every projection module, running setup on a scratch database", function()
    local dir = support.tmpdir()
    counter_module(dir, "counter")
    local data = support.tmpdir()
    local out, err, code = support.run({ "check", "--data", data, "--projections", dir })
    assert.are.equal(0, code, err)
    assert.matches('"projections":%["counter"%]', out)
    support.write(dir .. "/broken.lua", [[
      return { name = "broken", version = 1, from = { "Order" }, on = {},
               setup = function(db) db:exec("CREATE TABLE x (") end }]])
    support.write(dir .. "/misnamed.lua", 'return { name = "other", version = 1, from = { "Order" }, on = {} }')
    local _, err2, code2 = support.run({ "check", "--data", data, "--projections", dir })
    assert.are.equal(6, code2)
    assert.matches("broken.lua: setup failed: .*incomplete input", err2)
    assert.matches('misnamed.lua: name is "other", but the file is misnamed.lua', err2)
    assert.matches("2 problems in", err2)
    -- check touched no read model
    assert.is_nil(io.open(data .. "/projections/counter/current"))
    support.rmdir(dir)
    support.rmdir(data)
  end)
end)
