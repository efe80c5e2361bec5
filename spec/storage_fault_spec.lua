-- Storage faults under ebb serve, injected by the test-only fault VFS
-- (runtime/store/fault_vfs.c, EBB_TEST_FAULTS): a failed fsync stops the writer
-- for good (it is never retried and trusted), a full disk fails the batch
-- and writes resume once there is space; no command is ever answered 200
-- without its events on disk, and nothing acknowledged is lost.
local support = require "support"
local daemon = require "daemon_support"

-- SQLite only (scripts/test lists the exclusions): the fault VFS wraps
-- SQLite's file; PostgreSQL's faults (the server stopped during writes, a
-- dropped connection) are in postgres_spec.
if support.store_kind ~= "sqlite" then
  pending("storage faults: SQLite's fault VFS (runtime/store/fault_vfs.c); PostgreSQL's are in postgres_spec")
  return
end

local function deposit(d, id, n)
  return d:command("bank_account", id, "Deposit", { amount = n })
end

-- Every event of the store, paged by next.
local function all_events(d)
  local out, after = {}, 0
  repeat
    local st, page, text = d:get("/events?after=" .. after .. "&limit=500")
    assert.are.equal(200, st, text)
    for _, e in ipairs(page.events) do out[#out + 1] = e end
    after = math.tointeger(page.next) or after
  until #page.events == 0
  return out
end

describe("storage faults", function()
  local d
  after_each(function() if d then d:stop() end d = nil end)

  it("after a failed fsync, the writer takes no more writes and /health says why (503)", function()
    local data = support.tmpdir()
    local toggle = data .. ".toggle"
    d = daemon.start { data = data, durability = "full", env = "EBB_TEST_FAULTS=toggle=" .. toggle }
    assert.are.equal(200, (d:command("bank_account", "a", "OpenAccount", { owner = "x" })))
    assert.are.equal(200, (deposit(d, "a", 5)))
    support.write(toggle, "eio")
    local st, ans = deposit(d, "a", 7)
    assert.is_true(st >= 500, "a command whose fsync failed must not be acknowledged: " .. st)
    assert.are.equal("storage_error", ans.error.code)
    -- The disk "works" again, but what it lost is not known: the writer
    -- must not trust it, whatever the next fsync would say.
    os.remove(toggle)
    st, ans = deposit(d, "a", 11)
    assert.are.equal(503, st)
    assert.are.equal("unavailable", ans.error.code)
    assert.matches("fsync", ans.error.message)
    local hst, health = d:get("/health")
    assert.are.equal(503, hst)
    assert.are.equal("failed", health.status)
    assert.are.equal("failed", health.store)
    assert.matches("fsync of the store failed", health.reason)
    -- A raw append is refused the same way.
    st = d:post("/streams/Raw-1", { events = { { type = "X", data = {} } } })
    assert.are.equal(503, st)
    d:stop()
    -- A restart recovers what the disk holds: the acknowledged events, whole.
    d = daemon.start { data = data, durability = "full" }
    local events = all_events(d)
    assert.are.equal(2, #events)
    assert.are.equal("AccountOpened", events[1].type)
    assert.are.equal(5, events[2].data.amount)
    assert.are.equal(200, (deposit(d, "a", 13)))
    local _, h = d:get("/health")
    assert.are.equal("ok", h.status)
  end)

  it("on a full disk the batch fails with storage_error, /health says so, and writes resume", function()
    local data = support.tmpdir()
    local toggle = data .. ".toggle"
    d = daemon.start { data = data, durability = "full", env = "EBB_TEST_FAULTS=toggle=" .. toggle }
    assert.are.equal(200, (d:command("bank_account", "b", "OpenAccount", { owner = "x" })))
    support.write(toggle, "enospc")
    for i = 1, 3 do
      local st, ans = deposit(d, "b", i)
      assert.are.equal(500, st)
      assert.are.equal("storage_error", ans.error.code)
      assert.matches("full", ans.error.message)
    end
    local st, ans = d:post("/streams/Raw-1", { expected_version = 0, events = { { type = "X", data = {} } } })
    assert.are.equal(500, st)
    assert.are.equal("storage_error", ans.error.code)
    local hst, health = d:get("/health")
    assert.are.equal(200, hst)
    assert.are.equal("degraded", health.status)
    assert.are.equal("failing", health.store)
    assert.matches("full", health.reason)
    os.remove(toggle)
    assert.are.equal(200, (deposit(d, "b", 100)))
    st = d:post("/streams/Raw-1", { expected_version = 0, events = { { type = "X", data = {} } } })
    assert.are.equal(200, st)
    local _, h = d:get("/health")
    assert.are.equal("ok", h.status)
    assert.are.equal("ok", h.store)
    d:stop()
    d = daemon.start { data = data, durability = "full" }
    local events = all_events(d)
    assert.are.equal(3, #events)
    for i, e in ipairs(events) do assert.are.equal(i, e.position) end
    assert.are.equal(100, events[2].data.amount)
    local _, state = d:get("/aggregates/bank_account/b")
    assert.are.equal(100, state.state.balance)
  end)

  it("a failed fsync in a checkpoint stops the writer, and the WAL is never copied after it", function()
    -- At normal a commit does not fsync: the first fsync is the idle
    -- checkpoint's, and that is the one that fails.
    local data = support.tmpdir()
    local toggle = data .. ".toggle"
    d = daemon.start { data = data, durability = "normal", env = "EBB_TEST_FAULTS=toggle=" .. toggle }
    support.write(toggle, "eio")
    assert.are.equal(200, (d:command("bank_account", "c", "OpenAccount", { owner = "x" })))
    for i = 1, 20 do assert.are.equal(200, (deposit(d, "c", i))) end
    local health = support.eventually(function()
      local st, h = d:get("/health")
      return st == 503 and h
    end, 60, "/health to report the failed fsync")
    assert.are.equal("failed", health.status)
    assert.matches("fsync of the store failed", health.reason)
    local st, ans = deposit(d, "c", 99)
    assert.are.equal(503, st)
    assert.are.equal("unavailable", ans.error.code)
    -- The disk "works" again: neither an idle checkpoint nor the one SQLite
    -- runs when its last connection closes may copy the distrusted WAL into
    -- the database.
    local before = support.read(data .. "/events.db")
    os.remove(toggle)
    require("socket").sleep(0.5)
    assert.is_true(before == support.read(data .. "/events.db"), "events.db changed after the failed fsync")
    d:stop()
    assert.is_true(before == support.read(data .. "/events.db"), "events.db changed at shutdown")
    -- What a restart finds is whole: positions without a gap, and writes work.
    d = daemon.start { data = data, durability = "normal" }
    local events = all_events(d)
    for i, e in ipairs(events) do assert.are.equal(i, e.position) end
    assert.are.equal(200, (d:command("bank_account", "c2", "OpenAccount", { owner = "y" })))
  end)
end)
