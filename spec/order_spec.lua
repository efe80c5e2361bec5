-- The Order aggregate (aggregates/order.lua): every command's success, every
-- rule's rejection, and the running totals, as given/when/then scenarios.
package.path = "runtime/lua/?.lua;runtime/lua/?/init.lua;aggregates/?.lua;" .. package.path

local ebb = require "ebb"
local t = require "ebb.testing"
local order = require "order"

local created = { type = "OrderCreated", data = { customer_id = "c-1", currency = "EUR" } }
local function added(sku, qty, price)
  return { type = "ItemAdded", data = { sku = sku, qty = qty, price = price } }
end
local confirmed = { type = "OrderConfirmed", data = { total = 1000, item_count = 2 } }
local shipped = { type = "OrderShipped", data = {} }
local cancelled = { type = "OrderCancelled", data = {} }

local function an_order(...)
  return t.scenario(order, "o-1"):given { created, ... }
end

describe("Order", function()
  it("declares its type, snapshot interval and schemas", function()
    assert.are.equal("Order", order.type)
    assert.are.equal(100, order.snapshot_every)
    assert.are.same({ OrderCreated = 2 }, order.schemas)
    assert.is_function(order.upcast.OrderCreated[1])
  end)

  it("starts with no order, no items and integer zero totals", function()
    t.scenario(order, "o-1"):expect_state(function(s)
      assert.are.equal("none", s.status)
      assert.are.equal(0, #s.items)
      assert.are.equal("integer", math.type(s.total))
      assert.are.equal("integer", math.type(s.item_count))
    end)
  end)

  describe("CreateOrder", function()
    it("reads an OrderCreated of schema 1, written before currencies, as a euro order", function()
      t.scenario(order, "o-1")
        :given { { type = "OrderCreated", schema = 1, data = { customer_id = "c-1" } } }
        :when("AddItem", { sku = "A", qty = 1, price = 100 })
        :expect_events { { type = "ItemAdded", data = { sku = "A", qty = 1, price = 100 } } }
        :expect_state { status = "created", customer_id = "c-1", currency = "EUR", total = 100 }
    end)

    it("creates the order in the given currency", function()
      t.scenario(order, "o-1")
        :when("CreateOrder", { customer_id = "c-1", currency = "USD" })
        :expect_events { { type = "OrderCreated", data = { customer_id = "c-1", currency = "USD" } } }
        :expect_state { status = "created", customer_id = "c-1", currency = "USD",
                        items = ebb.array(), total = 0, item_count = 0 }
    end)

    it("defaults the currency to EUR", function()
      t.scenario(order, "o-1")
        :when("CreateOrder", { customer_id = "c-1" })
        :expect_events { created }
    end)

    it("rejects a second creation", function()
      an_order()
        :when("CreateOrder", { customer_id = "c-2" })
        :expect_rejection("order already exists", { status = "created" })
    end)

    it("rejects a missing or empty customer_id", function()
      t.scenario(order, "o-1"):when("CreateOrder", {}):expect_rejection("customer_id is required")
      t.scenario(order, "o-1")
        :when("CreateOrder", { customer_id = "" })
        :expect_rejection("customer_id is required")
    end)

    it("rejects a currency that is not a three-letter code", function()
      t.scenario(order, "o-1")
        :when("CreateOrder", { customer_id = "c-1", currency = "euro" })
        :expect_rejection("currency must be a three-letter code such as EUR", { currency = "euro" })
    end)
  end)

  describe("AddItem", function()
    it("adds a line and updates the totals", function()
      an_order()
        :when("AddItem", { sku = "A", qty = 2, price = 500 })
        :expect_events { added("A", 2, 500) }
        :expect_state { items = { { sku = "A", qty = 2, price = 500 } }, total = 1000, item_count = 2 }
    end)

    it("adds to the quantity of a sku already in the order", function()
      an_order(added("A", 2, 500))
        :when("AddItem", { sku = "A", qty = 3, price = 500 })
        :expect_events { added("A", 3, 500) }
        :expect_state { items = { { sku = "A", qty = 5, price = 500 } }, total = 2500, item_count = 5 }
    end)

    it("accepts a free item", function()
      an_order()
        :when("AddItem", { sku = "GIFT", qty = 1, price = 0 })
        :expect_events { added("GIFT", 1, 0) }
        :expect_state { total = 0, item_count = 1 }
    end)

    it("rejects a sku already in the order at another price", function()
      an_order(added("A", 2, 500))
        :when("AddItem", { sku = "A", qty = 1, price = 450 })
        :expect_rejection("sku is already in the order at another price",
                          { sku = "A", price = 500, requested = 450 })
    end)

    it("rejects a missing sku", function()
      an_order():when("AddItem", { qty = 1, price = 500 }):expect_rejection("sku is required")
    end)

    it("rejects a quantity that is not a positive integer", function()
      for _, qty in ipairs { 0, -1, 1.5, 2.0, "2" } do
        an_order()
          :when("AddItem", { sku = "A", qty = qty, price = 500 })
          :expect_rejection("qty must be a positive integer", { qty = qty })
      end
      an_order()
        :when("AddItem", { sku = "A", price = 500 })
        :expect_rejection("qty must be a positive integer")
    end)

    it("rejects a price that is not a non-negative integer of cents", function()
      for _, price in ipairs { -1, 19.99, 500.0, "500" } do
        an_order()
          :when("AddItem", { sku = "A", qty = 1, price = price })
          :expect_rejection("price must be a non-negative integer (cents)", { price = price })
      end
    end)

    it("rejects a line that would overflow the total", function()
      an_order(added("A", 1, math.maxinteger - 10))
        :when("AddItem", { sku = "B", qty = 1, price = 11 })
        :expect_rejection("order total too large")
    end)

    it("rejects an order that does not exist", function()
      t.scenario(order, "o-1")
        :when("AddItem", { sku = "A", qty = 1, price = 500 })
        :expect_rejection("order does not exist")
    end)

    it("rejects changes after confirmation, shipping or cancellation", function()
      for status, history in pairs {
        confirmed = { added("A", 2, 500), confirmed },
        shipped = { added("A", 2, 500), confirmed, shipped },
        cancelled = { cancelled },
      } do
        an_order(table.unpack(history))
          :when("AddItem", { sku = "B", qty = 1, price = 100 })
          :expect_rejection("cannot add items: order is " .. status, { status = status })
      end
    end)
  end)

  describe("RemoveItem", function()
    it("removes the whole line and carries what it removed", function()
      an_order(added("A", 2, 500), added("B", 1, 250))
        :when("RemoveItem", { sku = "A" })
        :expect_events { { type = "ItemRemoved", data = { sku = "A", qty = 2, price = 500 } } }
        :expect_state { items = { { sku = "B", qty = 1, price = 250 } }, total = 250, item_count = 1 }
    end)

    it("rejects an unknown sku", function()
      an_order(added("A", 2, 500))
        :when("RemoveItem", { sku = "Z" })
        :expect_rejection("item not in order", { sku = "Z" })
    end)

    it("rejects a missing sku", function()
      an_order(added("A", 2, 500)):when("RemoveItem", {}):expect_rejection("sku is required")
    end)

    it("rejects removal after confirmation", function()
      an_order(added("A", 2, 500), confirmed)
        :when("RemoveItem", { sku = "A" })
        :expect_rejection("cannot remove items: order is confirmed", { status = "confirmed" })
    end)

    it("rejects an order that does not exist", function()
      t.scenario(order, "o-1")
        :when("RemoveItem", { sku = "A" })
        :expect_rejection("order does not exist")
    end)
  end)

  describe("totals", function()
    it("stay exact integers across adds and removes", function()
      an_order(added("A", 2, 1999), added("B", 3, 5), added("A", 1, 1999), added("C", 7, 1),
               { type = "ItemRemoved", data = { sku = "B", qty = 3, price = 5 } })
        :when("AddItem", { sku = "D", qty = 4, price = 25 })
        :expect_events { added("D", 4, 25) }
        :expect_state(function(s)
          assert.are.equal(3 * 1999 + 7 + 100, s.total)
          assert.are.equal("integer", math.type(s.total))
          assert.are.equal(3 + 7 + 4, s.item_count)
          assert.are.equal("integer", math.type(s.item_count))
          assert.are.same({ "A", "C", "D" }, { s.items[1].sku, s.items[2].sku, s.items[3].sku })
        end)
    end)

    it("come back to zero when every line is removed", function()
      an_order(added("A", 2, 500), { type = "ItemRemoved", data = { sku = "A", qty = 2, price = 500 } })
        :expect_state { items = ebb.array(), total = 0, item_count = 0 }
    end)
  end)

  describe("ConfirmOrder", function()
    it("confirms an order with items, recording its totals", function()
      an_order(added("A", 2, 500))
        :when("ConfirmOrder")
        :expect_events { confirmed }
        :expect_state { status = "confirmed", total = 1000 }
    end)

    it("rejects an empty order", function()
      an_order():when("ConfirmOrder"):expect_rejection("cannot confirm an empty order")
      an_order(added("A", 2, 500), { type = "ItemRemoved", data = { sku = "A", qty = 2, price = 500 } })
        :when("ConfirmOrder")
        :expect_rejection("cannot confirm an empty order")
    end)

    it("rejects a second confirmation and a cancelled order", function()
      an_order(added("A", 2, 500), confirmed)
        :when("ConfirmOrder")
        :expect_rejection("cannot confirm: order is confirmed", { status = "confirmed" })
      an_order(added("A", 2, 500), cancelled)
        :when("ConfirmOrder")
        :expect_rejection("cannot confirm: order is cancelled", { status = "cancelled" })
    end)

    it("rejects an order that does not exist", function()
      t.scenario(order, "o-1"):when("ConfirmOrder"):expect_rejection("order does not exist")
    end)
  end)

  describe("ShipOrder", function()
    it("ships a confirmed order", function()
      an_order(added("A", 2, 500), confirmed)
        :when("ShipOrder")
        :expect_events { shipped }
        :expect_state { status = "shipped" }
    end)

    it("rejects an order that is not confirmed", function()
      an_order(added("A", 2, 500))
        :when("ShipOrder")
        :expect_rejection("cannot ship: order is created", { status = "created" })
      an_order(added("A", 2, 500), confirmed, shipped)
        :when("ShipOrder")
        :expect_rejection("cannot ship: order is shipped", { status = "shipped" })
      an_order(cancelled)
        :when("ShipOrder")
        :expect_rejection("cannot ship: order is cancelled", { status = "cancelled" })
      t.scenario(order, "o-1"):when("ShipOrder"):expect_rejection("order does not exist")
    end)
  end)

  describe("CancelOrder", function()
    it("cancels a created order with a reason", function()
      an_order(added("A", 2, 500))
        :when("CancelOrder", { reason = "changed my mind" })
        :expect_events { { type = "OrderCancelled", data = { reason = "changed my mind" } } }
        :expect_state { status = "cancelled", cancel_reason = "changed my mind" }
    end)

    it("cancels a confirmed order without a reason", function()
      an_order(added("A", 2, 500), confirmed)
        :when("CancelOrder")
        :expect_events { cancelled }
        :expect_state { status = "cancelled", total = 1000 }
    end)

    it("rejects cancelling a shipped order", function()
      an_order(added("A", 2, 500), confirmed, shipped)
        :when("CancelOrder")
        :expect_rejection("cannot cancel: order is shipped", { status = "shipped" })
    end)

    it("rejects cancelling twice", function()
      an_order(cancelled)
        :when("CancelOrder")
        :expect_rejection("cannot cancel: order is cancelled", { status = "cancelled" })
    end)

    it("rejects a reason that is not a string", function()
      an_order():when("CancelOrder", { reason = 42 }):expect_rejection("reason must be a string")
    end)

    it("rejects an order that does not exist", function()
      t.scenario(order, "o-1"):when("CancelOrder"):expect_rejection("order does not exist")
    end)
  end)

  it("has no handler for unknown commands", function()
    an_order():when("PayOrder"):expect_not_found()
  end)
end)
