-- The follower projections (and reactors) share: events given to a consumer
-- of the global order carry aggregate_id, the id part of their stream.
local support = require "support"
local daemon = require "daemon_support"

local eventually = support.eventually

describe("events given to projections", function()
  local d, dir
  after_each(function()
    if d then d:stop() end
    d = nil
    support.rmdir(dir)
  end)

  it("carry aggregate_id: the stream's id part (after the first '-'), none without one", function()
    dir = support.tmpdir()
    support.write(dir .. "/ids.lua", [[
local p = { name = "ids", version = 1, from = { "Order", "Plain", "Odd" } }
function p.setup(db) db:exec("CREATE TABLE seen (stream TEXT, aggregate_id TEXT)") end
local function seen(db, e) db:exec("INSERT INTO seen VALUES (?, ?)", e.stream, e.aggregate_id) end
p.on = { OrderCreated = seen, Noted = seen }
p.queries = { all = function(db) return db:rows("SELECT stream, aggregate_id FROM seen ORDER BY rowid") end }
return p
]])
    d = daemon.start({ args = { "--projections", dir } })
    assert.are.equal(200, (d:command("order", "o-1", "CreateOrder", { customer_id = "c" })))
    assert.are.equal(200, (d:post("/streams/Odd-a-b-c", { events = { { type = "Noted", data = {} } } })))
    local st, last = d:post("/streams/Plain", { events = { { type = "Noted", data = {} } } })
    assert.are.equal(200, st)
    local rows = eventually(function()
      local s, r = d:get(("/projections/ids/all?after=%d"):format(last.position))
      return s == 200 and #r == 3 and r
    end, 15, "the projection to see three events")
    assert.are.same({ "Order-o-1", "o-1" }, { rows[1].stream, rows[1].aggregate_id })
    assert.are.same({ "Odd-a-b-c", "a-b-c" }, { rows[2].stream, rows[2].aggregate_id })
    assert.are.equal("Plain", rows[3].stream)
    assert.are.equal(require("cjson").null, rows[3].aggregate_id) -- a NULL column
  end)
end)
