-- Several daemons on one PostgreSQL store (EBB_TEST_STORE=postgres, under
-- scripts/pg; scripts/test runs it in its PostgreSQL pass): commands on one
-- aggregate sent to two daemons lose no update, positions stay gap-free
-- across writers, the CLI writes beside running daemons, and `ebb check`
-- reports the schema. Nothing here runs on the SQLite pass.
local core = require "ebb.core"
local json = require "cjson"
local support = require "support"
local daemon = require "daemon_support"
local socket = require "socket"

if support.store_kind ~= "postgres" then
  pending("several daemons on one PostgreSQL store: in scripts/test's PostgreSQL pass")
  return
end

-- Two daemons on a new store, started with args: the store, the daemons,
-- and the directories to remove (the store's first, then the daemons').
local function start_two(args)
  local dirs = { support.tmpdir() }
  local store = support.store_for(dirs[1])
  local ds = {}
  for i = 1, 2 do
    ds[i] = daemon.start { store = store, args = args }
    dirs[#dirs + 1] = ds[i].data
    assert.is_not_nil(ds[i].url, "daemon " .. i .. " did not start: " .. ds[i]:logs())
  end
  return store, ds, dirs
end

-- What psql prints for text on store (its messages too), without the trailing newline.
local function sql_value(store, text)
  local p = assert(io.popen("env -u LD_PRELOAD psql -At -X " .. support.quote(store) .. " -c " ..
                            support.quote(text) .. " 2>&1"))
  local v = p:read("a")
  p:close()
  return (v:gsub("%s+$", ""))
end

describe("several daemons on one PostgreSQL store", function()
  local store, ds, dirs

  before_each(function() store, ds, dirs = start_two() end)

  after_each(function()
    for _, d in ipairs(ds) do d:stop() end
    for _, dir in ipairs(dirs) do support.rmdir(dir) end
  end)

  local function all_events()
    local rt = assert(core.open { data = dirs[1], store = store, aggregates = support.root .. "/aggregates" })
    local list, after = {}, 0
    while true do
      local page = assert(rt:events { after = after, limit = 1000 })
      if #page == 0 then break end
      for _, e in ipairs(page) do list[#list + 1] = e end
      after = page[#page].position
    end
    local head = rt:head()
    rt:close()
    return list, head
  end

  it("lose no update on a shared stream and keep positions 1..head without a gap", function()
    assert.equal(200, (ds[1]:command("BankAccount", "shared", "OpenAccount", { owner = "all" })))
    local writers, rounds = 8, 12 -- per daemon
    local n = writers * #ds
    for i = 1, n do
      local d = ds[(i - 1) % #ds + 1]
      assert.equal(200, (d:command("BankAccount", "own-" .. i, "OpenAccount", { owner = "w" .. i })))
    end
    local sent, statuses = {}, {}
    daemon.load(ds, n, function(i)
      sent[i] = (sent[i] or 0) + 1
      if sent[i] > 2 * rounds then return nil end
      -- every other command goes to the shared account, the rest to the writer's own
      local id = sent[i] % 2 == 0 and "shared" or ("own-" .. i)
      return { aggregate = "BankAccount", id = id, type = "Deposit", data = { amount = 1 } }
    end, function(_, status, answer)
      statuses[status] = (statuses[status] or 0) + 1
      if status ~= 200 then print(status, answer and answer.error and answer.error.message) end
    end)
    assert.same({ [200] = 2 * rounds * n }, statuses)

    -- Every decision saw the state before it: the balances the shared stream
    -- recorded run 1, 2, 3, ... with no repeat (a lost update repeats one).
    local events, head = all_events()
    local shared, own = {}, {}
    for i, e in ipairs(events) do
      assert.equal(i, e.position)
      if e.stream == "BankAccount-shared" and e.type == "MoneyDeposited" then
        shared[#shared + 1] = e.data.balance
      elseif e.type == "MoneyDeposited" then
        own[e.stream] = (own[e.stream] or 0) + 1
      end
    end
    assert.equal(#events, head)
    assert.equal(1 + n + 2 * rounds * n, head)
    assert.equal(rounds * n, #shared)
    for k, balance in ipairs(shared) do assert.equal(k, balance) end
    for i = 1, n do assert.equal(rounds, own["BankAccount-own-" .. i]) end
    -- Both daemons answer the same state.
    for _, d in ipairs(ds) do
      local status, stream = d:get("/streams/BankAccount-shared")
      assert.equal(200, status)
      assert.equal(1 + rounds * n, #stream.events)
    end
  end)

  it("let the CLI write beside running daemons, and the daemons see it", function()
    assert.equal(200, (ds[1]:command("BankAccount", "cli", "OpenAccount", { owner = "c" })))
    local out, err, code = support.run { "--data", dirs[1], "--store", store, "--aggregates",
      support.root .. "/aggregates", "send", "BankAccount", "cli", "Deposit", '{"amount":5}' }
    assert.equal(0, code, err)
    assert.equal(2, core.json_decode(out).version)
    local status, answer = ds[2]:command("BankAccount", "cli", "Deposit", { amount = 1 })
    assert.equal(200, status)
    assert.same({ 3, 6 }, { answer.version, answer.events[1].data.balance })
    -- the first daemon's cached state is behind now: it decides again
    status, answer = ds[1]:command("BankAccount", "cli", "Deposit", { amount = 1 })
    assert.equal(200, status)
    assert.same({ 4, 7 }, { answer.version, answer.events[1].data.balance })
  end)

  it("push every daemon's commits to subscribers on every daemon, in order", function()
    local subs = { ds[1]:subscribe("?after=0"), ds[2]:subscribe("?after=0") }
    for _, sub in ipairs(subs) do assert.equal(200, sub.status) end
    -- both daemons and the CLI write; nobody writes after that, so only a push
    -- (never a timer) can deliver the last events to the other daemon
    local n = 0
    for i = 1, 6 do
      local d = ds[(i - 1) % 2 + 1]
      assert.equal(200, (d:command("BankAccount", "push-" .. i, "OpenAccount", { owner = "p" })))
      n = n + 1
    end
    local _, err, code = support.run { "--data", dirs[1], "--store", store, "--aggregates",
      support.root .. "/aggregates", "send", "BankAccount", "push-cli", "OpenAccount", '{"owner":"c"}' }
    assert.equal(0, code, err)
    n = n + 1
    for k, sub in ipairs(subs) do
      local streams = {}
      for pos = 1, n do
        local ev = sub:next(60)
        assert(ev, "daemon " .. k .. "'s subscriber got no event " .. pos)
        assert.equal(pos, ev.json.position)
        streams[#streams + 1] = ev.json.stream
      end
      assert.equal("BankAccount-push-cli", streams[n])
      sub:close()
    end
    local status, health = ds[2]:get("/health")
    assert.equal(200, status)
    assert.equal("connected", health.connection)
  end)

  it("elect one leader, and hand the lock over when the leader is killed", function()
    local function leaders()
      local list = {}
      for i, d in ipairs(ds) do
        if d:alive() then
          local status, h = d:get("/health")
          assert.equal(200, status)
          if h.leader then list[#list + 1] = i end
        end
      end
      return list
    end
    local first = support.eventually(function()
      local l = leaders()
      return #l == 1 and l[1]
    end, 60, "one leader")
    assert.equal(1, #leaders()) -- never two
    -- Reactors run on the leader only: the other's wait.
    local function reactor_state(d)
      local status, r = d:get("/reactors/order_payment")
      assert.equal(200, status)
      return r.state
    end
    local other = first == 1 and 2 or 1
    assert.are_not.equal("standby", reactor_state(ds[first]))
    assert.equal("standby", reactor_state(ds[other]))
    ds[first]:signal("KILL")
    assert(ds[first]:wait(30))
    support.eventually(function()
      local l = leaders()
      return #l == 1 and l[1] == other
    end, 60, "the other daemon to take the leader lock")
    support.eventually(function() return reactor_state(ds[other]) ~= "standby" end, 60,
                       "the new leader's reactors to run")
    local _, _, metrics = ds[other]:get("/metrics")
    assert.matches("\nebb_leader 1\n", metrics)
  end)

  -- The daemon that is not the leader asks for the leader lock again and
  -- again; it must not wait for it inside a statement. A statement holds a
  -- snapshot while it waits, which keeps VACUUM (and the pruning of a page
  -- as it is read) from removing any row version deleted since, in every
  -- table of the cluster. Until schema 4 the position counter's row, updated
  -- at every commit, then piled up dead versions that every append and every
  -- head read walked through, and two daemons ran at half the speed of one.
  it("hold no snapshot while one waits for the leader lock", function()
    support.eventually(function()
      local n = 0
      for _, d in ipairs(ds) do
        local status, h = d:get("/health")
        if status == 200 and h.leader then n = n + 1 end
      end
      return n == 1 and sql_value(store, "SELECT count(*) FROM pg_stat_activity WHERE " ..
                                         "application_name = 'ebb leader'") == "2"
    end, 60, "one daemon to take the leader lock, the other to ask for it")
    -- a try takes a moment, every 500 ms: seen at most once in five samples
    local held = 0
    for _ = 1, 5 do
      if sql_value(store, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ebb leader' " ..
                          "AND backend_xmin IS NOT NULL") ~= "0" then
        held = held + 1
      end
      socket.sleep(0.2)
    end
    assert.is_true(held <= 1, "the waiting daemon's leader link held a snapshot in " .. held .. " of 5 samples")
  end)

  it("stop on SIGTERM with their store links open", function()
    for _, d in ipairs(ds) do
      support.eventually(function() return d:get("/health") == 200 end, 60, "the daemon to answer")
      d:signal("TERM")
    end
    -- a link's handles left open kept the loop, and the daemon, running for ever
    for i, d in ipairs(ds) do assert(d:wait(60), "daemon " .. i .. " did not stop") end
  end)

  -- A command on a stream the daemon has not cached reads it first. On
  -- PostgreSQL that read runs on the thread pool: a server that stops
  -- answering (here: a lock the read waits for) holds up that command only.
  -- Before, it ran on the loop, and /health, every other request and every
  -- answer waited with it.
  it("read a stream they have not cached off the loop: /health answers while that read waits", function()
    local d = ds[1]
    local q = support.quote
    local psql = "env -u LD_PRELOAD PGAPPNAME=ebb-spec-lock psql -q -X " .. q(store)
    local holder = assert(io.popen(psql .. " -c " ..
      q("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(600)") .. " > /dev/null 2>&1 & echo $!"))
    local holder_pid = holder:read("l")
    holder:close()
    local ok, why = pcall(function()
      support.eventually(function()
        return tonumber(sql_value(store, "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) " ..
          "WHERE a.application_name = 'ebb-spec-lock' AND l.mode = 'AccessExclusiveLock' AND l.granted"))
          == 1
      end, 60, "the lock on the events table")
      -- the command, sent; its answer is read once the lock is gone
      local c = daemon.connect(d, 120)
      local body = json.encode { aggregate = "bank_account", id = "cold-1", type = "OpenAccount",
                                 data = { owner = "o" } }
      assert(c:send("POST /commands HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" ..
        "Content-Length: " .. #body .. "\r\n\r\n" .. body))
      -- the read waits on the lock; the loop does not
      support.eventually(function()
        return sql_value(store, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' " ..
          "AND application_name <> 'ebb-spec-lock'"):match("^[1-9]")
      end, 60, "the daemon's read to wait for the lock")
      local status, health = d:get("/health", { timeout = 20 })
      assert.equal(200, status, "GET /health did not answer while a command's read waited")
      assert.equal("ok", health.status)
      -- the lock goes; the command goes on
      sql_value(store, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity " ..
                       "WHERE application_name = 'ebb-spec-lock'")
      local st, _, text = daemon.read_response(c)
      c:close()
      assert.equal(200, st, text)
      assert.equal(1, json.decode(text).version)
    end)
    os.execute("kill " .. holder_pid .. " 2>/dev/null")
    sql_value(store, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'ebb-spec-lock'")
    assert(ok, why)
  end)

  it("reports the store and its schema version in ebb check", function()
    local out, err, code = support.run { "--data", dirs[1], "--store", store, "--aggregates",
      support.root .. "/aggregates", "--projections", dirs[1], "check" }
    assert.equal(0, code, err)
    assert.same({ backend = "postgres", schema_version = 4 }, core.json_decode(out).store)
  end)
end)

describe("three daemons on one PostgreSQL store", function()
  it("lose no update with eight writers each, keep 1..head gap-free, and push the same order to all", function()
    local dir0 = support.tmpdir()
    local store = support.store_for(dir0)
    local ds, subs = {}, {}
    for i = 1, 3 do
      ds[i] = daemon.start { store = store }
      assert.is_not_nil(ds[i].url, "daemon " .. i .. " did not start: " .. ds[i]:logs())
      subs[i] = ds[i]:subscribe("?after=0")
      assert.equal(200, subs[i].status)
    end
    assert.equal(200, (ds[1]:command("BankAccount", "shared", "OpenAccount", { owner = "all" })))
    local n, rounds = 8 * #ds, 6
    for i = 1, n do
      assert.equal(200, (ds[(i - 1) % #ds + 1]:command("BankAccount", "own-" .. i, "OpenAccount",
        { owner = "w" .. i })))
    end
    local sent, statuses = {}, {}
    daemon.load(ds, n, function(i)
      sent[i] = (sent[i] or 0) + 1
      if sent[i] > 2 * rounds then return nil end
      local id = sent[i] % 2 == 0 and "shared" or ("own-" .. i)
      return { aggregate = "BankAccount", id = id, type = "Deposit", data = { amount = 1 } }
    end, function(_, status)
      statuses[status] = (statuses[status] or 0) + 1
    end)
    assert.same({ [200] = 2 * rounds * n }, statuses)
    local head = 1 + n + 2 * rounds * n
    -- every subscriber got positions 1..head in order, the same events
    local seen = {}
    for k, sub in ipairs(subs) do
      seen[k] = {}
      for pos = 1, head do
        local ev = sub:next(60)
        assert(ev, "daemon " .. k .. "'s subscriber got no event " .. pos)
        assert.equal(pos, ev.json.position)
        seen[k][pos] = ev.json.id
      end
      sub:close()
    end
    assert.same(seen[1], seen[2])
    assert.same(seen[1], seen[3])
    -- no lost update: the shared balance counts 1, 2, 3, ... in position order
    local rt = assert(core.open { data = dir0, store = store, aggregates = support.root .. "/aggregates" })
    assert.equal(head, rt:head())
    local balances, after = {}, 0
    while true do
      local page = assert(rt:events { after = after, limit = 1000 })
      if #page == 0 then break end
      for _, e in ipairs(page) do
        assert.equal(after + 1, e.position)
        after = e.position
        if e.stream == "BankAccount-shared" and e.type == "MoneyDeposited" then
          balances[#balances + 1] = e.data.balance
        end
      end
    end
    rt:close()
    assert.equal(head, after)
    assert.equal(rounds * n, #balances)
    for k, b in ipairs(balances) do assert.equal(k, b) end
    for _, d in ipairs(ds) do
      d:stop()
      support.rmdir(d.data)
    end
    support.rmdir(dir0)
  end)
end)

describe("projections on two daemons sharing a PostgreSQL store", function()
  it("follow the other daemon's commits, pushed", function()
    local dir0 = support.tmpdir()
    local store = support.store_for(dir0)
    local args = { "--projections", support.root .. "/projections" }
    local a = daemon.start { store = store, args = args }
    local b = daemon.start { store = store, args = args }
    assert.is_not_nil(a.url, a:logs())
    assert.is_not_nil(b.url, b:logs())
    assert.equal(200, (a:command("order", "x", "CreateOrder", { customer_id = "c-9" })))
    local status, answer = a:command("order", "x", "AddItem", { sku = "BOOK", qty = 1, price = 700 })
    assert.equal(200, status)
    local url = ("/projections/order_summary/get?id=x&after=%d"):format(answer.position)
    -- nothing is written on b: only the push moves its projection
    local order = support.eventually(function()
      local st, body = b:get(url)
      return st == 200 and body
    end, 60, "b's order_summary to show a's order")
    assert.same({ "x", "c-9", 700 }, { order.id, order.customer_id, order.total })
    a:stop()
    b:stop()
    support.rmdir(a.data)
    support.rmdir(b.data)
    support.rmdir(dir0)
  end)
end)

describe("export from SQLite, import into PostgreSQL", function()
  it("keeps the same events, byte for byte", function()
    local lite, pgdir = support.tmpdir(), support.tmpdir()
    local function ebb(dir, store, args, opts)
      local full = { "--data", dir, "--store", store, "--aggregates", support.root .. "/aggregates",
                     "--durability", "normal" }
      for _, a in ipairs(args) do full[#full + 1] = a end
      local out, err, code = support.run(full, opts)
      assert.equal(0, code, err)
      return out
    end
    ebb(lite, "sqlite", { "send", "BankAccount", "x", "OpenAccount", '{"owner":"\\u00e9 x"}' })
    ebb(lite, "sqlite", { "send", "BankAccount", "x", "Deposit", '{"amount":9223372036854775807}' })
    ebb(lite, "sqlite", { "send", "BankAccount", "y", "OpenAccount", '{"owner":"y","z":1,"a":2}' })
    local exported = ebb(lite, "sqlite", { "export" })
    assert.equal(3, select(2, exported:gsub("\n", "")))
    local pg = support.store_for(pgdir)
    assert.same({ imported = 3, skipped = 0 }, core.json_decode(ebb(pgdir, pg, { "import" }, { stdin = exported })))
    assert.equal(exported, ebb(pgdir, pg, { "export" }))
    -- again: nothing new
    assert.same({ imported = 0, skipped = 3 }, core.json_decode(ebb(pgdir, pg, { "import" }, { stdin = exported })))
    support.rmdir(lite)
    support.rmdir(pgdir)
  end)
end)

-- An append reads what deciding it needs without the position lock, and
-- takes the lock only in its commit's round trip (so another writer reads
-- and decides while one commits). Here another writer (a psql session) holds
-- the lock with a write of its own while the daemon's append reads: the
-- append waits at the lock with what it read now behind, and must still give
-- the answer the locked path would.
describe("an append on PostgreSQL while another writer holds the position lock", function()
  local dir, store, d
  local q = support.quote
  local function sql(text) return sql_value(store, text) end

  before_each(function()
    dir = support.tmpdir()
    store = support.store_for(dir)
    d = daemon.start { store = store }
    assert.is_not_nil(d.url, "the daemon did not start: " .. d:logs())
  end)

  after_each(function()
    d:stop()
    support.rmdir(dir)
  end)

  -- No row version of the store's is left for VACUUM to remove, so a long
  -- snapshot elsewhere in the cluster (a pg_dump, a report) costs an append
  -- nothing. Until schema 4 the position counter's row was updated at every
  -- commit, and while such a snapshot lived its dead versions piled up and
  -- every append and head read walked through them, slower with each commit.
  it("leaves no dead row behind while another session holds an old snapshot", function()
    local p = assert(io.popen("env -u LD_PRELOAD PGAPPNAME=ebb-spec-snapshot psql -q -X " .. q(store) ..
      " > /dev/null 2>&1", "w"))
    p:write("BEGIN ISOLATION LEVEL REPEATABLE READ;\nSELECT count(*) FROM events;\n")
    p:flush()
    support.eventually(function()
      return sql("SELECT backend_xmin IS NOT NULL FROM pg_stat_activity " ..
                 "WHERE application_name = 'ebb-spec-snapshot' " ..
                 "AND state = 'idle in transaction'") == "t"
    end, 60, "the other session's snapshot")
    for i = 1, 40 do
      assert.equal(200, (d:post("/streams/Snap-" .. i, { events = { { type = "Noted", data = {} } } })))
    end
    assert.equal(200, (d:command("BankAccount", "snap", "OpenAccount", { owner = "o" })))
    local out = sql("VACUUM (VERBOSE) ebb_head, events, commands")
    p:write("COMMIT;\n")
    p:close()
    local dead = 0
    for n in out:gmatch("(%d+) are dead but not yet removable") do dead = dead + tonumber(n) end
    assert.matches("are dead but not yet removable", out)
    assert.equal(0, dead, out)
  end)

  -- A session that takes the lock and writes event `id` into `stream`, and
  -- keeps its transaction open until commit() is called.
  local function intruder(stream, id)
    local p = assert(io.popen("env -u LD_PRELOAD PGAPPNAME=ebb-spec-intruder psql -q -X -v ON_ERROR_STOP=1 " ..
      q(store) .. " > /dev/null 2>&1", "w"))
    p:write("BEGIN;\nSELECT 1 FROM ebb_head WHERE id = 1 FOR UPDATE;\n" ..
      "INSERT INTO events (position, stream, version, id, type, schema, data, metadata, recorded_at, category) " ..
      "SELECT coalesce(max(position), 0) + 1, " .. "'" .. stream .. "', coalesce((SELECT max(version) FROM events " ..
      "WHERE stream = '" .. stream .. "'), 0) + 1, '" .. id .. "', 'Intruded', 1, '{}', '{}', " ..
      "'2026-12-03T00:00:00.000Z', '" .. stream:match("^[^-]*") .. "' FROM events;\n")
    p:flush()
    support.eventually(function()
      return sql("SELECT state FROM pg_stat_activity WHERE application_name = 'ebb-spec-intruder'")
        == "idle in transaction"
    end, 60, "the other writer to hold the lock")
    return function()
      p:write("COMMIT;\n")
      p:close()
    end
  end

  -- Sends body to path and waits until the daemon's commit waits for the lock.
  local function send_and_wait(path, body)
    local c = daemon.connect(d, 120)
    local text = json.encode(body)
    assert(c:send("POST " .. path .. " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" ..
      "Content-Length: " .. #text .. "\r\n\r\n" .. text))
    support.eventually(function()
      return sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' " ..
        "AND application_name <> 'ebb-spec-intruder' AND query LIKE '%FROM ebb_head WHERE id = 1 FOR UPDATE'") == "1"
    end, 60, "the daemon's commit to wait for the lock")
    return c
  end

  -- Race-1 at version 1; then, while another writer holds the lock with
  -- its event `id` in `stream`, body is sent to path; the other writer
  -- commits once the daemon waits for the lock. The daemon's answer.
  local function race(stream, id, path, body)
    assert.equal(200, (d:post("/streams/Race-1", { events = { { id = "r1", type = "Noted", data = {} } } })))
    local commit = intruder(stream, id)
    local c = send_and_wait(path, body)
    commit()
    local status, _, text = daemon.read_response(c)
    c:close()
    return status, json.decode(text)
  end

  it("places its events after the other writer's, and answers where they are", function()
    local status, r = race("Other-1", "other-1", "/commands", { aggregate = "BankAccount", id = "race-2",
      type = "OpenAccount", data = { owner = "o" }, command_id = "race-cmd" })
    assert.equal(200, status)
    -- position 2 is the other writer's; the append's events come after it
    assert.equal(3, r.position)
    assert.equal(3, r.events[1].position)
    assert.equal("1|Race-1|r1\n2|Other-1|other-1\n3|BankAccount-race-2|" .. r.events[1].id,
                 sql("SELECT string_agg(position || '|' || stream || '|' || id, E'\\n' ORDER BY position) FROM events"))
    assert.equal("3", sql("SELECT max(position) FROM events"))
    -- the command's record names the same positions
    assert.equal("3|3", sql("SELECT first_position || '|' || last_position FROM commands " ..
                                  "WHERE command_id = 'race-cmd'"))
  end)

  it("finds the stream it read moved: a wrong expected version is refused with the version now", function()
    local status, r = race("Race-1", "intruder-2", "/streams/Race-1", { expected_version = 1,
      events = { { id = "r2", type = "Noted", data = {} } } })
    assert.equal(409, status)
    assert.same({ "wrong_expected_version", 1, 2 }, { r.error.code, r.error.expected, r.error.actual })
    assert.equal("0", sql("SELECT count(*) FROM events WHERE id = 'r2'"))
    assert.equal("2", sql("SELECT max(position) FROM events"))
  end)

  it("finds the stream it read moved: an append at any version goes after the other writer's", function()
    local status, r = race("Race-1", "intruder-2", "/streams/Race-1",
      { events = { { id = "r3", type = "Noted", data = {} } } })
    assert.equal(200, status)
    assert.same({ 3, 3 }, { r.version, r.position })
    assert.equal("1|r1\n2|intruder-2\n3|r3",
                 sql("SELECT string_agg(version || '|' || id, E'\\n' ORDER BY version) FROM events " ..
                           "WHERE stream = 'Race-1'"))
  end)

  it("finds the event id it sends stored meanwhile: answered as the idempotent re-send it is", function()
    local status, r = race("Race-1", "same-id", "/streams/Race-1", { expected_version = 1,
      events = { { id = "same-id", type = "Intruded", data = {} } } })
    assert.equal(200, status)
    assert.same({ 2, 2 }, { r.version, r.position })
    assert.equal("1", sql("SELECT count(*) FROM events WHERE id = 'same-id'"))
  end)
end)

describe("the PostgreSQL store", function()
  it("refuses a server that does not answer with a clear error", function()
    local r, msg, code = core.open { data = support.tmpdir(), store = "postgresql://ebb@127.0.0.1:1/ebb",
                                     aggregates = support.root .. "/aggregates" }
    assert.is_nil(r)
    assert.equal("unavailable", code)
    assert.matches("cannot connect to the PostgreSQL store", msg)
  end)

  -- Schema 4 no longer writes ebb_head's position: the head is the largest
  -- position stored. A store of schema 3 is upgraded on open, and whatever
  -- its counter says, the next event goes right after the last one.
  it("upgrades a store of schema 3: positions go on after the last event, whatever the old counter says", function()
    local dir = support.tmpdir()
    local store = support.store_for(dir)
    local function open()
      return assert(core.open { data = dir, store = store, aggregates = support.root .. "/aggregates" })
    end
    local rt = open()
    assert(rt:append("Up-1", "no_stream", { { type = "Noted", data = { n = 1 } },
                                            { type = "Noted", data = { n = 2 } } }))
    rt:close()
    sql_value(store, "UPDATE ebb_head SET position = 999; DELETE FROM ebb_schema WHERE version = 4")
    rt = open()
    local r = assert(rt:append("Up-2", "no_stream", { { type = "Noted", data = { n = 3 } } }))
    assert.equal(3, r.position)
    assert.equal(3, rt:head())
    rt:close()
    assert.equal("4", sql_value(store, "SELECT max(version) FROM ebb_schema"))
    support.rmdir(dir)
  end)

  it("refuses a store setting that names no backend", function()
    local r, msg, code = core.open { data = support.tmpdir(), store = "mysql://x",
                                     aggregates = support.root .. "/aggregates" }
    assert.is_nil(r)
    assert.equal("bad_request", code)
    assert.matches("store must be sqlite or a PostgreSQL connection URI", msg)
  end)
end)

-- pg_ctl ACTION (stop, start, restart) on scripts/pg's cluster, with the options it started with.
local function pg_ctl(action)
  local bin, data = os.getenv("EBB_TEST_PG_BIN"), os.getenv("EBB_TEST_PG_DATA")
  assert(bin and data, "run under scripts/pg")
  -- the server is not ours to instrument: no sanitizer runtimes preloaded into it
  local as = "env -u LD_PRELOAD " ..
    (io.popen("id -u"):read("l") == "0" and "runuser -u postgres -- " or "")
  local log = data:gsub("/[^/]*$", "") .. "/server.log"
  local ok = os.execute(as .. support.quote(bin .. "/pg_ctl") .. " -D " .. support.quote(data) ..
    " -l " .. support.quote(log) .. " -w -t 60 -m fast " ..
    (action == "start" and ("-o " .. support.quote(assert(os.getenv("EBB_TEST_PG_OPTS"))) .. " ") or "") ..
    action .. " > /dev/null")
  assert(ok, "pg_ctl " .. action .. " failed: " .. support.read(log))
end

describe("the PostgreSQL store across a server restart", function()
  local function restart_server() pg_ctl("restart") end

  it("fails the call in flight as unavailable, never as stored, and reconnects", function()
    local dir = support.tmpdir()
    local rt = assert(core.open { data = dir, aggregates = support.root .. "/aggregates" })
    assert(rt:append("R-1", "no_stream", { { type = "A", data = { n = 1 }, id = "r-a" } }))
    restart_server()
    local acked = {}
    for i = 1, 3 do
      local id = "r-b" .. i
      local r, msg, code = rt:append("R-1", "any", { { type = "B", data = { n = i }, id = id } })
      if r then
        acked[#acked + 1] = id
      else
        assert.equal("unavailable", code, msg)
        -- a re-send of the same event is idempotent once the store is back
        assert(rt:append("R-1", "any", { { type = "B", data = { n = i }, id = id } }))
        acked[#acked + 1] = id
      end
    end
    local ids = {}
    for _, e in ipairs(assert(rt:read("R-1"))) do ids[#ids + 1] = e.id end
    assert.same({ "r-b1", "r-b2", "r-b3" }, acked)
    assert.same({ "r-a", "r-b1", "r-b2", "r-b3" }, ids)
    assert.equal(4, rt:head())
    rt:close()
    support.rmdir(dir)
  end)

  it("answers a command in flight 503 or 200, never a false 200, and serves again after", function()
    local d = daemon.start {}
    assert.equal(200, (d:command("BankAccount", "r", "OpenAccount", { owner = "r" })))
    restart_server()
    local ok = 0
    for _ = 1, 4 do
      local status, answer = d:command("BankAccount", "r", "Deposit", { amount = 1 },
        { command_id = "dep-" .. ok })
      if status == 200 then ok = ok + 1
      else assert.equal(503, status, answer and answer.error and answer.error.message) end
    end
    local status, stream = d:get("/streams/BankAccount-r")
    assert.equal(200, status)
    assert.equal(1 + ok, #stream.events)
    assert.equal(ok, stream.events[#stream.events].data.balance)
    assert.is_true(ok >= 3)
    d:stop()
    support.rmdir(d.data)
  end)

  it("answers 503 while the server is down, shows it in /health and /metrics, and serves again after", function()
    local d = daemon.start {}
    assert.equal(200, (d:command("BankAccount", "down", "OpenAccount", { owner = "d" })))
    support.eventually(function()
      local _, h = d:get("/health")
      return h.connection == "connected" and h.leader == true
    end, 60, "the daemon to connect and lead")
    pg_ctl("stop")
    local ok, stopped = pcall(function()
      support.eventually(function()
        local _, health = d:get("/health")
        return health.connection == "reconnecting" and health.leader == false
      end, 60, "/health to show the lost connection")
      local _, health = d:get("/health")
      assert.is_string(health.connection_error)
      for i = 1, 3 do
        local status, answer = d:command("BankAccount", "down", "Deposit", { amount = 1 },
          { command_id = "down-" .. i })
        assert.equal(503, status)
        assert.equal("unavailable", answer.error.code)
      end
      local _, _, metrics = d:get("/metrics")
      assert.matches("\nebb_store_connected 0\n", metrics)
      assert.matches("\nebb_leader 0\n", metrics)
    end)
    pg_ctl("start")
    assert(ok, stopped)
    -- back: the writer reconnects on its next batch, the links after their pause
    local last
    local back, why = pcall(support.eventually, function()
      local status, answer = d:command("BankAccount", "down", "Deposit", { amount = 1 }, { command_id = "up" })
      last = status .. " " .. tostring(answer and answer.error and answer.error.message)
      return status == 200
    end, 60, "a command to succeed again")
    assert(back, tostring(why) .. " (last answer: " .. tostring(last) .. ")")
    support.eventually(function()
      local _, health = d:get("/health")
      return health.connection == "connected" and health.leader == true and health.status == "ok"
    end, 60, "/health to show the store connected again")
    local _, _, metrics = d:get("/metrics")
    assert.matches("\nebb_store_connected 1\n", metrics)
    assert.matches("\nebb_store_reconnects_total [1-9]", metrics)
    local status, stream = d:get("/streams/BankAccount-down")
    assert.equal(200, status)
    assert.equal(2, #stream.events) -- nothing answered 503 was stored
    d:stop()
    support.rmdir(d.data)
  end)
end)

describe("publishing to NATS with several daemons on one PostgreSQL store", function()
  local ns = require "nats_support"
  local n, ds, dirs

  before_each(function()
    n = ns.new()
    ds, dirs = select(2, start_two { "--nats", n.url })
  end)

  after_each(function()
    for _, d in ipairs(ds) do d:stop() end
    n:close()
    for _, dir in ipairs(dirs) do support.rmdir(dir) end
  end)

  it("publish from the leader only; the next leader goes on from the stream's last message, each event once", function()
    local function health(d)
      local status, h = d:get("/health")
      assert.equal(200, status)
      return h
    end
    local leader = support.eventually(function()
      local a, b = health(ds[1]), health(ds[2])
      if a.leader ~= b.leader and a.nats.state == (a.leader and "live" or "inactive")
          and b.nats.state == (b.leader and "live" or "inactive") then
        return a.leader and 1 or 2
      end
    end, 60, "one leader publishing, the other inactive")
    local other = leader == 1 and 2 or 1
    -- commands on both daemons; the leader publishes them all
    for i = 1, 20 do ns.open(ds[i % 2 + 1], "pg-" .. i) end
    ns.caught_up(ds[leader])
    ns.assert_stream_is_store(ds[leader], n)
    assert.equal(20, ns.metric(ds[leader], "ebb_nats_published_total"))
    assert.equal(0, ns.metric(ds[other], "ebb_nats_published_total"))
    assert.equal("inactive", health(ds[other]).nats.state)
    -- The leader dies; the other, whose own checkpoint is at 0, takes over
    -- and resumes after the stream's last Ebb-Position: nothing again.
    ds[leader]:signal("KILL")
    assert(ds[leader]:wait(30))
    for i = 21, 30 do ns.open(ds[other], "pg-" .. i) end
    ns.caught_up(ds[other])
    ns.assert_stream_is_store(ds[other], n)
    assert.equal(10, ns.metric(ds[other], "ebb_nats_published_total"))
    assert.equal(0, ns.metric(ds[other], "ebb_nats_republished_total"))
  end)
end)
