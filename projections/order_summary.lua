--[[
order_summary: one row per order, for listing and looking up orders.

Reads the Order category. OrderCreated arrives upcast to its current schema
(schema 2, with a currency), so orders written before currencies existed
read as euros here too.
]]
local p = { name = "order_summary", version = 1, from = { "Order" } }

function p.setup(db)
  db:exec [[
    CREATE TABLE orders (
      id          TEXT PRIMARY KEY,        -- the order's id (its stream is Order-<id>)
      customer_id TEXT NOT NULL,
      currency    TEXT NOT NULL,
      status      TEXT NOT NULL,
      total       INTEGER NOT NULL DEFAULT 0,   -- cents
      item_count  INTEGER NOT NULL DEFAULT 0,
      created_at  TEXT NOT NULL,
      updated_at  TEXT NOT NULL
    );
    CREATE INDEX orders_by_customer ON orders (customer_id, created_at);
    CREATE INDEX orders_by_status ON orders (status, created_at);
  ]]
end

-- aggregate_id: the id part of the stream ("o-1" in "Order-o-1").
local function id_of(e) return e.aggregate_id end

local function set_status(db, e, status)
  db:exec("UPDATE orders SET status = ?, updated_at = ? WHERE id = ?", status, e.recorded_at, id_of(e))
end

p.on = {
  OrderCreated = function(db, e)
    db:exec([[INSERT INTO orders (id, customer_id, currency, status, created_at, updated_at)
              VALUES (?, ?, ?, 'created', ?, ?)]],
            id_of(e), e.data.customer_id, e.data.currency, e.recorded_at, e.recorded_at)
  end,
  ItemAdded = function(db, e)
    db:exec([[UPDATE orders SET total = total + ? * ?, item_count = item_count + ?, updated_at = ?
              WHERE id = ?]], e.data.qty, e.data.price, e.data.qty, e.recorded_at, id_of(e))
  end,
  ItemRemoved = function(db, e)
    db:exec([[UPDATE orders SET total = total - ? * ?, item_count = item_count - ?, updated_at = ?
              WHERE id = ?]], e.data.qty, e.data.price, e.data.qty, e.recorded_at, id_of(e))
  end,
  OrderConfirmed = function(db, e) set_status(db, e, "confirmed") end,
  OrderShipped = function(db, e) set_status(db, e, "shipped") end,
  OrderCancelled = function(db, e) set_status(db, e, "cancelled") end,
}

local MAX_PAGE = 100

local ebb = require "ebb"

p.queries = {
  -- get?id=o-1: the order, or null
  get = function(db, a)
    return db:row("SELECT * FROM orders WHERE id = ?", a.id)
  end,
  -- list?customer_id=&status=&limit=&offset=: newest first, at most 100 per page
  list = function(db, a)
    local limit = ebb.count_arg(a, "limit", 20, 1, MAX_PAGE)
    local offset = ebb.count_arg(a, "offset", 0, 0, math.maxinteger)
    return db:rows([[SELECT * FROM orders
                     WHERE (?1 IS NULL OR customer_id = ?1) AND (?2 IS NULL OR status = ?2)
                     ORDER BY created_at DESC, id LIMIT ?3 OFFSET ?4]],
                   a.customer_id, a.status, limit, offset)
  end,
}

return p
