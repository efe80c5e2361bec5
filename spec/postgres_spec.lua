-- Several daemons on one PostgreSQL store (EBB_TEST_STORE=postgres, under
-- scripts/pg; scripts/test runs it in its PostgreSQL pass): commands on one
-- aggregate sent to two daemons lose no update, positions stay gap-free
-- across writers, the CLI writes beside running daemons, and `ebb check`
-- reports the schema. Nothing here runs on the SQLite pass.
local core = require "ebb.core"
local support = require "support"
local daemon = require "daemon_support"

if support.store_kind ~= "postgres" then return end

describe("several daemons on one PostgreSQL store", function()
  local store, ds, dirs

  before_each(function()
    dirs = { support.tmpdir() }
    store = support.store_for(dirs[1])
    ds = {}
    for i = 1, 2 do
      ds[i] = daemon.start { store = store }
      dirs[#dirs + 1] = ds[i].data
      assert.is_not_nil(ds[i].url, "daemon " .. i .. " did not start: " .. ds[i]:logs())
    end
  end)

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

  it("reports the store and its schema version in ebb check", function()
    local out, err, code = support.run { "--data", dirs[1], "--store", store, "--aggregates",
      support.root .. "/aggregates", "--projections", dirs[1], "check" }
    assert.equal(0, code, err)
    assert.same({ backend = "postgres", schema_version = 2 }, core.json_decode(out).store)
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

  it("refuses a store setting that names no backend", function()
    local r, msg, code = core.open { data = support.tmpdir(), store = "mysql://x",
                                     aggregates = support.root .. "/aggregates" }
    assert.is_nil(r)
    assert.equal("bad_request", code)
    assert.matches("store must be sqlite or a PostgreSQL connection URI", msg)
  end)
end)

describe("the PostgreSQL store across a server restart", function()
  local function restart_server()
    local bin, data = os.getenv("EBB_TEST_PG_BIN"), os.getenv("EBB_TEST_PG_DATA")
    assert(bin and data, "run under scripts/pg")
    -- the server is not ours to instrument: no sanitizer runtimes preloaded into it
    local as = "env -u LD_PRELOAD " ..
      (io.popen("id -u"):read("l") == "0" and "runuser -u postgres -- " or "")
    local log = data:gsub("/[^/]*$", "") .. "/server.log"
    local ok = os.execute(as .. support.quote(bin .. "/pg_ctl") .. " -D " .. support.quote(data) ..
      " -l " .. support.quote(log) .. " -w -t 60 -m fast restart > /dev/null")
    assert(ok, "the PostgreSQL server did not restart: " .. support.read(log))
  end

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
end)
