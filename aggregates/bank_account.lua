--[[
BankAccount: an account that is opened, receives deposits and withdrawals,
and is closed once empty. Stream "BankAccount-<id>".

Money is integer cents. The balance never goes below zero, and every movement
event carries the balance after it, so a projection can show balances without
re-adding the history. Nothing happens to a closed account.
]]

local ebb = require "ebb"

local account = { type = "BankAccount" }

function account.initial()
  return { status = "none", balance = 0 }
end

-- Helpers ----------------------------------------------------------------------

local function is_integer(v) return math.type(v) == "integer" end

local function must_be_open(s)
  if s.status == "none" then ebb.reject("account does not exist") end
  if s.status == "closed" then ebb.reject("account is closed") end
end

-- Checks the amount of a deposit or withdrawal.
local function must_be_amount(amount)
  if not is_integer(amount) or amount <= 0 then
    ebb.reject("amount must be a positive integer (cents)", { amount = amount })
  end
end

local function emit(name, data) return { { type = name, data = data } } end

-- Decisions --------------------------------------------------------------------

account.handle = {}

function account.handle.OpenAccount(s, c)
  if s.status ~= "none" then ebb.reject("account already exists", { status = s.status }) end
  local owner, initial_deposit = c.data.owner, c.data.initial_deposit or 0
  if type(owner) ~= "string" or owner == "" then ebb.reject("owner is required") end
  if not is_integer(initial_deposit) or initial_deposit < 0 then
    ebb.reject("initial_deposit must be a non-negative integer (cents)",
               { initial_deposit = initial_deposit })
  end
  return emit("AccountOpened",
              { owner = owner, initial_deposit = initial_deposit, balance = initial_deposit })
end

function account.handle.Deposit(s, c)
  must_be_open(s)
  local amount = c.data.amount
  must_be_amount(amount)
  if amount > math.maxinteger - s.balance then
    ebb.reject("balance would overflow", { balance = s.balance, amount = amount })
  end
  return emit("MoneyDeposited", { amount = amount, balance = s.balance + amount })
end

function account.handle.Withdraw(s, c)
  must_be_open(s)
  local amount = c.data.amount
  must_be_amount(amount)
  if amount > s.balance then
    ebb.reject("insufficient funds", { balance = s.balance, requested = amount })
  end
  return emit("MoneyWithdrawn", { amount = amount, balance = s.balance - amount })
end

function account.handle.CloseAccount(s)
  must_be_open(s)
  if s.balance ~= 0 then
    ebb.reject("balance must be zero to close", { balance = s.balance })
  end
  return emit("AccountClosed", {})
end

-- Evolution --------------------------------------------------------------------

account.apply = {}

function account.apply.AccountOpened(s, e)
  s.status = "open"
  s.owner = e.data.owner
  s.balance = e.data.initial_deposit
end

function account.apply.MoneyDeposited(s, e) s.balance = s.balance + e.data.amount end

function account.apply.MoneyWithdrawn(s, e) s.balance = s.balance - e.data.amount end

function account.apply.AccountClosed(s) s.status = "closed" end

return account
