-- The BankAccount aggregate (aggregates/bank_account.lua): every command's
-- success, every rule's rejection, and integer balances, as scenarios.
package.path = "runtime/lua/?.lua;runtime/lua/?/init.lua;aggregates/?.lua;" .. package.path

local t = require "ebb.testing"
local account = require "bank_account"

local function opened(initial)
  return { type = "AccountOpened", data = { owner = "Ada", initial_deposit = initial, balance = initial } }
end
local function deposited(amount, balance)
  return { type = "MoneyDeposited", data = { amount = amount, balance = balance } }
end
local function withdrawn(amount, balance)
  return { type = "MoneyWithdrawn", data = { amount = amount, balance = balance } }
end
local closed = { type = "AccountClosed", data = {} }

local function an_account(...)
  return t.scenario(account, "a-1"):given { ... }
end

describe("BankAccount", function()
  it("declares its type", function()
    assert.are.equal("BankAccount", account.type)
  end)

  describe("OpenAccount", function()
    it("opens an account with an initial deposit", function()
      t.scenario(account, "a-1")
        :when("OpenAccount", { owner = "Ada", initial_deposit = 1000 })
        :expect_events { opened(1000) }
        :expect_state { status = "open", owner = "Ada", balance = 1000 }
    end)

    it("opens an account with nothing when the deposit is left out", function()
      t.scenario(account, "a-1")
        :when("OpenAccount", { owner = "Ada" })
        :expect_events { opened(0) }
        :expect_state { balance = 0 }
    end)

    it("rejects a second opening", function()
      an_account(opened(0))
        :when("OpenAccount", { owner = "Bob", initial_deposit = 0 })
        :expect_rejection("account already exists", { status = "open" })
      an_account(opened(0), closed)
        :when("OpenAccount", { owner = "Bob", initial_deposit = 0 })
        :expect_rejection("account already exists", { status = "closed" })
    end)

    it("rejects a missing owner", function()
      t.scenario(account, "a-1")
        :when("OpenAccount", { initial_deposit = 0 })
        :expect_rejection("owner is required")
    end)

    it("rejects an initial deposit that is not a non-negative integer", function()
      for _, v in ipairs { -1, 10.5, 10.0, "10" } do
        t.scenario(account, "a-1")
          :when("OpenAccount", { owner = "Ada", initial_deposit = v })
          :expect_rejection("initial_deposit must be a non-negative integer (cents)",
                            { initial_deposit = v })
      end
    end)
  end)

  describe("Deposit", function()
    it("adds the amount and records the new balance", function()
      an_account(opened(1000))
        :when("Deposit", { amount = 250 })
        :expect_events { deposited(250, 1250) }
        :expect_state { balance = 1250 }
    end)

    it("rejects an amount that is not a positive integer", function()
      for _, amount in ipairs { 0, -5, 2.5, 5.0, "5" } do
        an_account(opened(1000))
          :when("Deposit", { amount = amount })
          :expect_rejection("amount must be a positive integer (cents)", { amount = amount })
      end
      an_account(opened(1000))
        :when("Deposit", {})
        :expect_rejection("amount must be a positive integer (cents)")
    end)

    it("rejects a deposit that would overflow the balance", function()
      an_account(opened(math.maxinteger - 1))
        :when("Deposit", { amount = 2 })
        :expect_rejection("balance would overflow", { balance = math.maxinteger - 1, amount = 2 })
    end)

    it("rejects an account that does not exist or is closed", function()
      an_account():when("Deposit", { amount = 1 }):expect_rejection("account does not exist")
      an_account(opened(0), closed):when("Deposit", { amount = 1 }):expect_rejection("account is closed")
    end)
  end)

  describe("Withdraw", function()
    it("takes the amount and records the new balance", function()
      an_account(opened(1000))
        :when("Withdraw", { amount = 300 })
        :expect_events { withdrawn(300, 700) }
        :expect_state { balance = 700 }
    end)

    it("may empty the account", function()
      an_account(opened(1000))
        :when("Withdraw", { amount = 1000 })
        :expect_events { withdrawn(1000, 0) }
        :expect_state { balance = 0 }
    end)

    it("rejects a withdrawal beyond the balance", function()
      an_account(opened(50))
        :when("Withdraw", { amount = 80 })
        :expect_rejection("insufficient funds", { balance = 50, requested = 80 })
    end)

    it("rejects an amount that is not a positive integer", function()
      for _, amount in ipairs { 0, -5, 2.5, 5.0 } do
        an_account(opened(1000))
          :when("Withdraw", { amount = amount })
          :expect_rejection("amount must be a positive integer (cents)", { amount = amount })
      end
    end)

    it("rejects an account that does not exist or is closed", function()
      an_account():when("Withdraw", { amount = 1 }):expect_rejection("account does not exist")
      an_account(opened(0), closed):when("Withdraw", { amount = 1 }):expect_rejection("account is closed")
    end)
  end)

  describe("CloseAccount", function()
    it("closes an empty account", function()
      an_account(opened(100), withdrawn(100, 0))
        :when("CloseAccount")
        :expect_events { closed }
        :expect_state { status = "closed", balance = 0 }
    end)

    it("rejects closing with money left", function()
      an_account(opened(100))
        :when("CloseAccount")
        :expect_rejection("balance must be zero to close", { balance = 100 })
    end)

    it("rejects closing twice or an account that does not exist", function()
      an_account(opened(0), closed):when("CloseAccount"):expect_rejection("account is closed")
      an_account():when("CloseAccount"):expect_rejection("account does not exist")
    end)
  end)

  it("keeps the balance an exact integer across movements", function()
    an_account(opened(1999), deposited(1, 2000), withdrawn(999, 1001), deposited(10, 1011))
      :when("Withdraw", { amount = 11 })
      :expect_events { withdrawn(11, 1000) }
      :expect_state(function(s)
        assert.are.equal(1000, s.balance)
        assert.are.equal("integer", math.type(s.balance))
      end)
  end)

  it("has no handler for unknown commands", function()
    an_account(opened(0)):when("Transfer", { amount = 1 }):expect_not_found()
  end)
end)
