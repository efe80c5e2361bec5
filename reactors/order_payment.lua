--[[
order_payment: charges an order's account when the order is confirmed, and
cancels the order when the charge is refused. An order created with an
account that is not confirmed in time expires (the timeout; ExpireOrder is
refused once the order is confirmed, so a late timeout changes nothing).

  OrderCreated (with account_id)  -> schedule ExpireOrder at +timeout_seconds
  OrderConfirmed (with account_id) -> cancel that schedule; Withdraw the total
  Withdraw rejected                -> CancelOrder with the refusal as reason
  OrderCancelled                   -> cancel the schedule (nothing to time out)

The timeout is the reactor's setting timeout_seconds, 1800 by default; the
environment variable EBB_REACTOR_ORDER_PAYMENT_TIMEOUT_SECONDS overrides it
(a spec makes it short).
]]
local r = { name = "order_payment", from = { "Order" },
            settings = { timeout_seconds = 1800 } }

local function timeout_key(e) return "timeout:" .. e.aggregate_id end

r.on = {
  OrderCreated = function(e, ctx)
    if e.data.account_id == nil then return {} end
    ctx.schedule(ctx.settings.timeout_seconds,
                 { aggregate = "order", id = e.aggregate_id, type = "ExpireOrder" }, timeout_key(e))
    return {}
  end,
  OrderConfirmed = function(e, ctx)
    if e.data.account_id == nil then return {} end
    ctx.cancel(timeout_key(e))
    return { { aggregate = "bank_account", id = e.data.account_id, type = "Withdraw",
               data = { amount = e.data.total } } }
  end,
  OrderCancelled = function(e, ctx)
    ctx.cancel(timeout_key(e))
    return {}
  end,
}

-- A command this reactor issued was refused: compensate.
r.rejected = {
  Withdraw = function(_, err, e)
    return { { aggregate = "order", id = e.aggregate_id, type = "CancelOrder",
               data = { reason = "payment refused: " .. err.message } } }
  end,
}

return r
