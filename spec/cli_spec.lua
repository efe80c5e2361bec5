-- The `ebb` command line end to end: output, exit codes, export/import.
local core = require "ebb.core"
local support = require "support"

local decode = core.json_decode

describe("ebb CLI", function()
  local dir

  local function ebb(args, opts) return support.cli(dir)(args, opts) end

  before_each(function() dir = support.tmpdir() end)
  after_each(function() support.rmdir(dir) end)

  it("sends commands and prints the result as JSON", function()
    local out, err, code = ebb { "send", "Order", "o-1", "CreateOrder", '{"customer_id":"c-1"}' }
    assert.equal(0, code, err)
    local r = decode(out)
    assert.equal("Order-o-1", r.stream)
    assert.equal(1, r.version)
    assert.equal("OrderCreated", r.events[1].type)
    out, err, code = ebb { "send", "order", "o-1", "AddItem", '{"sku":"A","qty":2,"price":9007199254740993}' }
    assert.equal(0, code, err)
    assert.equal(9007199254740993, decode(out).events[1].data.price)
  end)

  it("exits with a code per kind of error and says why on stderr", function()
    assert.equal(0, select(3, ebb { "send", "Order", "o-1", "CreateOrder", '{"customer_id":"c-1"}' }))
    local cases = {
      { { "send", "Nope", "1", "X" }, 3, "not_found: unknown aggregate Nope" },
      { { "send", "Order", "o-1", "Fly" }, 3, "not_found: Order has no command Fly" },
      { { "send", "Order", "o-1", "CreateOrder", '{"customer_id":"c-1"}', "--expect", "0" }, 4,
        "wrong_expected_version: wrong expected version for Order%-o%-1: expected 0, actual 1" },
      { { "send", "Order", "o-1", "CreateOrder", '{"customer_id":"c-1"}' }, 5, "rejected:" },
      { { "send", "Order", "o-1", "AddItem", "{nope" }, 7, "bad_request: command data is not valid JSON" },
      { { "send", "Order", "o-1" }, 2, "wrong number of arguments" },
      { { "frobnicate" }, 2, 'unknown command "frobnicate"' },
      { { "read", "Order-o-1", "--limit", "0" }, 2, "%-%-limit must be an integer of at least 1" },
      { { "read", "Order-o-404" }, 3, "stream Order%-o%-404 does not exist" },
      { { "send", "Order", "o-1", "ConfirmOrder", "--frob" }, 2, "unknown option %-%-frob" },
    }
    for _, c in ipairs(cases) do
      local out, err, code = ebb(c[1])
      assert.equal(c[2], code, table.concat(c[1], " ") .. ": " .. err)
      assert.matches(c[3], err)
      assert.equal("", out)
    end
    assert.equal(1, #support.lines(ebb { "read", "Order-o-1" }, decode))
  end)

  it("exits 6 for a script error", function()
    local aggs = support.aggregates_copy()
    support.write(aggs .. "/bad.lua", [[return { type = "Bad", initial = function() return {} end, apply = {},
      handle = { Boom = function() error("boom") end } }]])
    local out, err, code = support.run { "--data", dir, "--aggregates", aggs, "send", "Bad", "1", "Boom" }
    assert.equal(6, code)
    assert.equal("", out)
    assert.matches("script_error: bad%.lua:2: boom", err)
    support.rmdir(aggs)
  end)

  it("deduplicates by --command-id", function()
    local first = ebb { "send", "Order", "o-1", "CreateOrder", '{"customer_id":"c"}', "--command-id", "k-1" }
    local again, err, code = ebb { "send", "Order", "o-1", "CreateOrder", '{"customer_id":"c"}', "--command-id", "k-1" }
    assert.equal(0, code, err)
    assert.equal(first, again)
    assert.equal(1, #support.lines(ebb { "events" }, decode))
  end)

  it("reads streams forward and backward, and all events with filters", function()
    ebb { "send", "Order", "o-1", "CreateOrder", '{"customer_id":"c-1"}' }
    for i = 1, 4 do ebb { "send", "Order", "o-1", "AddItem", ('{"sku":"S%d","qty":1,"price":100}'):format(i) } end
    ebb { "send", "BankAccount", "a-1", "OpenAccount", '{"owner":"Ann","initial_deposit":50}' }
    local fwd = support.lines(ebb { "read", "Order-o-1", "--from", "2", "--limit", "2" }, decode)
    assert.same({ 2, 3 }, { fwd[1].version, fwd[2].version })
    local back = support.lines(ebb { "read", "Order-o-1", "--backward", "--limit", "2" }, decode)
    assert.same({ 5, 4 }, { back[1].version, back[2].version })
    assert.equal(6, #support.lines(ebb { "events" }, decode))
    assert.equal(1, #support.lines(ebb { "events", "--category", "BankAccount" }, decode))
    assert.equal(4, #support.lines(ebb { "events", "--type", "ItemAdded" }, decode))
    local after = support.lines(ebb { "events", "--after", "4", "--limit", "1" }, decode)
    assert.equal(5, after[1].position)
  end)

  it("prints an aggregate's state", function()
    ebb { "send", "BankAccount", "a-1", "OpenAccount", '{"owner":"Ann","initial_deposit":50}' }
    ebb { "send", "BankAccount", "a-1", "Deposit", '{"amount":25}' }
    local out, err, code = ebb { "state", "BankAccount", "a-1" }
    assert.equal(0, code, err)
    local s = decode(out)
    assert.equal(2, s.version)
    assert.equal("BankAccount-a-1", s.stream)
    assert.equal(75, s.state.balance)
  end)

  it("checks modules, reporting file and line", function()
    local out, err, code = ebb { "check" }
    assert.equal(0, code, err)
    assert.is_true(decode(out).ok)
    local aggs = support.aggregates_copy()
    support.write(aggs .. "/broken.lua", "local x = \n")
    out, err, code = support.run { "--data", dir, "--aggregates", aggs, "check" }
    assert.equal(6, code)
    assert.equal("", out)
    assert.matches("broken%.lua:%d+:", err)
    support.rmdir(aggs)
  end)

  it("exports and imports NDJSON idempotently, keeping int64 values exact", function()
    ebb { "send", "Order", "o-1", "CreateOrder", '{"customer_id":"c-1"}' }
    ebb { "send", "Order", "o-1", "AddItem", '{"sku":"A","qty":1,"price":9223372036854775807}' }
    ebb { "send", "BankAccount", "a-1", "OpenAccount", '{"owner":"Ann","initial_deposit":0}' }
    ebb { "send", "Order", "o-1", "ConfirmOrder" }
    local exported = ebb { "export" }
    assert.equal(4, #support.lines(exported, decode))
    assert.matches('"price":9223372036854775807', exported)

    local other = support.tmpdir()
    local args = { "--data", other, "import" }
    local out, err, code = support.run(args, { stdin = exported })
    assert.equal(0, code, err)
    assert.same({ imported = 4, skipped = 0 }, decode(out))
    out, err, code = support.run(args, { stdin = exported })
    assert.equal(0, code, err)
    assert.same({ imported = 0, skipped = 4 }, decode(out))
    assert.equal(exported, (support.run { "--data", other, "export" }))

    local old = ebb { "export", "--before", "3" }
    assert.equal(2, #support.lines(old, decode))
    assert.equal(2, #support.lines(ebb { "export", "--after", "2" }, decode))
    support.rmdir(other)
  end)

  it("refuses a malformed import line, naming it, and keeps what came before", function()
    local other = support.tmpdir()
    local good = '{"stream":"A-1","version":1,"id":"i-1","type":"X","data":{},"metadata":{},' ..
      '"recorded_at":"2026-01-01T00:00:00.000Z"}'
    local out, err, code = support.run({ "--data", other, "import" }, { stdin = good .. "\n{oops\n" })
    assert.equal(7, code)
    assert.matches("line 2", err)
    assert.same({ imported = 1, skipped = 0 }, decode(out))
    assert.equal(1, #support.lines((support.run { "--data", other, "read", "A-1" }), decode))
    local gap = good:gsub('"version":1', '"version":3'):gsub("i%-1", "i-3")
    out, err, code = support.run({ "--data", other, "import" }, { stdin = gap .. "\n" })
    assert.equal(4, code)
    assert.same({ imported = 0, skipped = 0 }, decode(out))
    assert.matches("line 1 %(A%-1, from version 3%): wrong expected version", err)
    support.rmdir(other)
  end)

  it("imports everything before the first bad line and nothing after it", function()
    local function ev(stream, version, id)
      return ('{"stream":"%s","version":%d,"id":"%s","type":"X","data":{},"metadata":{},' ..
              '"recorded_at":"2026-01-01T00:00:00.000Z"}'):format(stream, version, id)
    end
    local other = support.tmpdir()
    local text = table.concat({ ev("A-1", 1, "a1"), ev("B-1", 5, "b5"), ev("C-1", 1, "c1") }, "\n") .. "\n"
    local out, err, code = support.run({ "--data", other, "import" }, { stdin = text })
    assert.equal(4, code)
    assert.matches("line 2 %(B%-1, from version 5%): wrong expected version", err)
    assert.same({ imported = 1, skipped = 0 }, decode(out))
    local stored = support.lines((support.run { "--data", other, "events" }), decode)
    assert.same({ "A-1" }, { stored[1].stream, stored[2] and stored[2].stream })
    text = ev("D-1", 1, "d1") .. "\n" .. ev("D-1", 2, "d2") .. "\n{broken\n" .. ev("E-1", 1, "e1") .. "\n"
    out, err, code = support.run({ "--data", other, "import" }, { stdin = text })
    assert.equal(7, code)
    assert.matches("line 3:", err)
    assert.same({ imported = 2, skipped = 0 }, decode(out))
    assert.equal(3, #support.lines((support.run { "--data", other, "events" }), decode))
    local nul = ev("F-1\\u0000x", 1, "f1")
    out, err, code = support.run({ "--data", other, "import" }, { stdin = nul .. "\n" })
    assert.equal(7, code)
    assert.matches("NUL", err)
    assert.same({ imported = 0, skipped = 0 }, decode(out))
    support.rmdir(other)
  end)

  it("restores deleted streams from an export", function()
    ebb { "send", "Order", "o-1", "CreateOrder", '{"customer_id":"c"}' }
    assert.equal(0, select(3, ebb { "delete", "Order-o-1", "--reason", "gone" }))
    local exported = ebb { "export", "--raw" }
    local other = support.tmpdir()
    local out, err, code = support.run({ "--data", other, "import" }, { stdin = exported })
    assert.equal(0, code, err)
    assert.same({ imported = 2, skipped = 0 }, decode(out))
    assert.equal(exported, (support.run { "--data", other, "export", "--raw" }))
    local _, _, c2 = support.run { "--data", other, "--aggregates", support.root .. "/aggregates",
                                   "send", "Order", "o-1", "ConfirmOrder" }
    assert.equal(9, c2)
    support.rmdir(other)
  end)

  it("takes its directories from EBB_* variables, options as --opt=value, and --metadata", function()
    local q = support.quote
    local store = support.store_for(dir)
    local cmd = "cd /tmp && EBB_DATA=" .. q(dir) .. " EBB_AGGREGATES=" .. q(support.root .. "/aggregates") ..
      (store and " EBB_STORE=" .. q(store) or "") ..
      " EBB_DURABILITY=normal " .. q(support.ebb) ..
      [[ send Order o-1 CreateOrder '{"customer_id":"c"}' --metadata='{"user_id":"u-1","tenant":"t"}']]
    local p = assert(io.popen(cmd, "r"))
    local r = decode(p:read("a"))
    assert.is_true(p:close())
    assert.same({ "u-1", "t" }, { r.events[1].metadata.user_id, r.events[1].metadata.tenant })
    assert.equal("u-1", support.lines(ebb { "read", "Order-o-1" }, decode)[1].metadata.user_id)
    local out, err, code = support.run { "--data", dir, "--durability", "sometimes", "events" }
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("%-%-durability must be full or normal", err)
    out, err, code = ebb { "send", "Order", "o-1", "AddItem", "{}", "--metadata", "[1]" }
    assert.equal(7, code)
    assert.equal("", out)
    assert.matches("command metadata must be a JSON object", err)
  end)

  it("prints help for every command", function()
    local out, _, code = support.run { "--help" }
    assert.equal(0, code)
    for _, name in ipairs { "send", "read", "events", "state", "check", "export", "import" } do
      assert.matches("ebb " .. name, out)
      local h, _, c = support.run { "help", name }
      assert.equal(0, c)
      assert.matches("^Usage: ebb " .. name, h)
    end
  end)
end)
