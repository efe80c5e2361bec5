-- The example projections as domain logic, through ebb.testing's projection
-- helper: what order_summary and account_balances answer for given events.
local t = require "ebb.testing"
local null = require("ebb.core").null

describe("order_summary", function()
  local p
  before_each(function() p = t.projection(require "order_summary") end)
  after_each(function() p:close() end)

  local function created(id, customer, currency, at)
    return { stream = "Order-" .. id, type = "OrderCreated",
             data = { customer_id = customer, currency = currency or "EUR" }, recorded_at = at }
  end

  it("keeps status, total and item count per order", function()
    p:given {
      created("o-1", "c-1"),
      { stream = "Order-o-1", type = "ItemAdded", data = { sku = "A", qty = 2, price = 500 } },
      { stream = "Order-o-1", type = "ItemAdded", data = { sku = "B", qty = 1, price = 250 } },
      { stream = "Order-o-1", type = "ItemRemoved", data = { sku = "B", qty = 1, price = 250 } },
      { stream = "Order-o-1", type = "OrderConfirmed", data = { total = 1000, item_count = 2 } },
    }
    local o = p:query("get", { id = "o-1" })
    assert.are.same({ "o-1", "c-1", "EUR", "confirmed", 1000, 2 },
                    { o.id, o.customer_id, o.currency, o.status, o.total, o.item_count })
    p:given { { stream = "Order-o-1", type = "OrderShipped" } }
    assert.are.equal("shipped", p:query("get", { id = "o-1" }).status)
  end)

  it("answers null for an unknown order", function()
    assert.are.equal(nil, p:query("get", { id = "nope" }))
  end)

  it("lists newest first, by customer and status, a page at a time", function()
    p:given {
      created("a", "c-1", "EUR", "2026-01-01T10:00:00.000Z"),
      created("b", "c-1", "USD", "2026-01-02T10:00:00.000Z"),
      created("c", "c-2", "EUR", "2026-01-03T10:00:00.000Z"),
      { stream = "Order-c", type = "OrderCancelled", data = { reason = "changed mind" } },
    }
    local function ids(rows)
      local r = {}
      for i, row in ipairs(rows) do r[i] = row.id end
      return r
    end
    assert.are.same({ "c", "b", "a" }, ids(p:query("list", {})))
    assert.are.same({ "b", "a" }, ids(p:query("list", { customer_id = "c-1" })))
    assert.are.same({ "c" }, ids(p:query("list", { status = "cancelled" })))
    assert.are.same({ "b" }, ids(p:query("list", { limit = 1, offset = 1 })))
    assert.are.same({}, ids(p:query("list", { customer_id = "nobody" })))
  end)

  it("ignores events of other categories", function()
    p:given { { stream = "BankAccount-x", type = "AccountOpened", data = { owner = "o", balance = 1 } } }
    assert.are.same({}, p:query("list", {}))
  end)

  it("a handler error names the event and keeps nothing of that batch", function()
    local err = require("support").failure(function()
      p:given { created("a", "c-1"), { stream = "Order-b", type = "OrderCreated", data = {} } }
    end)
    -- the second event has no customer_id: the NOT NULL column refuses it
    assert.matches("order_summary: event 2 %(OrderCreated in Order%-b%):.*NOT NULL", err)
    assert.are.equal(nil, p:query("get", { id = "a" })) -- the first event went back too
  end)
end)

describe("account_balances", function()
  local p
  before_each(function() p = t.projection(require "account_balances") end)
  after_each(function() p:close() end)

  it("copies the balance each event carries, and ranks accounts", function()
    p:given {
      { stream = "BankAccount-a", type = "AccountOpened", data = { owner = "Ann", balance = 100 } },
      { stream = "BankAccount-b", type = "AccountOpened", data = { owner = "Bo", balance = 0 } },
      { stream = "BankAccount-b", type = "MoneyDeposited", data = { amount = 500, balance = 500 } },
      { stream = "BankAccount-a", type = "MoneyWithdrawn", data = { amount = 40, balance = 60 } },
      { stream = "BankAccount-a", type = "AccountClosed" },
    }
    assert.are.same({ id = "a", owner = "Ann", balance = 60, status = "closed" },
                    p:query("balance", { id = "a" }))
    local top = p:query("top", { limit = 1 })
    assert.are.equal(1, #top)
    assert.are.same({ id = "b", owner = "Bo", balance = 500 }, top[1])
    assert.are.not_equal(null, top[1].balance)
  end)
end)
