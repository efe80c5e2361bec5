-- Publishing to NATS JetStream against a real nats-server (Debian's 2.9),
-- started here (spec/nats_support.lua) on a free loopback port with
-- JetStream and a temporary store directory, killed and restarted as each
-- spec needs. The stream is read back by ebb-nats-read
-- (scripts/nats_read.c, libnats, nothing of ebb's). Every wait is for a
-- condition, with support.eventually's generous bound.
local socket = require "socket"
local json = require "cjson"
local support = require "support"
local daemon = require "daemon_support"


local ns = require "nats_support"
local new_nats, caught_up, metric, open, run = ns.new, ns.caught_up, ns.metric, ns.open, ns.run
local assert_stream_is_store = ns.assert_stream_is_store
local q = support.quote

local function nats_state(d)
  local h = ns.health(d)
  return h and h.nats
end

describe("the nats settings", function()
  it("come from flags, the environment and the config file, with passwords masked", function()
    local dir = support.tmpdir()
    local function check(args, env)
      local all = { "check", "--data", dir .. "/data", "--aggregates", support.root .. "/aggregates" }
      for _, a in ipairs(args) do all[#all + 1] = a end
      local out, err, code = run(all, env)
      assert.are.equal(0, code, err)
      return json.decode(out).config
    end
    local c = check {}
    assert.are.same({ value = "", source = "default" }, c.nats)
    assert.are.same({ value = "EBB", source = "default" }, c.nats_stream)
    assert.are.same({ value = "ebb", source = "default" }, c.nats_subject_prefix)
    assert.are.same({ value = "", source = "default" }, c.nats_from)
    c = check({ "--nats", "nats://u:secret@127.0.0.1:4222,nats://v:other@127.0.0.1:4223" })
    assert.are.same({ value = "nats://u:(set)@127.0.0.1:4222,nats://v:(set)@127.0.0.1:4223", source = "flag" }, c.nats)
    c = check({}, "EBB_NATS_STREAM=ORDERS EBB_NATS_FROM=Order,AccountOpened")
    assert.are.same({ value = "ORDERS", source = "env" }, c.nats_stream)
    assert.are.same({ value = "Order,AccountOpened", source = "env" }, c.nats_from)
    support.write(dir .. "/c.lua", "nats_subject_prefix = 'app.events'\n")
    c = check { "--config", dir .. "/c.lua" }
    assert.are.same({ value = "app.events", source = "file" }, c.nats_subject_prefix)
    support.rmdir(dir)
  end)

  it("refuses a stream name or a prefix NATS cannot take", function()
    local data = support.tmpdir()
    for _, case in ipairs {
      { { "--nats-stream", "a.b" }, "nats_stream must be a JetStream stream name" },
      { { "--nats-subject-prefix", "ebb.*" }, "nats_subject_prefix must be NATS subject tokens" },
      { { "--nats-subject-prefix", "ebb." }, "nats_subject_prefix must be NATS subject tokens" },
    } do
      local args = { "serve", "--data", data, "--listen", "127.0.0.1:0", "--nats", "nats://127.0.0.1:1" }
      for _, a in ipairs(case[1]) do args[#args + 1] = a end
      local _, err, code = run(args)
      assert.are_not.equal(0, code)
      support.contains(err, case[2])
    end
    support.rmdir(data)
  end)
end)

describe("publishing to NATS JetStream", function()
  local n, d, data

  before_each(function()
    n = new_nats()
    data = support.tmpdir()
  end)

  after_each(function()
    if d then d:stop() end
    d = nil
    n:close()
    support.rmdir(data)
  end)

  local function start(extra, env)
    local args = { "--nats", n.url }
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    d = daemon.start { data = data, args = args, env = env }
    assert.is_not_nil(d.url, "the daemon did not start: " .. d:logs())
    return d
  end

  -- 40 accounts opened: their messages, with every header and nothing else.
  local function forty_accounts()
    for i = 1, 40 do open(d, i) end
    local s = caught_up(d)
    assert.are.equal(40, s.position)
    local msgs = assert_stream_is_store(d, n)
    for i, m in ipairs(msgs) do
      assert.are.equal(i, m.seq)
      assert.are.equal("ebb.BankAccount.AccountOpened", m.subject)
      local names = {}
      for k in pairs(m.headers) do names[#names + 1] = k end
      table.sort(names)
      local want = { "Content-Type", "Ebb-Position", "Ebb-Schema", "Ebb-Stream", "Ebb-Type", "Ebb-Version",
                     "Nats-Msg-Id" }
      -- the stream sequence of the message before (none before the first)
      if i > 1 then table.insert(want, 7, "Nats-Expected-Last-Sequence") end
      assert.are.same(want, names)
      assert.are.equal(i > 1 and tostring(i - 1) or nil, m.headers["Nats-Expected-Last-Sequence"])
      assert.are.equal("BankAccount-acct-" .. i, m.headers["Ebb-Stream"])
      assert.are.equal("1", m.headers["Ebb-Version"])
      assert.are.equal("AccountOpened", m.headers["Ebb-Type"])
      assert.are.equal("1", m.headers["Ebb-Schema"])
      assert.are.equal("application/json", m.headers["Content-Type"])
    end
  end

  it("publishes every committed event once, in order, with ebb's subject, headers and body", function()
    start()
    forty_accounts()
    assert.are.equal(40, metric(d, "ebb_nats_published_total"))
    assert.are.equal(1, metric(d, "ebb_nats_connected"))
    assert.are.equal(0, metric(d, "ebb_nats_lag_events"))
    -- a restart publishes nothing again
    d:stop()
    start()
    open(d, 41)
    caught_up(d)
    assert_stream_is_store(d, n)
    assert.are.equal(1, metric(d, "ebb_nats_published_total"))
  end)

  it("builds the same messages with libnats's header map (EBB_NATS_HEADER_MAP=1)", function()
    start({}, "EBB_NATS_HEADER_MAP=1")
    forty_accounts()
  end)

  it("escapes '.', '*', '>', whitespace and '%' in subject tokens, reversibly", function()
    start { "--nats-subject-prefix", "app.events" }
    local status, answer = d:post("/streams/ord.er*s-1", {
      events = { { type = "Item.Added* >x%", data = { n = 1 } }, { type = "Plain", data = {} } } })
    assert.are.equal(200, status, json.encode(answer))
    caught_up(d)
    local msgs = assert_stream_is_store(d, n)
    assert.are.equal("app.events.ord%2Eer%2As.Item%2EAdded%2A%20%3Ex%25", msgs[1].subject)
    assert.are.equal("app.events.ord%2Eer%2As.Plain", msgs[2].subject)
    assert.are.equal("Item.Added* >x%", msgs[1].headers["Ebb-Type"])
    local function unescape(t) return (t:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)) end
    local cat, typ = msgs[1].subject:match("^app%.events%.([^.]+)%.([^.]+)$")
    assert.are.equal("ord.er*s", unescape(cat))
    assert.are.equal("Item.Added* >x%", unescape(typ))
  end)

  it("publishes only what nats_from names", function()
    start { "--nats-from", "AccountOpened" }
    open(d, 1)
    local status = d:command("bank_account", "acct-1", "Deposit", { amount = 5 })
    assert.are.equal(200, status)
    open(d, 2)
    assert.are.equal(200, (d:command("bank_account", "acct-2", "Deposit", { amount = 7 })))
    caught_up(d)
    local msgs = n:read()
    assert.are.equal(2, #msgs)
    assert.are.equal("1", msgs[1].headers["Ebb-Position"])
    assert.are.equal("3", msgs[2].headers["Ebb-Position"])
    -- The checkpoint (4) is past the stream's last message (3): nothing was lost.
    d:stop()
    start { "--nats-from", "AccountOpened" }
    caught_up(d)
    assert.are.equal(2, #n:read())
    assert.are.equal(0, metric(d, "ebb_nats_republished_total"))
    assert.is_nil(d:logs():find("lost acknowledged", 1, true))
  end)

  it("refuses to start on an existing stream whose subjects do not cover the prefix", function()
    assert(n:create("EBB", "other.>"))
    d = daemon.start { data = data, args = { "--nats", n.url } }
    assert.is_nil(d.url)
    assert.is_truthy(d:wait(60))
    support.contains(d:logs(), "the JetStream stream EBB exists with subjects [other.>], which do not cover ebb.>")
    d = nil
  end)

  it("after kill -9 of the daemon mid-publish, a restart publishes the rest, each event once", function()
    start()
    -- a burst of appends, then kill -9 while the publisher is busy with it
    for b = 1, 20 do
      local evs = {}
      for k = 1, 50 do evs[k] = { type = "Noted", data = { b = b, k = k } } end
      assert.are.equal(200, (d:post("/streams/note-" .. b, { events = evs })))
    end
    d:signal("KILL")
    d:wait(60)
    start()
    local s = caught_up(d)
    assert.are.equal(1000, s.position)
    local msgs = assert_stream_is_store(d, n)
    for i, m in ipairs(msgs) do assert.are.equal(i, m.seq) end
  end)

  it("after kill -9 of nats-server, commands go on and a restart with its store catches up", function()
    start()
    for i = 1, 20 do open(d, i) end
    caught_up(d)
    n:kill("KILL")
    for i = 21, 60 do open(d, i) end -- NATS down: every command still succeeds
    local s = support.eventually(function()
      local st = nats_state(d)
      return st and not st.connected and st.lag_events > 0 and st
    end, 60, "the lag to show")
    assert.is_truthy(s.errors >= 1)
    n:restart()
    caught_up(d)
    assert_stream_is_store(d, n)
    assert.is_truthy(metric(d, "ebb_nats_errors_total") >= 1)
  end)

  it("SIGTERM with acks outstanding stops within its bound, and a restart publishes the rest once", function()
    start()
    for i = 1, 5 do open(d, i) end
    caught_up(d)
    os.execute("kill -STOP " .. n.pid) -- NATS takes messages into its socket, and acks none
    local evs = {}
    for k = 1, 200 do evs[k] = { type = "Noted", data = { k = k } } end
    assert.are.equal(200, (d:post("/streams/note-1", { events = evs })))
    d:signal("TERM")
    assert.is_truthy(d:wait(60), "the daemon did not stop")
    os.execute("kill -CONT " .. n.pid)
    start()
    local s = caught_up(d)
    assert.are.equal(205, s.position)
    local msgs = assert_stream_is_store(d, n)
    for i, m in ipairs(msgs) do assert.are.equal(i, m.seq) end
  end)

  it("publishes again what NATS lost: its store's message blocks cut short", function()
    start()
    for i = 1, 200 do open(d, i) end
    caught_up(d)
    d:stop()
    n:kill("KILL")
    -- simulate writes lost before NATS synced them: cut the last block file
    local p = assert(io.popen("ls " .. q(n.dir) .. "/jetstream/*/streams/EBB/msgs/*.blk"))
    local blocks = {}
    for f in p:lines() do blocks[#blocks + 1] = f end
    p:close()
    assert.is_truthy(#blocks >= 1)
    local last = blocks[#blocks]
    local f = assert(io.open(last, "rb"))
    local size = f:seek("end")
    f:close()
    assert(os.execute("truncate -s " .. math.floor(size / 2) .. " " .. q(last)))
    os.execute("rm -f " .. q(n.dir) .. "/jetstream/*/streams/EBB/msgs/*.idx " ..
      q(n.dir) .. "/jetstream/*/streams/EBB/msgs/*.fss")
    n:restart()
    local left = n:read()
    assert.is_truthy(#left < 200, "the cut lost messages (" .. #left .. " left)")
    start()
    caught_up(d)
    assert_stream_is_store(d, n)
    assert.are.equal(200 - #left, metric(d, "ebb_nats_republished_total"))
    support.contains(d:logs(), "the stream lost acknowledged messages")
  end)

  it("NATS stopped for 10 s under command load: commands keep succeeding, the publisher catches up", function()
    start()
    for i = 1, 10 do open(d, i) end
    caught_up(d)
    n:kill("TERM")
    local t0 = socket.gettime()
    local sent, failed = 10, 0
    daemon.load(d, 4, function()
      if socket.gettime() - t0 > 10 then return nil end
      sent = sent + 1
      return { aggregate = "bank_account", id = "acct-" .. sent, type = "OpenAccount", data = { owner = "x" } }
    end, function(_, status) if status ~= 200 then failed = failed + 1 end end)
    assert.are.equal(0, failed)
    local s = nats_state(d)
    assert.is_false(s.connected)
    assert.is_truthy(s.lag_events > 0)
    n:restart()
    local after = caught_up(d)
    assert.is_truthy(after.position > 10)
    assert_stream_is_store(d, n)
  end)
end)
