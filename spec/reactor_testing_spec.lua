-- ebb.testing's reactor helper: the example order_payment as domain logic,
-- and the helper's failure messages.
local t = require "ebb.testing"

local function confirmed(id, account, total)
  return { stream = "Order-" .. id, type = "OrderConfirmed",
           data = { total = total, item_count = 1, account_id = account } }
end

describe("order_payment (through t.reactor)", function()
  it("charges the paying account of a confirmed order, with the daemon's command id", function()
    t.reactor(require "order_payment")
      :given { confirmed("o-1", "a-1", 1200) }
      :expect_commands { { aggregate = "bank_account", id = "a-1", type = "Withdraw",
                           data = { amount = 1200 }, command_id = "order_payment:event-1:0" } }
  end)

  it("issues nothing for an order without an account, or for events it does not read", function()
    t.reactor(require "order_payment")
      :given { confirmed("o-1", nil, 1200),
               { stream = "BankAccount-a-1", type = "OrderConfirmed", data = { account_id = "x" } } }
      :expect_commands {}
  end)

  it("cancels the order when the charge is rejected", function()
    t.reactor(require "order_payment")
      :given { confirmed("o-1", "a-1", 1200) }
      :when_rejected("Withdraw", "insufficient funds", { balance = 10 })
      :expect_commands { { aggregate = "order", id = "o-1", type = "CancelOrder",
                           data = { reason = "payment refused: insufficient funds" },
                           command_id = "order_payment:event-1:0/r0" } }
  end)

  it("schedules the timeout on creation and cancels it on confirmation", function()
    local r = t.reactor(require "order_payment")
      :given { { stream = "Order-o-1", type = "OrderCreated",
                 data = { customer_id = "c", currency = "EUR", account_id = "a-1" } },
               { stream = "Order-o-2", type = "OrderCreated", recorded_at = "2026-01-01T13:00:00.000Z",
                 data = { customer_id = "c", currency = "EUR", account_id = "a-1" } } }
      :expect_commands {}
      :expect_schedules {
        { key = "timeout:o-1", at = "2026-01-01T12:30:00.000Z",
          command = { aggregate = "order", id = "o-1", type = "ExpireOrder", data = {} } },
        { key = "timeout:o-2", at = "2026-01-01T13:30:00.000Z" },
      }
    r:given { confirmed("o-1", "a-1", 10) }
      :expect_schedules { { key = "timeout:o-2" } }
  end)
end)

describe("a refused schedule (through t.reactor)", function()
  local expirer = {
    name = "expirer", from = { "Order" },
    on = {
      OrderCreated = function(e, ctx)
        ctx.schedule(60, { aggregate = "order", id = e.aggregate_id, type = "ExpireOrder" },
                     "timeout:" .. e.aggregate_id)
        return {}
      end,
    },
    rejected = {
      ExpireOrder = function(cmd, err, e)
        return { { aggregate = "bank_account", id = "late", type = "Deposit",
                   data = { amount = 1, why = cmd.command_id .. " " .. err.message .. " " .. e.type
                                              .. " " .. e.data.customer_id } } }
      end,
    },
  }

  it("runs rejected[type] with the event that set the schedule, and the schedule goes", function()
    t.reactor(expirer)
      :given { { stream = "Order-o-1", type = "OrderCreated", data = { customer_id = "c-1" } } }
      :expect_schedules { { key = "timeout:o-1" } }
      :when_schedule_rejected("timeout:o-1", "cannot expire a confirmed order")
      :expect_commands { { aggregate = "bank_account", id = "late", type = "Deposit",
                           data = { amount = 1, why = "expirer:event-1:schedule:timeout:o-1 cannot "
                                                      .. "expire a confirmed order OrderCreated c-1" },
                           command_id = "expirer:event-1:schedule:timeout:o-1/r0" } }
      :expect_schedules {}
  end)

  it("issues nothing when the reactor has no rejected handler for it, and names a key not pending", function()
    local plain = { name = "plain", from = expirer.from, on = expirer.on }
    t.reactor(plain)
      :given { { stream = "Order-o-1", type = "OrderCreated", data = { customer_id = "c-1" } } }
      :when_schedule_rejected("timeout:o-1", "no")
      :expect_commands {}
      :expect_schedules {}
    local ok, err = pcall(function()
      t.reactor(plain):given {}:when_schedule_rejected("timeout:o-9", "no")
    end)
    assert.is_false(ok)
    assert.matches("no pending schedule timeout:o-9", tostring(err), 1, true)
  end)
end)

describe("t.reactor's failure messages", function()
  local function failure(fn)
    local ok, err = pcall(fn)
    assert.is_false(ok, "expected a failure")
    return tostring(err)
  end

  it("names the first command that differs, with both lists", function()
    local msg = failure(function()
      t.reactor(require "order_payment")
        :given { confirmed("o-1", "a-1", 1200) }
        :expect_commands { { aggregate = "bank_account", id = "a-1", type = "Withdraw",
                             data = { amount = 1000 } } }
    end)
    assert.matches("order_payment, given 1 event: commands differ at [1].data.amount: "
                   .. "expected 1000 (integer), got 1200 (integer)", msg, 1, true)
    assert.matches("expected:", msg, 1, true)
    assert.matches("got:", msg, 1, true)
  end)

  it("names a missing and an unexpected command", function()
    local msg = failure(function()
      t.reactor(require "order_payment"):given { confirmed("o-1", "a-1", 1) }:expect_commands {}
    end)
    assert.matches("commands differ at [1]: unexpected command Withdraw on bank_account a-1", msg, 1, true)
    msg = failure(function()
      t.reactor(require "order_payment"):given {}:expect_commands { { aggregate = "x", id = "y", type = "Z" } }
    end)
    assert.matches("commands differ at [1]: missing command Z", msg, 1, true)
  end)

  it("says when nothing of the type was issued to be rejected", function()
    local msg = failure(function()
      t.reactor(require "order_payment"):given {}:when_rejected("Withdraw", "no")
    end)
    assert.matches("no Withdraw command was issued to be rejected", msg, 1, true)
  end)

  it("names a schedule that differs, and a handler that fails", function()
    local msg = failure(function()
      t.reactor(require "order_payment")
        :given { { stream = "Order-o-1", type = "OrderCreated", data = { account_id = "a-1" } } }
        :expect_schedules { { key = "timeout:o-1", at = "2026-01-01T12:00:00.000Z" } }
    end)
    assert.matches('schedules differ at [1].at: expected "2026-01-01T12:00:00.000Z" (string), got '
                   .. '"2026-01-01T12:30:00.000Z" (string)', msg, 1, true)
    local broken = { name = "broken", from = { "Order" }, on = { OrderCreated = function() error("boom") end } }
    msg = failure(function()
      t.reactor(broken):given { { stream = "Order-o-1", type = "OrderCreated" } }
    end)
    assert.matches("broken, given 1 event: on.OrderCreated failed on event 1 (OrderCreated in Order-o-1)",
                   msg, 1, true)
    assert.matches("boom", msg, 1, true)
  end)
end)
