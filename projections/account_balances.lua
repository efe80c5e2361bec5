--[[
account_balances: the balance of every bank account, and the richest ones.
Each money event carries the balance after it, so the read model copies it
rather than adding amounts up: a replay can never drift.
]]
local p = { name = "account_balances", version = 1, from = { "BankAccount" } }

function p.setup(db)
  db:exec [[
    CREATE TABLE accounts (
      id      TEXT PRIMARY KEY,
      owner   TEXT NOT NULL,
      balance INTEGER NOT NULL,     -- cents
      status  TEXT NOT NULL
    );
    CREATE INDEX accounts_by_balance ON accounts (balance DESC);
  ]]
end

-- aggregate_id: the id part of the stream ("a-1" in "BankAccount-a-1").
local function id_of(e) return e.aggregate_id end

local function set_balance(db, e)
  db:exec("UPDATE accounts SET balance = ? WHERE id = ?", e.data.balance, id_of(e))
end

p.on = {
  AccountOpened = function(db, e)
    db:exec("INSERT INTO accounts (id, owner, balance, status) VALUES (?, ?, ?, 'open')",
            id_of(e), e.data.owner, e.data.balance)
  end,
  MoneyDeposited = set_balance,
  MoneyWithdrawn = set_balance,
  AccountClosed = function(db, e)
    db:exec("UPDATE accounts SET status = 'closed' WHERE id = ?", id_of(e))
  end,
}

local ebb = require "ebb"

p.queries = {
  -- balance?id=a-1
  balance = function(db, a)
    return db:row("SELECT id, owner, balance, status FROM accounts WHERE id = ?", a.id)
  end,
  -- top?limit=10: the accounts with the highest balances
  top = function(db, a)
    local limit = ebb.count_arg(a, "limit", 10, 1, 100)
    return db:rows("SELECT id, owner, balance FROM accounts ORDER BY balance DESC, id LIMIT ?", limit)
  end,
}

return p
