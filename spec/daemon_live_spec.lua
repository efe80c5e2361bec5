-- ebb serve under load and over time: concurrent writers on one aggregate,
-- live subscriptions (catch-up, live delivery, resume), graceful shutdown
-- and kill -9 under write load, module reload on SIGHUP.
local support = require "support"
local daemon = require "daemon_support"
local json = require "cjson"

-- Runs a shell script in the background; returns its pid.
local function spawn(script, out)
  local file = os.tmpname()
  support.write(file, script)
  local p = assert(io.popen("bash " .. support.quote(file) .. " > " .. support.quote(out)
                            .. " 2>&1 & echo $!"))
  local pid = tonumber(p:read("l"))
  p:close()
  return pid, file
end

local function wait_pids(pids, timeout)
  local deadline = os.time() + (timeout or 60)
  for _, pid in ipairs(pids) do
    while daemon.alive({ pid = pid }) do
      assert(os.time() < deadline, "clients did not finish in time")
      daemon.sleep(0.05)
    end
  end
end



describe("ebb serve under load", function()
  local d
  after_each(function() if d then d:stop() end d = nil end)

  it("1. 50 concurrent clients on one aggregate, retrying on 409, leave exactly the right state", function()
    d = daemon.start()
    local st = d:command("bank_account", "shared", "OpenAccount", { owner = "all" })
    assert.are.equal(200, st)
    local clients, deposits = 50, 4
    local left, expected, retries, oks, unexpected = {}, {}, 0, 0, {}
    for i = 1, clients do left[i], expected[i] = deposits, 1 end
    d:load(clients, function(i)
      if left[i] == 0 then return nil end
      return { aggregate = "bank_account", id = "shared", type = "Deposit", data = { amount = 1 },
               expected_version = expected[i] }
    end, function(i, status, answer)
      if status == 200 then
        left[i], oks = left[i] - 1, oks + 1
        expected[i] = answer.version
      elseif status == 409 then
        retries = retries + 1
        expected[i] = answer.error.actual -- the 409 says where the stream is
      else
        unexpected[#unexpected + 1] = status
      end
    end)
    assert.are.same({}, unexpected)
    assert.are.equal(clients * deposits, oks)
    local status, state = d:get("/aggregates/bank_account/shared")
    assert.are.equal(200, status)
    assert.are.equal(clients * deposits, state.state.balance)
    assert.are.equal(1 + clients * deposits, state.version)
    -- Contiguous versions, and every deposit saw the one before it (no lost update).
    local _, stream = d:get("/streams/BankAccount-shared?limit=10000")
    assert.are.equal(1 + clients * deposits, #stream.events)
    for i, e in ipairs(stream.events) do
      assert.are.equal(i, e.version)
      if i > 1 then assert.are.equal(i - 1, e.data.balance) end
    end
    assert.is_true(retries > 0, "the clients should have raced")
  end)

  it("2. commands to many aggregates at once share commits (group commit)", function()
    d = daemon.start({ durability = "full" })
    local sent = {}
    d:load(20, function(i)
      sent[i] = (sent[i] or 0) + 1
      if sent[i] > 10 then return nil end
      return { aggregate = "bank_account", id = i .. "-" .. sent[i], type = "OpenAccount",
               data = { owner = "o" } }
    end, function(_, status) assert.are.equal(200, status) end)
    local _, _, metrics = d:get("/metrics")
    local batches = tonumber(metrics:match("ebb_commit_batch_size_count (%d+)"))
    local requests = tonumber(metrics:match("ebb_commit_batch_size_sum (%d+)"))
    assert.are.equal(200, requests)
    assert.is_true(batches < requests / 2, ("%d batches for %d appends"):format(batches, requests))
  end)
end)

describe("live subscriptions (GET /subscribe)", function()
  local d
  before_each(function() d = daemon.start({ args = { "--heartbeat-ms", "100" } }) end)
  after_each(function() d:stop() end)

  local function open(n, first)
    for i = first or 1, n do
      assert.are.equal(200, (d:command("bank_account", "s" .. i, "OpenAccount", { owner = "o" })))
    end
  end

  it("1. catches up from the store, then delivers new events live, in order, ids = positions", function()
    open(3)
    local sub = d:subscribe("?after=0")
    assert.are.equal(200, sub.status)
    assert.matches("text/event%-stream", sub.headers["content-type"])
    for i = 1, 3 do
      local ev = assert(sub:next())
      assert.are.equal(tostring(i), ev.id)
      assert.are.equal(i, ev.json.position)
    end
    open(5, 4)
    for i = 4, 5 do
      local ev = assert(sub:next())
      assert.are.equal(tostring(i), ev.id)
      assert.are.equal("BankAccount-s" .. i, ev.json.stream)
    end
    sub:close()
  end)

  it("2. resumes with Last-Event-ID with no gap and no duplicate", function()
    open(6)
    local sub = d:subscribe("?after=0")
    for i = 1, 3 do assert.are.equal(tostring(i), assert(sub:next()).id) end
    sub:close()
    local again = d:subscribe("?after=0", { ["Last-Event-ID"] = "3" })
    for i = 4, 6 do assert.are.equal(tostring(i), assert(again:next()).id) end
    assert.are.equal(200, (d:command("bank_account", "late", "OpenAccount", { owner = "o" })))
    assert.are.equal("7", assert(again:next()).id)
    again:close()
  end)

  it("3. filters by category and type, and sends heartbeat comments", function()
    open(2)
    d:command("order", "o1", "CreateOrder", { customer_id = "c" })
    local sub = d:subscribe("?category=Order")
    local ev = assert(sub:next())
    assert.are.equal("Order-o1", ev.json.stream)
    -- nothing else matches: the next thing is a heartbeat (a comment), not an event
    sub.c:settimeout(2)
    local line = sub.c:receive("*l")
    while line == "" do line = sub.c:receive("*l") end
    assert.matches("^:heartbeat", line)
    sub:close()
    local typed = d:subscribe("?type=AccountOpened&after=1")
    assert.are.equal("2", assert(typed:next()).id)
    typed:close()
  end)

  it("4. refuses bad parameters with 400", function()
    local sub = d:subscribe("?after=x")
    assert.are.equal(400, sub.status)
    sub:close()
    sub = d:subscribe("", { ["Last-Event-ID"] = "abc" })
    assert.are.equal(400, sub.status)
    sub:close()
  end)

  it("5. a subscriber that stops reading is cut off; writers are not slowed", function()
    d:stop()
    d = daemon.start({ args = { "--subscriber-buffer", "4096" } })
    local sub = d:subscribe("?after=0")
    sub.c:setoption("keepalive", true)
    -- Never read; write enough to fill the kernel's buffers and our 4 KiB.
    local big = string.rep("x", 60000)
    local t0 = os.time()
    for i = 1, 120 do
      local st = d:post("/streams/Big-" .. i, { events = { { type = "Blob", data = { pad = big } } } })
      assert.are.equal(200, st)
    end
    assert.is_true(os.time() - t0 < 20, "writes waited for the subscriber")
    daemon.sleep(0.5)
    local _, _, metrics = d:get("/metrics")
    assert.are.equal("1", metrics:match("ebb_subscriber_overflows_total (%d+)"))
    -- Reading now: the events sent so far, then the overflow event naming where to resume.
    local last, final
    sub.c:settimeout(5)
    while true do
      local ev = sub:next(5)
      if not ev then break end
      if ev.event == "overflow" then final = ev break end
      last = tonumber(ev.id)
    end
    assert.is_not_nil(final)
    assert.are.equal(last or 0, final.json.resume_after)
    sub:close()
  end)

  it("6. ebb events --follow prints events as they are committed", function()
    open(1)
    local out = os.tmpname()
    local pid = spawn(("timeout 3 %s events --follow --url %s"):format(support.ebb, d.url), out)
    daemon.sleep(0.5)
    d:command("bank_account", "followed", "OpenAccount", { owner = "o" })
    wait_pids({ pid }, 10)
    local lines = {}
    for l in support.read(out):gmatch("[^\n]+") do lines[#lines + 1] = json.decode(l) end
    assert.are.equal(2, #lines)
    assert.are.equal("BankAccount-followed", lines[2].stream)
  end)
end)

describe("stopping", function()
  local d
  after_each(function() if d then d:stop() end d = nil end)

  -- Starts writers, lets them run, stops the daemon with sig, restarts it on
  -- the same data, and checks every acknowledged command is there, whole.
  local function under_load(sig)
    d = daemon.start({ durability = "full" })
    local data = d.data
    local acks, n, signalled = {}, 0, false
    local t0 = require("socket").gettime()
    -- 16 writers, each command a new account; the signal goes out while a
    -- round of requests is in flight (sent, not yet answered).
    d:load(16, function(i)
      n = n + 1
      if not signalled and require("socket").gettime() - t0 > 1.0 then
        signalled = true
        d:signal(sig)
      end
      return { aggregate = "bank_account", id = "w" .. i .. "-" .. n, type = "OpenAccount",
               data = { owner = "o", initial_deposit = n } }
    end, function(_, status, answer)
      if status == 200 then acks[answer.stream] = answer.position end
    end)
    assert.is_true(signalled)
    assert.is_true(d:wait(20), "the daemon did not exit")
    local first_log = d:logs()
    assert.is_not_nil(next(acks), "nothing was acknowledged before the signal")
    d = daemon.start({ data = data })
    local count = 0
    for stream, pos in pairs(acks) do
      count = count + 1
      local st, answer = d:get("/streams/" .. stream)
      assert.are.equal(200, st, stream)
      assert.are.equal(1, #answer.events)
      assert.are.equal(pos, answer.events[1].position)
    end
    -- No half-written command: every stream has exactly its one event, whole,
    -- and positions run without gaps from 1 to head.
    -- Pages by the answer's own `next` until the head, so the check covers the
    -- whole store however many commands this machine managed to acknowledge.
    local stored, after, head = 0, 0
    repeat
      local st, page = d:get(("/events?limit=1000&after=%d"):format(after))
      assert.are.equal(200, st)
      head = page.head
      for _, e in ipairs(page.events) do
        stored = stored + 1
        assert.are.equal(stored, e.position)
        assert.are.equal(1, e.version)
        assert.are.equal("AccountOpened", e.type)
        assert.are.equal(e.data.initial_deposit, e.data.balance)
      end
      assert.is_true(page.next > after or page.next == head, "paging made no progress")
      after = page.next
    until after >= head
    assert.are.equal(head, stored)
    return count, stored, first_log
  end

  it("1. SIGTERM under write load: exits 0 and every acknowledged command is there after restart", function()
    local acked, stored, log = under_load("TERM")
    assert.is_true(stored >= acked)
    assert.matches('"msg":"drained', log, 1, true)
  end)

  it("2. kill -9 under write load: every acknowledged command is there, none half-written", function()
    local acked, stored = under_load("KILL")
    assert.is_true(stored >= acked)
  end)

  it("3. SIGTERM and SIGINT exit with status 0 and release the data directory", function()
    d = daemon.start()
    local data = d.data
    local out, other = os.tmpname(), support.tmpdir()
    local args = support.store_args { "serve", "--data", other, "--listen", "127.0.0.1:0", "--aggregates",
                                      support.root .. "/aggregates" }
    for i, a in ipairs(args) do args[i] = support.quote(a) end
    local pid = spawn(("%s %s; echo exit=$?"):format(support.ebb, table.concat(args, " ")), out)
    -- The daemon's own pid, from its lock, once it listens.
    local daemon_pid
    for _ = 1, 500 do
      local f = io.open(other .. "/ebb.lock")
      local text = f and f:read("a") or ""
      if f then f:close() end
      daemon_pid = text:match('"url":"http://[^"]*:[1-9]%d*"') and text:match('"pid":(%d+)')
      if daemon_pid then break end
      daemon.sleep(0.02)
    end
    assert.is_not_nil(daemon_pid, "the daemon did not start")
    os.execute("kill -TERM " .. daemon_pid)
    wait_pids({ pid }, 20)
    assert.matches("exit=0", support.read(out))
    -- SIGINT (Ctrl-C) drains the same way, and frees the data directory.
    d:signal("INT")
    assert.is_true(d:wait(10))
    assert.matches('"msg":"drained', d:logs(), 1, true)
    local _, _, code = support.run({ "send", "bank_account", "x", "OpenAccount", '{"owner":"o"}',
                                     "--data", data, "--durability", "normal" })
    assert.are.equal(0, code)
  end)

  it("4. SIGHUP reloads the aggregate modules; a broken module keeps the old one", function()
    local aggs = support.aggregates_copy()
    d = daemon.start({ aggregates = aggs })
    assert.are.equal(404, (d:command("bank_account", "a", "Wave", {})))
    local src = support.read(aggs .. "/bank_account.lua")
    support.write(aggs .. "/bank_account.lua", src:gsub("\nreturn account",
      '\naccount.handle.Wave = function() return { { type = "Waved", data = {} } } end\nreturn account'))
    d:signal("HUP")
    daemon.sleep(0.3)
    assert.are.equal(200, (d:command("bank_account", "a", "Wave", {})))
    support.write(aggs .. "/bank_account.lua", "this is not lua")
    d:signal("HUP")
    daemon.sleep(0.3)
    assert.are.equal(200, (d:command("bank_account", "b", "Wave", {})))
    assert.matches("reload failed", d:logs())
    local _, _, metrics = d:get("/metrics")
    assert.matches('ebb_module_reloads_total{result="failed"} 1', metrics, 1, true)
    support.rmdir(aggs)
  end)
end)
