--[[
Upcasters of the Order aggregate's events: each turns the data of one stored
schema into the next. Stored events are never changed; these run on every
read. Order names this module in its `upcast` field.

OrderCreated
  schema 1 (until currencies were introduced): { customer_id }
  schema 2: { customer_id, currency } -- every order before then was in euros
]]

return {
  OrderCreated = {
    [1] = function(data)
      data.currency = data.currency or "EUR"
      return data
    end,
  },
}
