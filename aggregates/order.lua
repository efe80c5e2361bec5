--[[
Order: a customer's order, from creation through confirmation to shipping or
cancellation. Stream "Order-<id>".

Items are a list of lines { sku, qty, price }, one line per sku, in the order
they were first added. Adding a sku that is already in the order adds to its
quantity, at the same price (a different price is rejected: remove the line
first). Removing a sku removes its whole line. Money is integer cents in the
order's currency; `total` is the sum of qty * price and `item_count` the
number of units (the sum of qty).

Lifecycle: none -> created -> confirmed -> shipped, and created or confirmed
-> cancelled. Items change only while the order is "created".
]]

local ebb = require "ebb"

local order = {
  type = "Order",
  snapshot_every = 100,
  -- OrderCreated gained its currency in schema 2; older events are upcast on
  -- every read by the sibling module order_upcasters.lua.
  schemas = { OrderCreated = 2 },
  upcast = require "order_upcasters",
}

function order.initial()
  return { status = "none", items = ebb.array(), total = 0, item_count = 0 }
end

-- Helpers ----------------------------------------------------------------------

local function is_integer(v) return math.type(v) == "integer" end

local function find_line(s, sku)
  for i, line in ipairs(s.items) do
    if line.sku == sku then return i, line end
  end
end

local function must_exist(s)
  if s.status == "none" then ebb.reject("order does not exist") end
end

-- Rejects unless the order is in `status`; `doing` names what was attempted,
-- as in "cannot ship: order is created".
local function must_be(s, status, doing)
  must_exist(s)
  if s.status ~= status then
    ebb.reject("cannot " .. doing .. ": order is " .. s.status, { status = s.status })
  end
end

local function must_be_sku(sku)
  if type(sku) ~= "string" or sku == "" then ebb.reject("sku is required") end
end

local function emit(name, data) return { { type = name, data = data } } end

-- Decisions --------------------------------------------------------------------

order.handle = {}

function order.handle.CreateOrder(s, c)
  if s.status ~= "none" then ebb.reject("order already exists", { status = s.status }) end
  local customer_id, currency = c.data.customer_id, c.data.currency or "EUR"
  if type(customer_id) ~= "string" or customer_id == "" then
    ebb.reject("customer_id is required")
  end
  if type(currency) ~= "string" or not currency:match("^%u%u%u$") then
    ebb.reject("currency must be a three-letter code such as EUR", { currency = currency })
  end
  -- The bank account that pays for the order (optional): the order_payment
  -- reactor charges it when the order is confirmed.
  local account_id = c.data.account_id
  if account_id ~= nil and (type(account_id) ~= "string" or account_id == "") then
    ebb.reject("account_id must be a non-empty string", { account_id = account_id })
  end
  return emit("OrderCreated", { customer_id = customer_id, currency = currency,
                                account_id = account_id })
end

function order.handle.AddItem(s, c)
  must_be(s, "created", "add items")
  local sku, qty, price = c.data.sku, c.data.qty, c.data.price
  must_be_sku(sku)
  if not is_integer(qty) or qty <= 0 then
    ebb.reject("qty must be a positive integer", { qty = qty })
  end
  if not is_integer(price) or price < 0 then
    ebb.reject("price must be a non-negative integer (cents)", { price = price })
  end
  local _, line = find_line(s, sku)
  if line and line.price ~= price then
    ebb.reject("sku is already in the order at another price",
               { sku = sku, price = line.price, requested = price })
  end
  if qty > math.maxinteger - s.item_count
     or price > 0 and qty > (math.maxinteger - s.total) // price then
    ebb.reject("order total too large", { total = s.total, qty = qty, price = price })
  end
  return emit("ItemAdded", { sku = sku, qty = qty, price = price })
end

function order.handle.RemoveItem(s, c)
  must_be(s, "created", "remove items")
  local sku = c.data.sku
  must_be_sku(sku)
  local _, line = find_line(s, sku)
  if not line then ebb.reject("item not in order", { sku = sku }) end
  return emit("ItemRemoved", { sku = sku, qty = line.qty, price = line.price })
end

function order.handle.ConfirmOrder(s)
  must_be(s, "created", "confirm")
  if #s.items == 0 then ebb.reject("cannot confirm an empty order") end
  return emit("OrderConfirmed", { total = s.total, item_count = s.item_count,
                                  account_id = s.account_id })
end

function order.handle.ShipOrder(s)
  must_be(s, "confirmed", "ship")
  return emit("OrderShipped", {})
end

function order.handle.CancelOrder(s, c)
  must_exist(s)
  if s.status == "shipped" or s.status == "cancelled" then
    ebb.reject("cannot cancel: order is " .. s.status, { status = s.status })
  end
  local reason = c.data.reason
  if reason ~= nil and type(reason) ~= "string" then
    ebb.reject("reason must be a string", { reason = reason })
  end
  return emit("OrderCancelled", { reason = reason })
end

-- The timeout of an order that was never confirmed (see reactors/order_payment.lua):
-- unlike CancelOrder, it refuses once the order has moved on, so a timeout
-- that fires late never cancels a confirmed order.
function order.handle.ExpireOrder(s)
  must_be(s, "created", "expire")
  return emit("OrderCancelled", { reason = "not confirmed in time" })
end

-- Evolution --------------------------------------------------------------------

order.apply = {}

function order.apply.OrderCreated(s, e)
  s.status = "created"
  s.customer_id = e.data.customer_id
  s.currency = e.data.currency
  s.account_id = e.data.account_id
end

function order.apply.ItemAdded(s, e)
  local d = e.data
  local _, line = find_line(s, d.sku)
  if line then
    line.qty = line.qty + d.qty
  else
    s.items[#s.items + 1] = { sku = d.sku, qty = d.qty, price = d.price }
  end
  s.total = s.total + d.qty * d.price
  s.item_count = s.item_count + d.qty
end

function order.apply.ItemRemoved(s, e)
  local i, line = find_line(s, e.data.sku)
  if not line then return end
  table.remove(s.items, i)
  s.total = s.total - line.qty * line.price
  s.item_count = s.item_count - line.qty
end

function order.apply.OrderConfirmed(s) s.status = "confirmed" end

function order.apply.OrderShipped(s) s.status = "shipped" end

function order.apply.OrderCancelled(s, e)
  s.status = "cancelled"
  s.cancel_reason = e.data.reason
end

return order
