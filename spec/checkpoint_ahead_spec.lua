-- A projection whose checkpoint is ahead of the store (an older backup of
-- the store restored, or commits lost in an OS crash at durability normal) has seen
-- events the store no longer holds: it is rebuilt, saying why in its status
-- and the log, and never answers the lost data again.
local support = require "support"
local daemon = require "daemon_support"

local function int(x) return ("%d"):format(x) end

local eventually = support.eventually

local function live(d, name, position)
  return eventually(function()
    local st, s = d:get("/projections/" .. name)
    return st == 200 and s.state == "live" and s.position >= position and s
  end, 15, name .. " to be live at " .. position)
end

local null = require("cjson").null

-- The order the read model answers, or null.
local function get(d, id, after)
  local st, row = d:get("/projections/order_summary/get?id=" .. id .. (after and ("&after=" .. int(after)) or ""))
  assert(st == 200, "query failed: " .. tostring(st))
  return row
end

local PROJECTIONS = { "--projections", support.root .. "/projections" }

local function order(d, id, customer)
  local st, answer = d:command("order", id, "CreateOrder", { customer_id = customer })
  assert(st == 200, "command failed: " .. tostring(st))
  return answer.position
end

describe("a projection checkpoint ahead of the store", function()
  local data, backup, d
  before_each(function()
    data, backup = support.tmpdir(), support.tmpdir()
    d = daemon.start({ data = data, args = PROJECTIONS })
    order(d, "a", "c-1")
    d:stop()
    support.backup_store(data, backup) -- the store with one event
    d = daemon.start({ data = data, args = PROJECTIONS })
    order(d, "b", "c-2")
    local last = order(d, "c", "c-3")
    live(d, "order_summary", last)
    assert.are.equal("c", get(d, "c").id)
    d:stop()
    support.restore_store(backup, data) -- back to one event; the read model has seen three
  end)
  after_each(function()
    d:stop()
    support.rmdir(data)
    support.rmdir(backup)
  end)

  it("past the head: is rebuilt, says why, and projects new events at the reused positions", function()
    d = daemon.start({ data = data, args = PROJECTIONS })
    local s = live(d, "order_summary", 1)
    assert.matches("checkpoint %(position 3%) is ahead of the store's head %(1%)", s.rebuild_reason)
    assert.are.equal(1, s.position)
    assert.matches("projection read model is ahead of the store: rebuilding", d:logs())
    assert.are.equal(null, get(d, "c"))
    local pos = order(d, "z", "c-9") -- position 2 again, another event
    assert.are.equal(2, pos)
    local st, z = d:get("/projections/order_summary/get?id=z&after=" .. int(pos))
    assert.are.equal(200, st)
    assert.are.equal("c-9", z.customer_id)
    assert.are.equal(null, get(d, "b"))
    -- Once rebuilt, a restart keeps the read model.
    d:stop()
    d = daemon.start({ data = data, args = PROJECTIONS })
    s = live(d, "order_summary", 2)
    assert.are.equal(null, s.rebuild_reason)
    -- (the example reactor says its own checkpoint is ahead: it faults rather than issue again)
    assert.is_nil(d:logs():find("projection read model is ahead of the store", 1, true))
    assert.are.equal("z", get(d, "z").id)
  end)

  it("behind the head but on other events: the fingerprint no longer matches, and it is rebuilt", function()
    -- Other events take positions 2..4 before the daemon starts again.
    local cli = support.cli(data)
    for _, id in ipairs { "x", "y", "w" } do
      local _, err, code = cli("send", "Order", id, "CreateOrder", '{"customer_id":"c-' .. id .. '"}')
      assert.are.equal(0, code, err)
    end
    d = daemon.start({ data = data, args = PROJECTIONS })
    local s = live(d, "order_summary", 4)
    assert.matches("the event at position 3 is event .*, not .* as when the read model saw it",
                   s.rebuild_reason)
    assert.are.equal(null, get(d, "c"))
    assert.are.equal("w", get(d, "w", 4).id)
    assert.are.equal("a", get(d, "a").id)
  end)
end)
