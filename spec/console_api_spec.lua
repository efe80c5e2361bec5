-- The routes the web console is built on, over real HTTP: GET /streams (a
-- paged list of stream names), GET /events?correlation_id= / causation_id=
-- (index lookups, on SQLite and PostgreSQL), GET /modules, and the serving of
-- the console itself (GET / and /console/..., public files with strict
-- security headers, while the data behind them keeps needing the token).
local cjson = require "cjson"
local core = require "ebb.core"
local support = require "support"
local daemon = require "daemon_support"

local function start(opts)
  local d = daemon.start(opts)
  assert(d.url, "the daemon did not start: " .. daemon.logs(d))
  return d
end

local function stop(d)
  if d == nil then return end
  daemon.stop(d)
  support.rmdir(d.data)
end

local function names(list)
  local out = {}
  for i, s in ipairs(list) do out[i] = s.stream end
  return out
end

local sqlite = support.store_kind ~= "postgres"

describe("console routes", function()
  local d

  -- Ten accounts, two orders (one deleted), written before the daemon starts.
  setup(function()
    local data = support.tmpdir()
    local rt = assert(core.open { data = data, aggregates = support.root .. "/aggregates",
                                  durability = "normal" })
    for i = 0, 9 do
      assert(rt:send { aggregate = "BankAccount", id = "a" .. i, type = "OpenAccount",
                       data = { owner = "o" .. i, initial_deposit = 10 } })
    end
    assert(rt:send { aggregate = "BankAccount", id = "a3", type = "Deposit", data = { amount = 5 } })
    assert(rt:send { aggregate = "Order", id = "o-1", type = "CreateOrder", data = { customer_id = "c" } })
    assert(rt:send { aggregate = "Order", id = "o-2", type = "CreateOrder", data = { customer_id = "c" } })
    assert(rt:delete("Order-o-2", { reason = "test" }))
    rt:close()
    d = start { data = data, args = { "--projections", support.root .. "/projections" } }
  end)
  teardown(function() stop(d) end)

  describe("GET /streams", function()
    it("lists every stream in name order with its version, positions, time and tombstone", function()
      local status, r = d:get("/streams")
      assert.equal(200, status)
      assert.equal(12, #r.streams)
      assert.equal(cjson.null, r.next)
      assert.equal("BankAccount-a0", r.streams[1].stream)
      assert.equal("Order-o-2", r.streams[12].stream)
      local a3, o2
      for _, s in ipairs(r.streams) do
        if s.stream == "BankAccount-a3" then a3 = s end
        if s.stream == "Order-o-2" then o2 = s end
      end
      assert.equal(2, a3.version)
      assert.equal(4, a3.first_position)
      assert.equal(11, a3.last_position)
      assert.is_false(a3.deleted)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT", a3.last_recorded_at)
      assert.equal(2, o2.version)
      assert.is_true(o2.deleted)
      assert.equal(o2.first_position + 1, o2.last_position)
    end)

    it("pages with limit and after: next is the last name of a full page, null at the end", function()
      local seen, after, pages = {}, nil, 0
      repeat
        local status, r = d:get("/streams?limit=5" .. (after and ("&after=" .. after) or ""))
        assert.equal(200, status)
        pages = pages + 1
        for _, s in ipairs(r.streams) do seen[#seen + 1] = s.stream end
        if r.next ~= cjson.null then
          assert.equal(5, #r.streams)
          assert.equal(r.streams[5].stream, r.next)
          after = r.next
        else
          after = nil
        end
      until after == nil
      assert.equal(3, pages) -- 5 + 5 + 2
      assert.equal(12, #seen)
      local _, all = d:get("/streams")
      assert.same(names(all.streams), seen)
    end)

    it("filters by category and by name prefix", function()
      local _, r = d:get("/streams?category=Order")
      assert.same({ "Order-o-1", "Order-o-2" }, names(r.streams))
      _, r = d:get("/streams?prefix=BankAccount-a1")
      assert.same({ "BankAccount-a1" }, names(r.streams))
      _, r = d:get("/streams?prefix=Bank&limit=3&after=BankAccount-a8")
      assert.same({ "BankAccount-a9" }, names(r.streams))
      _, r = d:get("/streams?category=Nothing")
      assert.same({}, r.streams)
      -- names around the category's range: only its own streams, and the one named as it
      for _, name in ipairs { "Order", "Order!x", "Orders-1", "Order-o-9" } do
        assert.equal(200, (d:post("/streams/" .. name, { events = { { type = "Noted", data = {} } } })))
      end
      _, r = d:get("/streams?category=Order")
      assert.same({ "Order", "Order-o-1", "Order-o-2", "Order-o-9" }, names(r.streams))
      _, r = d:get("/streams?category=Order&limit=2&after=Order-o-1")
      assert.same({ "Order-o-2", "Order-o-9" }, names(r.streams))
      _, r = d:get("/streams?category=Order&prefix=Order-o-")
      assert.same({ "Order-o-1", "Order-o-2", "Order-o-9" }, names(r.streams))
    end)

    it("refuses bad parameters with 400 and says which", function()
      for _, q in ipairs { "limit=0", "limit=x", "limit=10001", "colour=red", "category=" } do
        local status, r = d:get("/streams?" .. q)
        assert.equal(400, status, q)
        assert.equal("bad_request", r.error.code, q)
      end
      local status = d:post("/streams", { events = {} })
      assert.equal(405, status)
    end)
  end)

  describe("GET /events?correlation_id= and causation_id=", function()
    local first, second

    setup(function()
      local s1, r1 = d:command("BankAccount", "flow-1", "OpenAccount", { owner = "f" },
        { command_id = "cmd-open", metadata = { correlation_id = "flow" } })
      assert.equal(200, s1)
      local s2, r2 = d:command("BankAccount", "flow-1", "Deposit", { amount = 3 },
        { command_id = "cmd-dep", metadata = { correlation_id = "flow" } })
      assert.equal(200, s2)
      first, second = r1.position, r2.position
    end)

    it("gives every event of a correlation, in position order", function()
      local status, r = d:get("/events?correlation_id=flow")
      assert.equal(200, status)
      assert.equal(2, #r.events)
      assert.equal(first, r.events[1].position)
      assert.equal(second, r.events[2].position)
      assert.equal("flow", r.events[2].metadata.correlation_id)
      assert.equal(second, r.next)
      assert.equal(second, r.head)
      status, r = d:get(("/events?correlation_id=flow&after=%d"):format(first))
      assert.equal(200, status, require("cjson").encode(r))
      assert.equal(1, #r.events)
      status, r = d:get("/events?correlation_id=flow&limit=1")
      assert.equal(200, status)
      assert.equal(1, #r.events)
      assert.equal(first, r.next)
    end)

    it("gives the events a command caused", function()
      local status, r = d:get("/events?causation_id=cmd-dep")
      assert.equal(200, status)
      assert.equal(1, #r.events)
      assert.equal("MoneyDeposited", r.events[1].type)
      status, r = d:get("/events?causation_id=nobody")
      assert.equal(200, status)
      assert.same({}, r.events)
    end)

    it("refuses both at once, or with category or type", function()
      for _, q in ipairs { "correlation_id=a&causation_id=b", "correlation_id=a&category=Order",
                           "causation_id=a&type=X", "correlation_id=" } do
        local status, r = d:get("/events?" .. q)
        assert.equal(400, status, q)
        assert.equal("bad_request", r.error.code, q)
      end
    end)

    if not sqlite then
      it("can be an index search on PostgreSQL (the planner may prefer a scan of a small table)", function()
        for _, field in ipairs { "correlation_id", "causation_id" } do
          local sql = "SET enable_seqscan = off; EXPLAIN SELECT position FROM events WHERE "
            .. "((metadata::jsonb) ->> '" .. field .. "') = 'x' AND position > 0 ORDER BY position LIMIT 5"
          local p = assert(io.popen("env -u LD_PRELOAD psql -X -q -At " .. support.quote(support.store_for(d.data))
            .. " -c " .. support.quote(sql)))
          local plan = p:read("a")
          p:close()
          support.contains(plan, "events_by_" .. field:match("^(%a+)_"))
        end
      end)
    end

    if sqlite then
      it("is an index search on SQLite, never a scan", function()
        for _, field in ipairs { "correlation_id", "causation_id" } do
          local sql = "EXPLAIN QUERY PLAN SELECT position FROM events WHERE json_extract(metadata, '$."
            .. field .. "') = 'x' AND position > 0 ORDER BY position LIMIT 5"
          local p = assert(io.popen("sqlite3 -readonly " .. support.quote(d.data .. "/events.db")
            .. " " .. support.quote(sql)))
          local plan = p:read("a")
          p:close()
          support.contains(plan, "USING INDEX events_by_" .. field:match("^(%a+)_"))
          assert.is_nil(plan:find("SCAN events", 1, true), plan)
        end
      end)
    end
  end)

  describe("GET /streams/{stream}?raw=true", function()
    it("gives the events as stored, where the default read upcasts them", function()
      local status = d:post("/streams/Order-raw", { events = {
        { type = "OrderCreated", schema = 1, data = { customer_id = "c" } } } })
      assert.equal(200, status)
      local _, up = d:get("/streams/Order-raw")
      assert.equal(2, up.events[1].schema)
      local _, raw = d:get("/streams/Order-raw?raw=true")
      assert.equal(1, raw.events[1].schema)
      assert.same({ customer_id = "c" }, raw.events[1].data)
      assert.equal(400, (d:get("/streams/Order-raw?raw=maybe")))
    end)
  end)

  describe("GET /modules", function()
    it("lists the aggregates' commands and events with schemas, and the projections' queries", function()
      local status, r = d:get("/modules")
      assert.equal(200, status)
      assert.equal(2, #r.aggregates)
      local account, order = r.aggregates[1], r.aggregates[2]
      assert.equal("BankAccount", account.type)
      assert.equal("bank_account.lua", account.file)
      assert.same({ "CloseAccount", "Deposit", "OpenAccount", "Withdraw" }, account.commands)
      assert.equal("Order", order.type)
      local created
      for _, e in ipairs(order.events) do if e.type == "OrderCreated" then created = e end end
      assert.same({ type = "OrderCreated", schema = 2 }, created)
      -- The projections load on their own thread: wait until both are known.
      local byname = support.eventually(function()
        local _, m = d:get("/modules")
        local found, n = {}, 0
        for _, p in ipairs(m.projections) do found[p.name] = p; n = n + 1 end
        return n == 2 and found
      end, 60, "both projections in /modules")
      assert.same({ "balance", "top" }, byname.account_balances.queries)
      assert.same({ "BankAccount" }, byname.account_balances.from)
      assert.same({ "get", "list" }, byname.order_summary.queries)
      -- and the reactors, with what they read
      local _, m = d:get("/modules")
      assert.equal(1, #m.reactors)
      assert.equal("order_payment", m.reactors[1].name)
      assert.same({ "Order" }, m.reactors[1].from)
    end)
  end)
end)

if sqlite then
  describe("a store from before the correlation index", function()
    it("gains the indexes when it is opened (schema version 2 -> 3)", function()
      local data = support.tmpdir()
      local rt = assert(core.open { data = data, aggregates = support.root .. "/aggregates",
                                    durability = "normal" })
      assert(rt:send { aggregate = "BankAccount", id = "m", type = "OpenAccount", data = { owner = "m" },
                       command_id = "old-cmd" })
      rt:close()
      local db = support.quote(data .. "/events.db")
      assert(os.execute("sqlite3 " .. db .. " 'DROP INDEX events_by_correlation; "
        .. "DROP INDEX events_by_causation; PRAGMA user_version = 2;'"))
      local d = start { data = data }
      local status, r = d:get("/events?causation_id=old-cmd")
      assert.equal(200, status)
      assert.equal(1, #r.events)
      local p = assert(io.popen("sqlite3 -readonly " .. db
        .. " 'PRAGMA user_version; SELECT name FROM sqlite_master "
        .. "WHERE name LIKE \"events_by_c%ation\" ORDER BY name;'"))
      local out = p:read("a")
      p:close()
      assert.equal("4\nevents_by_causation\nevents_by_correlation\n", out)
      stop(d)
    end)
  end)
end

describe("serving the console", function()
  local d
  setup(function() d = start { args = { "--token", "s3cret" } } end)
  teardown(function() stop(d) end)

  local function has_security_headers(h)
    local csp = assert(h["content-security-policy"])
    support.contains(csp, "default-src 'self'")
    assert.is_nil(csp:find("unsafe-inline", 1, true))
    assert.equal("nosniff", h["x-content-type-options"])
    assert.equal("no-referrer", h["referrer-policy"])
  end

  it("sends / to /console/", function()
    for _, path in ipairs { "/", "/console" } do
      local status, _, _, h = d:get(path, { token = false })
      assert.equal(302, status)
      assert.equal("/console/", h.location)
      has_security_headers(h)
    end
  end)

  it("serves the page and its modules without the token, with strict headers", function()
    local status, _, text, h = d:get("/console/", { token = false })
    assert.equal(200, status)
    assert.matches("^text/html", h["content-type"])
    support.contains(text, '<script type="module" src="app.js"></script>')
    assert.is_nil(text:find("<script>", 1, true)) -- no inline script
    has_security_headers(h)
    status, _, _, h = d:get("/console/app.js", { token = false })
    assert.equal(200, status)
    assert.matches("^text/javascript", h["content-type"])
    has_security_headers(h)
    status, _, _, h = d:get("/console/console.css", { token = false })
    assert.equal(200, status)
    assert.matches("^text/css", h["content-type"])
  end)

  it("keeps the data behind the token", function()
    for _, path in ipairs { "/streams", "/modules", "/events?correlation_id=x" } do
      local status = d:get(path, { token = false })
      assert.equal(401, status, path)
      status = d:get(path, { token = "s3cret" })
      assert.equal(200, status, path)
    end
  end)

  it("serves nothing outside its folder, and no file it does not know the type of", function()
    for _, path in ipairs { "/console/..%2f..%2fCMakeLists.txt", "/console/.hidden.js",
                            "/console/nothing.js", "/console/index", "/console/%2e%2e" } do
      local status, r, _, h = d:get(path, { token = false })
      assert.equal(404, status, path)
      assert.equal("not_found", r.error.code, path)
      has_security_headers(h)
    end
    local status = d:get("/console/a/b", { token = false })
    assert.equal(404, status)
    status = d:post("/console/", {}, { token = "s3cret" })
    assert.equal(405, status)
  end)
end)
