-- `ebb serve` end to end over real sockets: the HTTP API (commands, appends,
-- reads), paths and routes, the HTTP limits and framing (413, 431, 408, 400,
-- 503, keep-alive, pipelining), health and metrics, bearer tokens, the one
-- daemon per data directory and the CLI beside it and through it (--url), and
-- where settings come from (flags > environment > config file > defaults).
-- Subscriptions (SSE), signals and load are covered by other specs.
local json = require "cjson"
local socket = require "socket"
local support = require "support"
local daemon = require "daemon_support"
local _ -- the ignored first results of d:get and friends

-- ------------------------------------------------------------------ helpers

-- Starts a daemon and insists that it listens.
local function start(opts)
  local d = daemon.start(opts)
  assert(d.url, "the daemon did not start: " .. daemon.logs(d))
  return d
end

-- True once the process has exited. A zombie counts as exited: `kill -0`
-- (daemon_support's wait) also succeeds on a process nobody has reaped yet,
-- which here costs seconds per daemon.
local function exited(pid)
  local f = io.open("/proc/" .. pid .. "/stat", "r")
  if f == nil then return true end
  local stat = f:read("a") or ""
  f:close()
  local state = stat:match("^%d+ %b() (%a)")
  return state == nil or state == "Z" or state == "X"
end

local function wait_exit(pid, timeout)
  local deadline = socket.gettime() + timeout
  while socket.gettime() < deadline do
    if exited(pid) then return true end
    socket.sleep(0.005)
  end
  return false
end

-- Stops a daemon's process (SIGTERM, then SIGKILL if it does not stop in time).
local function halt(d, timeout)
  if d.pid and not exited(d.pid) then
    d:signal("TERM")
    if not wait_exit(d.pid, timeout or 15) then
      d:signal("KILL")
      wait_exit(d.pid, 5)
    end
  end
end

-- Stops a daemon and removes its files and data directory.
local function stop(d, timeout)
  if d == nil then return end
  halt(d, timeout)
  os.remove(d.out)
  os.remove(d.log)
  support.rmdir(d.data)
end

-- Runs `ebb args...` with a time limit (so a daemon that starts when it
-- should not cannot hang the suite): stdout, stderr, exit code (124: timeout).
-- opts.env: VAR=value assignments; opts.stdin: text for standard input.
local function run(args, opts)
  opts = opts or {}
  local parts = { "timeout", "20", support.quote(support.ebb) }
  for _, a in ipairs(support.store_args(args)) do parts[#parts + 1] = support.quote(a) end
  local errfile = os.tmpname()
  local infile
  local cmd = (opts.env or "") .. " " .. table.concat(parts, " ") .. " 2> " .. support.quote(errfile)
  if opts.stdin then
    infile = os.tmpname()
    support.write(infile, opts.stdin)
    cmd = cmd .. " < " .. support.quote(infile)
  else
    cmd = cmd .. " < /dev/null"
  end
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("a")
  local _, _, code = p:close()
  local err = support.read(errfile)
  os.remove(errfile)
  if infile then os.remove(infile) end
  return out, err, code
end

local function lines(text)
  local list = {}
  for line in text:gmatch("[^\n]+") do list[#list + 1] = json.decode(line) end
  return list
end

local function first_line(text) return (text:match("^[^\n]*")) end

-- One raw HTTP/1.1 request as bytes. headers: a list of "Name: value" lines.
local function req(method, path, body, headers)
  local h = { method .. " " .. path .. " HTTP/1.1", "Host: spec" }
  if body then
    h[#h + 1] = "Content-Type: application/json"
    h[#h + 1] = "Content-Length: " .. #body
  end
  for _, x in ipairs(headers or {}) do h[#h + 1] = x end
  return table.concat(h, "\r\n") .. "\r\n\r\n" .. (body or "")
end

local function command_body(aggregate, id, type_, data, extra)
  local t = { aggregate = aggregate, id = id, type = type_, data = data or {} }
  for k, v in pairs(extra or {}) do t[k] = v end
  return json.encode(t)
end

-- Sends bytes on one connection and reads up to n responses, in order.
-- Returns a list of {status, headers, body, json}; with want_close, also
-- whether the server then closed the connection (within 2 s).
local function exchange(d, bytes, n, want_close)
  local c = daemon.connect(d)
  assert(c:send(bytes))
  local list = {}
  for _ = 1, n do
    local status, headers, body = daemon.read_response(c)
    if not status then break end
    local ok, decoded = pcall(json.decode, body)
    list[#list + 1] = { status = status, headers = headers, body = body, json = ok and decoded or nil }
  end
  local closed
  if want_close then
    c:settimeout(2)
    local extra, err = c:receive(1)
    closed = extra == nil and err == "closed"
  end
  c:close()
  return list, closed
end

-- Splits a raw response text into status, lower-cased headers and body.
local function parse_raw(text)
  local head, body = text:match("^(.-)\r\n\r\n(.*)$")
  if not head then return nil, {}, text end
  local status = tonumber(head:match("^HTTP/1%.%d (%d%d%d)"))
  local headers = {}
  for k, v in head:gmatch("\r\n([^:\r\n]+):%s*([^\r\n]*)") do headers[k:lower()] = v end
  return status, headers, body
end

local function error_of(text)
  local _, _, body = parse_raw(text)
  local ok, decoded = pcall(json.decode, body)
  return ok and type(decoded) == "table" and decoded.error or nil
end

local function head_position(d)
  local status, h = d:get("/health")
  assert.equal(200, status)
  return h.position
end

local function metrics(d, opts)
  local status, _, text, headers = d:get("/metrics", opts)
  assert.equal(200, status)
  return text, headers
end

-- The value of one sample ("name" or `name{label="x"}`), or nil.
local function sample(text, series)
  for line in text:gmatch("[^\n]+") do
    local name, value = line:match("^(%S+) (%S+)$")
    if name == series then return tonumber(value) end
  end
  return nil
end

local function padded_command(id, size)
  local body = command_body("Order", id, "CreateOrder", { customer_id = "c" }, { metadata = { pad = "" } })
  local pad = size - #body
  assert(pad >= 0)
  return (body:gsub('"pad":""', '"pad":"' .. string.rep("x", pad) .. '"'))
end

-- ================================================================== specs

describe("ebb serve", function()

  describe("1. POST /commands", function()
    local d
    setup(function() d = start() end)
    teardown(function() stop(d) end)

    it("1.1 runs a command and answers {stream, version, position, events}, as stored", function()
      local status, r = d:command("Order", "c1", "CreateOrder", { customer_id = "cust-1" })
      assert.equal(200, status)
      assert.equal("Order-c1", r.stream)
      assert.equal(1, r.version)
      assert.is_number(r.position)
      assert.equal(1, #r.events)
      local e = r.events[1]
      assert.same({ "Order-c1", 1, r.position, "OrderCreated", 2 }, { e.stream, e.version, e.position, e.type, e.schema })
      assert.same({ customer_id = "cust-1", currency = "EUR" }, e.data)
      assert.matches("^%x+%-%x+%-%x+%-%x+%-%x+$", e.id)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", e.recorded_at)

      local s2, r2 = d:command("Order", "c1", "AddItem", { sku = "A", qty = 2, price = 150 })
      assert.equal(200, s2)
      assert.equal(2, r2.version)
      assert.is_true(r2.position > r.position)
      assert.same({ sku = "A", qty = 2, price = 150 }, r2.events[1].data)

      local s3, stream = d:get("/streams/Order-c1")
      assert.equal(200, s3)
      assert.equal(2, stream.version)
      assert.same(r.events[1], stream.events[1])
      assert.same(r2.events[1], stream.events[2])
    end)

    it("1.2 takes an aggregate by its module name, and metadata into the events", function()
      local status, r = d:command("bank_account", "m1", "OpenAccount", { owner = "Ann", initial_deposit = 10 },
                                  { metadata = { user_id = "u-7" } })
      assert.equal(200, status)
      assert.equal("BankAccount-m1", r.stream)
      local md = r.events[1].metadata
      assert.equal("u-7", md.user_id)
      assert.is_string(md.command_id)
      assert.equal(md.command_id, md.correlation_id)
    end)

    it("1.3 answers an ebb.reject with 422 rejected, its message and details, and records nothing", function()
      d:command("BankAccount", "r1", "OpenAccount", { owner = "Ann", initial_deposit = 100 })
      local head = head_position(d)
      local status, r = d:command("BankAccount", "r1", "Withdraw", { amount = 500 })
      assert.equal(422, status)
      assert.same({ code = "rejected", message = "insufficient funds",
                    details = { balance = 100, requested = 500 } }, r.error)
      status, r = d:command("BankAccount", "r1", "OpenAccount", { owner = "Ann" })
      assert.equal(422, status)
      assert.same({ code = "rejected", message = "account already exists", details = { status = "open" } }, r.error)
      assert.equal(head, head_position(d))
      local _, stream = d:get("/streams/BankAccount-r1")
      assert.equal(1, stream.version)
    end)

    it("1.4 answers 404 not_found for an unknown aggregate or command", function()
      local status, r = d:command("Nope", "1", "Fly")
      assert.equal(404, status)
      assert.same({ code = "not_found", message = "unknown aggregate Nope" }, r.error)
      status, r = d:command("Order", "1", "Fly")
      assert.equal(404, status)
      assert.same({ code = "not_found", message = "Order has no command Fly" }, r.error)
    end)

    it("1.5 checks expected_version: 409 wrong_expected_version with expected and actual", function()
      local status, r = d:command("Order", "ev", "CreateOrder", { customer_id = "c" }, { expected_version = 0 })
      assert.equal(200, status)
      status = d:command("Order", "ev", "AddItem", { sku = "A", qty = 1, price = 1 }, { expected_version = 1 })
      assert.equal(200, status)
      status, r = d:command("Order", "ev", "AddItem", { sku = "A", qty = 1, price = 1 }, { expected_version = 5 })
      assert.equal(409, status)
      assert.equal("wrong_expected_version", r.error.code)
      assert.equal("wrong expected version for Order-ev: expected 5, actual 2", r.error.message)
      assert.same({ 5, 2 }, { r.error.expected, r.error.actual })
      status, r = d:command("Order", "ev", "AddItem", { sku = "A", qty = 1, price = 1 }, { expected_version = "no_stream" })
      assert.equal(409, status)
      assert.same({ "no_stream", 2 }, { r.error.expected, r.error.actual })
      status, r = d:command("Order", "ev-new", "CreateOrder", { customer_id = "c" }, { expected_version = "exists" })
      assert.equal(409, status)
      assert.same({ "exists", 0 }, { r.error.expected, r.error.actual })
      status = d:command("Order", "ev", "AddItem", { sku = "A", qty = 1, price = 1 }, { expected_version = "exists" })
      assert.equal(200, status)
      for _, bad in ipairs { -1, "soon", 1.5, true } do
        status, r = d:command("Order", "ev", "AddItem", { sku = "A", qty = 1, price = 1 }, { expected_version = bad })
        assert.equal(400, status, tostring(bad))
        assert.matches('"expected_version" must be a version', r.error.message)
      end
      local _, stream = d:get("/streams/Order-ev")
      assert.equal(3, stream.version)
    end)

    it("1.6 deduplicates by command_id: the original answer again, nothing recorded; another command with it is 409", function()
      local body = { customer_id = "c" }
      local s1, first = d:command("Order", "dedup", "CreateOrder", body, { command_id = "cmd-1" })
      assert.equal(200, s1)
      assert.equal("cmd-1", first.events[1].metadata.command_id)
      local head = head_position(d)
      local s2, again = d:command("Order", "dedup", "CreateOrder", body, { command_id = "cmd-1" })
      assert.equal(200, s2)
      assert.same(first, again)
      assert.equal(head, head_position(d))
      local s3, r = d:command("Order", "dedup", "AddItem", { sku = "A", qty = 1, price = 1 }, { command_id = "cmd-1" })
      assert.equal(409, s3)
      assert.equal("conflict", r.error.code)
      assert.matches("command id cmd%-1 was already used for CreateOrder on Order%-dedup", r.error.message)
      local s4, r4 = d:command("Order", "dedup-other", "CreateOrder", body, { command_id = "cmd-1" })
      assert.equal(409, s4)
      assert.equal("conflict", r4.error.code)
      assert.equal(head, head_position(d))
      assert.equal(404, (d:get("/streams/Order-dedup-other")))
    end)

    it("1.7 refuses what is not a command: 400 bad_request, or 415 without a JSON content type", function()
      local cases = {
        { '{"aggregate":"Order","id":"b","type":"CreateOrder","bogus":1}', 'unknown field "bogus" in a command' },
        { '{"aggregate":"Order","id":"b",', "^malformed JSON: " },
        { '', "^malformed JSON: " },
        { '[1,2]', "a command must be a JSON object" },
        { '"text"', "a command must be a JSON object" },
        { '{"id":"b","type":"CreateOrder"}', '"aggregate" must be a string' },
        { '{"aggregate":"Order","type":"CreateOrder"}', '"id" must be a string' },
        { '{"aggregate":"Order","id":"b"}', '"type" must be a string' },
        { '{"aggregate":"Order","id":7,"type":"CreateOrder"}', '"id" must be a string' },
        { '{"aggregate":"Order","id":"b","type":"CreateOrder","data":[1]}', "data must be a JSON object" },
        { '{"aggregate":"Order","id":"b","type":"CreateOrder","data":"x"}', "data must be a JSON object" },
        { '{"aggregate":"Order","id":"b","type":"CreateOrder","metadata":5}', "metadata must be a JSON object" },
        { '{"aggregate":"Order","id":"b","type":"CreateOrder","command_id":5}', '"command_id" must be a string' },
        { '{"aggregate":"Order","id":"a\\u0000b","type":"CreateOrder"}', '"id" contains a NUL character' },
        { '{"aggregate":"Order","id":"' .. string.rep("a", 510) .. '","type":"CreateOrder"}', "stream name Order%-a+ is too long" },
        { '{"aggregate":"Order","id":"\\u0001","type":"CreateOrder"}', "control character" },
      }
      local head = head_position(d)
      for _, c in ipairs(cases) do
        local status, r, text = d:post("/commands", c[1])
        assert.equal(400, status, c[1] .. " -> " .. tostring(text))
        assert.equal("bad_request", r.error.code)
        assert.matches(c[2], r.error.message)
      end
      local good = command_body("Order", "ct", "CreateOrder", { customer_id = "c" })
      for _, ctype in ipairs { false, "text/plain", "application/jsonx", "application/x-www-form-urlencoded" } do
        local status, r = d:post("/commands", good, { content_type = ctype })
        assert.equal(415, status, tostring(ctype))
        assert.equal("the body must be JSON, sent with Content-Type: application/json", r.error.message)
      end
      assert.equal(head, head_position(d))
      local status = d:post("/commands", good, { content_type = "Application/JSON; charset=utf-8" })
      assert.equal(200, status)
    end)

    -- The daemon reads a plain command straight off its text and leaves any
    -- other spelling to the Lua decoder: both must take the same commands.
    it("1.7b takes a command the same however its JSON is spelled", function()
      local function post(body) return d:post("/commands", body) end
      local cases = {
        { '{"aggregate":"Order","id":"sp1","type":"CreateOrder","data":{"customer_id":"c1"}}', "Order-sp1", "c1" },
        { '{"aggr\\u0065gate":"Order","id":"sp2","type":"CreateOrder","data":{"customer_id":"c1"}}', "Order-sp2", "c1" },
        { '{"aggregate":"Order","id":"sp\\u0033","type":"Create\\u004frder","data":{"customer_id":"c\\"1"}}', "Order-sp3", 'c"1' },
        { '{"aggregate":"Order","id":"x","id":"sp4","type":"CreateOrder","data":{"customer_id":"a"},"data":{"customer_id":"b"}}', "Order-sp4", "b" },
        { ' {\n "aggregate" : "Order" , "id" : "sp5" , "type" : "CreateOrder" , "expected_version" : 0 ,'
          .. '\t"data" : { "customer_id" : "c" } } ', "Order-sp5", "c" },
        { '{"aggregate":"Order","id":"sp6","type":"CreateOrder","expected_version":"no_stream","data":{"customer_id":"c"}}', "Order-sp6", "c" },
        { '{"aggregate":"Order","id":"sp7","type":"CreateOrder","expected_version":"0","data":{"customer_id":"c"},'
          .. '"metadata":{"user_id":"u\\n"}}', "Order-sp7", "c" },
      }
      for _, c in ipairs(cases) do
        local status, r, text = post(c[1])
        assert.equal(200, status, c[1] .. " -> " .. tostring(text))
        assert.equal(c[2], r.stream)
        assert.equal(1, r.version)
        assert.equal("OrderCreated", r.events[1].type)
        assert.equal(c[3], r.events[1].data.customer_id)
      end
      local _, r7 = d:get("/streams/Order-sp7")
      assert.equal("u\n", r7.events[1].metadata.user_id)
      -- The version check, each spelling on each path.
      local add = '{"aggregate":"Order","id":"sp5","type":"AddItem","data":{"sku":"A","qty":1,"price":1},"expected_version":%s}'
      local status, r = post(add:format("0"))
      assert.equal(409, status)
      assert.equal("wrong expected version for Order-sp5: expected 0, actual 1", r.error.message)
      status, r = post(add:format('"no_stream"'))
      assert.equal(409, status)
      assert.equal("wrong expected version for Order-sp5: expected no_stream, actual 1", r.error.message)
      assert.equal(200, (post(add:format('"1"'))))
      assert.equal(200, (post(add:format("2"))))
      assert.equal(200, (post(add:format('"exists"'))))
      assert.equal(200, (post(add:format('"an\\u0079"'))))
      for _, bad in ipairs { "1.0", "-1", "-0.5", "1e0", "99999999999999999999", '"7x"', '"-1"', '"+1"', '""', "null", "true", "[1]" } do
        status, r = post(add:format(bad))
        assert.equal(400, status, bad)
        assert.equal('"expected_version" must be a version (0 or more) or "any", "no_stream" or "exists"',
          r.error.message, bad)
      end
      status, r = post('{"aggregate":"Order","id":"sp5","type":"AddItem","data":{"sku":"A","qty":1,"price":1},"expected_version":9223372036854775807}')
      assert.equal(409, status)
      assert.equal("wrong expected version for Order-sp5: expected 9223372036854775807, actual 5", r.error.message)
      -- "-0" is the integer 0 to the decoder.
      status, r = post('{"aggregate":"Order","id":"sp5","type":"AddItem","data":{"sku":"A","qty":1,"price":1},"expected_version":-0}')
      assert.equal(409, status)
      assert.equal("wrong expected version for Order-sp5: expected 0, actual 5", r.error.message)
      -- A command id, plain and escaped: the second is the first one's repeat.
      local body = '{"aggregate":"Order","id":"sp8","type":"CreateOrder","data":{"customer_id":"c"},"command_id":"%s"}'
      local s1, first = post(body:format("cid-8"))
      local s2, again = post(body:format("cid\\u002d8"))
      assert.equal(200, s1)
      assert.equal(200, s2)
      assert.same(first, again)
      assert.equal("cid-8", first.events[1].metadata.command_id)
    end)

    it("1.8 a historical state query does not change what the next command decides on", function()
      d:command("Order", "hist", "CreateOrder", { customer_id = "c" })
      d:command("Order", "hist", "AddItem", { sku = "A", qty = 1, price = 5 })
      local status, old = d:get("/aggregates/Order/hist?version=0")
      assert.equal(200, status)
      assert.equal("none", old.state.status)
      local s2, r = d:command("Order", "hist", "AddItem", { sku = "A", qty = 1, price = 5 })
      assert.equal(200, s2, r and r.error and r.error.message)
      assert.equal(3, r.version)
      local _, now = d:get("/aggregates/Order/hist")
      assert.same({ 3, 2, 10 }, { now.version, now.state.item_count, now.state.total })
    end)
  end)

  describe("2. POST /streams/{stream}", function()
    local d
    setup(function() d = start() end)
    teardown(function() stop(d) end)

    local function append(stream, body) return d:post("/streams/" .. stream, body) end

    it("2.1 appends events and answers {stream, version, position, events}", function()
      local status, r = append("Raw-1", { events = {
        { id = "e-1", type = "Thing", data = { a = 1 }, metadata = { m = "x" } },
        { type = "Other" },
        { type = "Thing", schema = 3 },
      } })
      assert.equal(200, status)
      assert.same({ "Raw-1", 3, 3 }, { r.stream, r.version, r.position })
      assert.equal(3, #r.events)
      assert.same({ 1, 1, "e-1", "Thing", 1 }, { r.events[1].version, r.events[1].position, r.events[1].id,
                                                  r.events[1].type, r.events[1].schema })
      assert.same({ a = 1 }, r.events[1].data)
      assert.same({ m = "x" }, r.events[1].metadata)
      assert.matches("^%x+%-%x+%-7%x+%-%x+%-%x+$", r.events[2].id)
      assert.same({}, r.events[2].data)
      assert.equal(3, r.events[3].schema)
      status, r = append("Raw-1", { expected_version = 3, events = { { type = "Thing" } } })
      assert.equal(200, status)
      assert.same({ 4, 4 }, { r.version, r.position })
      local _, stream = d:get("/streams/Raw-1")
      assert.equal(4, stream.version)
      assert.same({ "Thing", "Other", "Thing", "Thing" },
                  { stream.events[1].type, stream.events[2].type, stream.events[3].type, stream.events[4].type })
    end)

    it("2.2 answers with the events as stored (recorded_at included), also when re-sent", function()
      local body = { events = { { id = "i-1", type = "Thing", data = { n = 1 } }, { id = "i-2", type = "Thing" } } }
      local status, first = append("Idem-1", body)
      assert.equal(200, status)
      local _, stored = d:get("/streams/Idem-1")
      assert.same(stored.events, first.events)
      socket.sleep(0.02) -- a later millisecond: a re-sent answer must not carry a new time
      local head = head_position(d)
      local s2, again = append("Idem-1", body)
      assert.equal(200, s2)
      assert.same({ first.version, first.position }, { again.version, again.position })
      assert.equal(head, head_position(d))
      local _, stored2 = d:get("/streams/Idem-1")
      assert.equal(2, stored2.version)
      assert.same(stored2.events, again.events)
    end)

    it("2.3 re-sending event ids at the same place is idempotent; anywhere else it is a 409 conflict", function()
      local body = { events = { { id = "j-1", type = "Thing" }, { id = "j-2", type = "Thing" } } }
      assert.equal(200, (append("Idem-2", body)))
      local head = head_position(d)
      local status, r = append("Idem-2", { expected_version = 0, events = body.events })
      assert.equal(200, status, r and r.error and r.error.message)
      assert.same({ 2, head }, { r.version, r.position })
      status, r = append("Idem-3", { events = { { id = "j-1", type = "Thing" } } })
      assert.equal(409, status)
      assert.equal("conflict", r.error.code)
      assert.equal("event id j-1 is already stored in stream Idem-2 at version 1", r.error.message)
      status, r = append("Idem-2", { events = { { id = "j-2", type = "Thing" }, { id = "j-3", type = "Thing" } } })
      assert.equal(409, status)
      assert.equal("conflict", r.error.code)
      assert.equal(head, head_position(d))
      assert.equal(404, (d:get("/streams/Idem-3")))
    end)

    it("2.4 checks expected_version: 409 with expected and actual", function()
      assert.equal(200, (append("Exp-1", { expected_version = "no_stream", events = { { type = "A" } } })))
      local status, r = append("Exp-1", { expected_version = 0, events = { { type = "A" } } })
      assert.equal(409, status)
      assert.same({ "wrong_expected_version", 0, 1 }, { r.error.code, r.error.expected, r.error.actual })
      status, r = append("Exp-1", { expected_version = "no_stream", events = { { type = "A" } } })
      assert.equal(409, status)
      assert.same({ "no_stream", 1 }, { r.error.expected, r.error.actual })
      status, r = append("Exp-2", { expected_version = "exists", events = { { type = "A" } } })
      assert.equal(409, status)
      assert.same({ "exists", 0 }, { r.error.expected, r.error.actual })
      assert.equal(200, (append("Exp-1", { expected_version = "exists", events = { { type = "A" } } })))
      assert.equal(200, (append("Exp-1", { expected_version = "any", events = { { type = "A" } } })))
      local _, stream = d:get("/streams/Exp-1")
      assert.equal(3, stream.version)
    end)

    it("2.5 refuses malformed appends with 400 and records nothing", function()
      local cases = {
        { '{"events":[]}', '"events" must hold from 1 to 100000 events' },
        { '{"events":{}}', '"events" must be a JSON array of events' },
        { '{"events":{"type":"A"}}', '"events" must be a JSON array of events' },
        { '{}', '"events" must be a JSON array of events' },
        { '{"events":[{"type":"A"}],"extra":1}', 'unknown field "extra" in an append' },
        { '{"events":[{"type":"A","x":1}]}', 'unknown field "x" in event 1' },
        { '{"events":[{"type":"A"},{"data":{}}]}', '"type" must be a string' },
        { '{"events":[{"type":"A","schema":0}]}', 'event 1: "schema" must be a positive integer' },
        { '{"events":[{"type":"A","schema":1.5}]}', 'event 1: "schema" must be a positive integer' },
        { '{"events":[{"type":"A","data":[1]}]}', "data must be a JSON object" },
        { '{"events":[{"type":"A","metadata":"m"}]}', "metadata must be a JSON object" },
        { '{"events":[{"type":"$deleted"}]}', "reserved for ebb" },
        { '{"events":[{"type":""}]}', "must not be empty" },
        { '{"events":[{"type":"A"}],"expected_version":-2}', '"expected_version" must be a version' },
        { '{"events":[1]}', "event 1 must be a JSON object" },
        { '{"events":[{"type":"A"}', "^malformed JSON: " },
      }
      for _, c in ipairs(cases) do
        local status, r, text = d:post("/streams/Bad-1", c[1])
        assert.equal(400, status, c[1] .. " -> " .. tostring(text))
        assert.equal("bad_request", r.error.code, c[1])
        assert.matches(c[2], r.error.message)
      end
      local status, r = d:post("/streams/Bad-1", '{"events":[{"type":"A"}]}', { content_type = "text/plain" })
      assert.equal(415, status)
      assert.equal("bad_request", r.error.code)
      status, r = d:post("/streams/Bad%01x", '{"events":[{"type":"A"}]}')
      assert.equal(400, status)
      assert.matches("stream name contains a control character", r.error.message)
      assert.equal(404, (d:get("/streams/Bad-1")))
    end)

    it("2.6 stamps the aggregate's current schema when none is given, and reads upcast old ones", function()
      local status, r = append("Order-up", { events = {
        { type = "OrderCreated", schema = 1, data = { customer_id = "old" } },
        { type = "OrderCreated", data = { customer_id = "new", currency = "USD" } },
      } })
      assert.equal(200, status)
      assert.same({ 1, 2 }, { r.events[1].schema, r.events[2].schema })
      local _, stream = d:get("/streams/Order-up")
      assert.same({ customer_id = "old", currency = "EUR" }, stream.events[1].data)
      assert.equal(2, stream.events[1].schema)
      assert.same({ customer_id = "new", currency = "USD" }, stream.events[2].data)
      local _, all = d:get("/events?category=Order")
      assert.same({ customer_id = "old", currency = "EUR" }, all.events[1].data)
    end)

    it("2.7 keeps int64 and float values and Unicode exact, and refuses invalid UTF-8, lone surrogates and deep nesting", function()
      local body = '{"events":[{"type":"A","data":{"big":9223372036854775807,"neg":-9223372036854775808,' ..
                   '"f":0.1,"e":1.5e300,"s":"\\u00e9\\ud83d\\ude00 \\"q\\""}}]}'
      local status, _, text = d:post("/streams/Json-1", body)
      assert.equal(200, status, text)
      local _, _, stored = d:get("/streams/Json-1")
      for _, t in ipairs { text, stored } do
        assert.matches('"big":9223372036854775807', t, 1, true)
        assert.matches('"neg":-9223372036854775808', t, 1, true)
        assert.matches('"f":0%.1[,}]', t)
        assert.matches('"s":"é😀 \\"q\\""', t, 1, true)
        assert.equal(1.5e300, json.decode(t).events[1].data.e)
      end
      assert.equal(200, (d:command("Order", "json", "CreateOrder", { customer_id = "c" })))
      status, _, text = d:post("/commands", '{"aggregate":"Order","id":"json","type":"AddItem",' ..
                                            '"data":{"sku":"A","qty":1,"price":9007199254740993}}')
      assert.equal(200, status, text)
      assert.matches('"price":9007199254740993', text, 1, true)
      _, _, text = d:get("/aggregates/Order/json")
      assert.matches('"total":9007199254740993', text, 1, true)

      local head = head_position(d)
      local cases = {
        { '{"events":[{"type":"A","data":{"s":"\255"}}]}', "invalid UTF%-8" },
        { '{"events":[{"type":"A","data":{"s":"\\ud800"}}]}', "surrogate" },
        { '{"events":[{"type":"A","data":{"x":' .. string.rep("[", 100000) .. string.rep("]", 100000) .. '}}]}',
          "nesting deeper than" },
        { '{"aggregate":"Order","id":"json","type":"AddItem","data":' .. string.rep('{"a":', 5000) .. "1" ..
          string.rep("}", 5000) .. "}", "nesting deeper than", "/commands" },
      }
      for _, c in ipairs(cases) do
        local s2, r = d:post(c[3] or "/streams/Json-2", c[1])
        assert.equal(400, s2, c[2])
        assert.matches("^malformed JSON: ", r.error.message)
        assert.matches(c[2], r.error.message)
      end
      assert.equal(head, head_position(d))
    end)
  end)

  describe("3. GET /streams, /events, /aggregates", function()
    local d
    setup(function()
      d = start()
      -- positions: 1 OrderCreated, 2-5 ItemAdded (Order-r1), 6 AccountOpened, 7 MoneyDeposited (BankAccount-r1)
      assert.equal(200, (d:command("Order", "r1", "CreateOrder", { customer_id = "c" })))
      for i = 1, 4 do
        assert.equal(200, (d:command("Order", "r1", "AddItem", { sku = "S" .. i, qty = 1, price = 100 })))
      end
      assert.equal(200, (d:command("BankAccount", "r1", "OpenAccount", { owner = "Ann", initial_deposit = 5 })))
      assert.equal(200, (d:command("BankAccount", "r1", "Deposit", { amount = 7 })))
    end)
    teardown(function() stop(d) end)

    local function versions(events)
      local v = {}
      for i, e in ipairs(events) do v[i] = e.version end
      return v
    end
    local function positions(events)
      local v = {}
      for i, e in ipairs(events) do v[i] = e.position end
      return v
    end

    it("3.1 reads a stream forward and backward, from a version, with a limit", function()
      local status, r = d:get("/streams/Order-r1")
      assert.equal(200, status)
      assert.same({ "Order-r1", 5, false }, { r.stream, r.version, r.deleted })
      assert.same({ 1, 2, 3, 4, 5 }, versions(r.events))
      _, r = d:get("/streams/Order-r1?from=2&limit=2")
      assert.same({ 2, 3 }, versions(r.events))
      _, r = d:get("/streams/Order-r1?backward=true&limit=2")
      assert.same({ 5, 4 }, versions(r.events))
      _, r = d:get("/streams/Order-r1?backward=1&from=3")
      assert.same({ 3, 2, 1 }, versions(r.events))
      _, r = d:get("/streams/Order-r1?backward")
      assert.same({ 5, 4, 3, 2, 1 }, versions(r.events))
      _, r = d:get("/streams/Order-r1?backward=false&from=4")
      assert.same({ 4, 5 }, versions(r.events))
      _, r = d:get("/streams/Order-r1?from=9")
      assert.same({ 5, 0 }, { r.version, #r.events })
      _, r = d:get("/streams/Order-r1?limit=1&limit=3")
      assert.same({ 1, 2, 3 }, versions(r.events))
      _, r = d:get("/streams/Order-r1?limit=10000")
      assert.equal(5, #r.events)
    end)

    it("3.2 answers 404 for an unknown stream and 400 for bad query parameters", function()
      local status, r = d:get("/streams/Order-nope")
      assert.equal(404, status)
      assert.same({ code = "not_found", message = "stream Order-nope does not exist" }, r.error)
      local cases = {
        { "?foo=1", 'unknown query parameter "foo" %(this route takes: from limit backward raw%)' },
        { "?after=1", 'unknown query parameter "after"' },
        { "?from=-1", 'from must be an integer from 0 to 9223372036854775807, not "%-1"' },
        { "?from=abc", 'from must be an integer' },
        { "?from=1x", 'from must be an integer' },
        { "?from=", 'from must be an integer' },
        { "?from=99999999999999999999", 'from must be an integer' },
        { "?limit=0", 'limit must be an integer from 1 to 10000, not "0"' },
        { "?limit=10001", 'limit must be an integer from 1 to 10000' },
        { "?backward=maybe", 'backward must be true or false, not "maybe"' },
        { "?from=%zz", "bad percent%-encoding in the query string" },
      }
      for _, c in ipairs(cases) do
        status, r = d:get("/streams/Order-r1" .. c[1])
        assert.equal(400, status, c[1])
        assert.equal("bad_request", r.error.code)
        assert.matches(c[2], r.error.message)
      end
    end)

    it("3.3 reads all events after a position, by category and type, with next and head", function()
      local status, r = d:get("/events")
      assert.equal(200, status)
      assert.same({ 1, 2, 3, 4, 5, 6, 7 }, positions(r.events))
      assert.same({ 7, 7 }, { r.next, r.head })
      _, r = d:get("/events?after=2&limit=3")
      assert.same({ 3, 4, 5 }, positions(r.events))
      assert.same({ 5, 7 }, { r.next, r.head })
      _, r = d:get(("/events?after=%d&limit=3"):format(r.next))
      assert.same({ 6, 7 }, positions(r.events))
      assert.equal(7, r.next)
      _, r = d:get("/events?after=7")
      assert.same({ 0, 7, 7 }, { #r.events, r.next, r.head })
      _, r = d:get("/events?category=BankAccount")
      assert.same({ 6, 7 }, positions(r.events))
      _, r = d:get("/events?type=ItemAdded&after=3")
      assert.same({ 4, 5 }, positions(r.events))
      _, r = d:get("/events?category=Order&type=OrderCreated")
      assert.same({ 1 }, positions(r.events))
      _, r = d:get("/events?category=Nothing")
      assert.same({ 0, 0, 7 }, { #r.events, r.next, r.head })
      -- paging by next collects everything exactly once
      local seen, after = {}, 0
      repeat
        _, r = d:get(("/events?limit=2&after=%d"):format(after))
        for _, e in ipairs(r.events) do seen[#seen + 1] = e.position end
        after = r.next
      until #r.events == 0
      assert.same({ 1, 2, 3, 4, 5, 6, 7 }, seen)
      local cases = {
        { "?foo=1", 'unknown query parameter "foo" %(this route takes: after limit category type correlation_id causation_id%)' },
        { "?from=1", 'unknown query parameter "from"' },
        { "?after=-1", "after must be an integer from 0" },
        { "?after=x", "after must be an integer from 0" },
        { "?limit=0", "limit must be an integer from 1 to 10000" },
        { "?limit=10001", "limit must be an integer from 1 to 10000" },
        { "?category=", "category must not be empty" },
        { "?category=%01", "category contains a control character" },
        { "?type=", "event type must not be empty" },
        { "?type=%FF", "event type is not valid UTF%-8" },
      }
      for _, c in ipairs(cases) do
        status, r = d:get("/events" .. c[1])
        assert.equal(400, status, c[1])
        assert.equal("bad_request", r.error.code)
        assert.matches(c[2], r.error.message)
      end
    end)

    it("3.4 answers an aggregate's state, now, at a version and at a time", function()
      local status, r = d:get("/aggregates/Order/r1")
      assert.equal(200, status)
      assert.same({ "Order", "r1", "Order-r1", 5, 5, false, 0 },
                  { r.aggregate, r.id, r.stream, r.version, r.position, r.deleted, r.snapshot_version })
      assert.same({ "created", 400, 4 }, { r.state.status, r.state.total, r.state.item_count })
      _, r = d:get("/aggregates/Order/r1?version=2")
      assert.same({ 2, 2, 100, 1 }, { r.version, r.position, r.state.total, #r.state.items })
      _, r = d:get("/aggregates/Order/r1?version=0")
      assert.same({ 0, "none" }, { r.version, r.state.status })
      _, r = d:get("/aggregates/order/r1")
      assert.same({ "Order", 5 }, { r.aggregate, r.version })
      _, r = d:get("/aggregates/BankAccount/r1")
      assert.same({ "BankAccount-r1", 2, 12 }, { r.stream, r.version, r.state.balance })
      -- at: the last event recorded at or before the time
      local _, stream = d:get("/streams/Order-r1")
      local last = stream.events[5].recorded_at
      _, r = d:get("/aggregates/Order/r1?at=" .. last)
      assert.equal(5, r.version)
      _, r = d:get("/aggregates/Order/r1?at=2000-01-01T00:00:00Z")
      assert.same({ 0, "none" }, { r.version, r.state.status })
      _, r = d:get("/aggregates/Order/r1?at=2999-01-01T00:00:00%2B02:00")
      assert.equal(5, r.version)
      -- an id never written: the initial state at version 0
      status, r = d:get("/aggregates/Order/never")
      assert.equal(200, status)
      assert.same({ 0, "none", false }, { r.version, r.state.status, r.deleted })
    end)

    it("3.5 refuses bad aggregate queries: 400 for at=, version=, parameters; 404 for an unknown type", function()
      local cases = {
        { "/aggregates/Order/r1?at=yesterday", 400, '"yesterday" is not an RFC 3339 time' },
        { "/aggregates/Order/r1?at=2026-13-01T00:00:00Z", 400, "is not an RFC 3339 time" },
        { "/aggregates/Order/r1?at=", 400, "is not an RFC 3339 time" },
        { "/aggregates/Order/r1?version=-1", 400, "version must be an integer" },
        { "/aggregates/Order/r1?version=two", 400, "version must be an integer" },
        { "/aggregates/Order/r1?from=1", 400, 'unknown query parameter "from" %(this route takes: version at%)' },
        { "/aggregates/Nope/r1", 404, "unknown aggregate Nope" },
        { "/aggregates/Order/%FF", 400, "aggregate id is not valid UTF%-8" },
      }
      for _, c in ipairs(cases) do
        local status, r = d:get(c[1])
        assert.equal(c[2], status, c[1])
        assert.matches(c[3], r.error.message)
      end
    end)
  end)

  describe("4. paths and routes", function()
    local d
    setup(function() d = start() end)
    teardown(function() stop(d) end)

    it("4.1 percent-decodes path segments (not '+'), and query values ('+' is a space)", function()
      local cases = {
        { "/streams/Order-a%20b", "Order-a b" },
        { "/streams/Raw-a%2Fb", "Raw-a/b" },
        { "/streams/Raw-a+b", "Raw-a+b" },
        { "/streams/Raw-%C3%A9t%c3%a9", "Raw-été" },
        { "/streams/Raw-%25", "Raw-%" },
      }
      for _, c in ipairs(cases) do
        local status, r = d:post(c[1], { events = { { type = "Some Thing" } } })
        assert.equal(200, status, c[1])
        assert.equal(c[2], r.stream)
        local s2, read = d:get(c[1])
        assert.equal(200, s2, c[1])
        assert.equal(c[2], read.stream)
        assert.equal(c[2], read.events[1].stream)
      end
      local status, r = d:command("Order", "x y", "CreateOrder", { customer_id = "c" })
      assert.equal(200, status)
      assert.equal("Order-x y", r.stream)
      status, r = d:get("/aggregates/Order/x%20y")
      assert.same({ 200, "x y", 1 }, { status, r.id, r.version })
      _, r = d:get("/events?type=Some+Thing")
      assert.equal(#cases, #r.events)
      _, r = d:get("/events?type=Some%20Thing&category=Raw")
      assert.equal(#cases - 1, #r.events)
      -- the query and a fragment are not part of the path
      status, r = d:get("/streams/Raw-a+b?limit=1#frag")
      assert.same({ 200, "Raw-a+b" }, { status, r.stream })
    end)

    it("4.2 refuses bad percent-encoding, invalid UTF-8, control characters and long segments with 400", function()
      local long = string.rep("a", 513)
      local cases = {
        { "/streams/Order-a%zz", "bad percent%-encoding in the path" },
        { "/streams/Order-a%2", "bad percent%-encoding in the path" },
        { "/streams/Order-a%", "bad percent%-encoding in the path" },
        { "/streams/Order-a%00b", "bad percent%-encoding in the path" },
        { "/streams/Order-a%ff", "stream name is not valid UTF%-8" },
        { "/streams/Order-%C3", "stream name is not valid UTF%-8" },
        { "/streams/Order-%ED%A0%80", "stream name is not valid UTF%-8" },
        { "/streams/Order-a%01", "stream name contains a control character" },
        { "/streams/Order-a%7F", "stream name contains a control character" },
        { "/streams/Order-a%0Ab", "stream name contains a control character" },
        { "/streams/" .. long, "513 bytes long; the limit is 512" },
        { "/streams/" .. string.rep("%41", 600), "longer than 512 bytes" },
        { "/aggregates/Order/a%zz", "bad percent%-encoding in the path" },
        { "/aggregates/Order/" .. long, "512" },
        { "/aggregates/Order/a%01", "aggregate id contains a control character" },
        { "/events?type=%zz", "bad percent%-encoding in the query string" },
        { "/events?category=%00", "bad percent%-encoding in the query string" },
      }
      for _, c in ipairs(cases) do
        local status, r = d:get(c[1])
        assert.equal(400, status, c[1])
        assert.equal("bad_request", r.error.code, c[1])
        assert.matches(c[2], r.error.message)
      end
      local status, r = d:post("/streams/Order-a%zz", { events = { { type = "A" } } })
      assert.equal(400, status)
      assert.matches("bad percent%-encoding", r.error.message)
      -- 512 bytes is a valid name: it just does not exist
      status, r = d:get("/streams/" .. string.rep("a", 512))
      assert.equal(404, status)
      assert.equal("not_found", r.error.code)
      status = d:post("/streams/" .. string.rep("%41", 512), { events = { { type = "A" } } })
      assert.equal(200, status)
      assert.equal(200, (d:get("/streams/" .. string.rep("A", 512))))
    end)

    it("4.3 answers 404 for unknown routes; a trailing slash is forgiven", function()
      -- ("/" and "/streams" are routes: the console, and the list of streams)
      for _, path in ipairs { "/nope", "/streams/a/b", "/modulesx", "/console/a/b", "/aggregates/Order",
                              "/aggregates/Order/1/2", "/commands/x", "/health/x", "/a/b/c/d/e/f/g",
                              "/Health", "/eventsx" } do
        local status, r = d:get(path)
        assert.equal(404, status, path)
        assert.equal("not_found", r.error.code, path)
      end
      local status, r = d:get("/nope")
      assert.equal("no route /nope; see README.md for the API", r.error.message)
      status, r = d:get("/health/")
      assert.same({ 200, "ok" }, { status, r.status })
      status = d:post("/commands/", command_body("Order", "slash", "CreateOrder", { customer_id = "c" }))
      assert.equal(200, status)
    end)

    it("4.4 answers 405 with an Allow header for a method a route does not take", function()
      local cases = {
        { "DELETE", "/commands", "POST" }, { "GET", "/commands", "POST" }, { "PUT", "/commands", "POST" },
        { "PUT", "/streams/x", "GET, POST" }, { "DELETE", "/streams/x", "GET, POST" },
        { "POST", "/events", "GET" }, { "POST", "/health", "GET" }, { "POST", "/metrics", "GET" },
        { "POST", "/aggregates/Order/1", "GET" }, { "PATCH", "/aggregates/Order/1", "GET" },
        { "POST", "/subscribe", "GET" },
      }
      for _, c in ipairs(cases) do
        local status, r, _, headers = d:request(c[1], c[2])
        assert.equal(405, status, c[1] .. " " .. c[2])
        assert.equal(c[3], headers.allow, c[1] .. " " .. c[2])
        assert.matches(c[1] .. " is not allowed on this route %(allowed: " .. c[3] .. "%)", r.error.message)
      end
    end)

    it("4.5 refuses query parameters on POST routes, which take none, rather than ignore them", function()
      local body = command_body("Order", "q1", "CreateOrder", { customer_id = "c" })
      local status, r = d:post("/commands?expected_version=5", body)
      assert.equal(400, status)
      assert.equal("bad_request", r and r.error and r.error.code)
      assert.matches('unknown query parameter "expected_version"', r.error.message)
      status, r = d:post("/streams/Query-1?expected_version=7", { events = { { type = "A" } } })
      assert.equal(400, status)
      assert.matches('unknown query parameter "expected_version"', r.error.message)
      assert.equal(404, (d:get("/streams/Order-q1")))
      assert.equal(404, (d:get("/streams/Query-1")))
    end)

    it("4.6 answers HEAD like GET, without a body", function()
      local text = d:raw("HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      local status, headers, body = parse_raw(text)
      assert.equal(200, status)
      assert.is_true(tonumber(headers["content-length"]) > 0)
      assert.equal("", body)
      text = d:raw("HEAD /streams/none-1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      status, headers, body = parse_raw(text)
      assert.equal(404, status)
      assert.equal("", body)
    end)
  end)

  describe("5. HTTP limits and framing", function()
    local d
    setup(function()
      d = start { args = { "--max-body", "2048", "--request-timeout-ms", "300", "--idle-timeout-ms", "400" } }
    end)
    teardown(function() stop(d) end)

    it("5.1 refuses a body over --max-body with 413 too_large (Content-Length), and takes one at the limit", function()
      local head = head_position(d)
      local body = padded_command("big", 2049)
      local status, r, text, headers = d:post("/commands", body)
      assert.equal(413, status, text)
      assert.same({ code = "too_large", message = "request body would exceed the limit of 2048 bytes" }, r.error)
      assert.equal("close", headers.connection)
      assert.equal(head, head_position(d))
      -- a declared length over the limit is refused before the body is sent
      text = d:raw("POST /commands HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" ..
                   "Content-Length: 1000000\r\n\r\n{")
      assert.equal(413, (parse_raw(text)))
      status, r = d:post("/commands", padded_command("fits", 2048))
      assert.equal(200, status, r and r.error and r.error.message)
      assert.equal("Order-fits", r.stream)
    end)

    it("5.2 refuses a chunked body over --max-body with 413, and decodes one under it", function()
      local head = head_position(d)
      local chunk = string.rep("x", 1500)
      local text = d:raw("POST /streams/Chunk-1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" ..
                         "Transfer-Encoding: chunked\r\n\r\n" ..
                         ("%x\r\n%s\r\n"):format(#chunk, chunk) .. ("%x\r\n%s\r\n"):format(#chunk, chunk) ..
                         "0\r\n\r\n")
      local status = parse_raw(text)
      assert.equal(413, status, text)
      assert.equal("too_large", error_of(text).code)
      assert.equal(head, head_position(d))
      local body = command_body("Order", "chunked", "CreateOrder", { customer_id = "c" })
      local a, b = body:sub(1, 10), body:sub(11)
      text = d:raw("POST /commands HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" ..
                   "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" ..
                   ("%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"):format(#a, a, #b, b))
      local s2, _, rbody = parse_raw(text)
      assert.equal(200, s2, text)
      assert.equal("Order-chunked", json.decode(rbody).stream)
    end)

    it("5.3 answers Expect: 100-continue, and refuses a too-large one without inviting the body", function()
      local body = command_body("Order", "expect", "CreateOrder", { customer_id = "c" })
      local c = daemon.connect(d)
      assert(c:send("POST /commands HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" ..
                    "Content-Length: " .. #body .. "\r\nExpect: 100-continue\r\n\r\n"))
      assert.equal("HTTP/1.1 100 Continue", c:receive("*l"))
      assert.equal("", c:receive("*l"))
      assert(c:send(body))
      local status, _, rbody = daemon.read_response(c)
      c:close()
      assert.equal(200, status)
      assert.equal("Order-expect", json.decode(rbody).stream)
      local text = d:raw("POST /commands HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" ..
                         "Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
      assert.matches("^HTTP/1%.1 413 ", text)
      assert.is_nil(text:find("100 Continue", 1, true))
    end)

    it("5.4 refuses request headers over 16 KiB with 431, and takes them just under", function()
      local text = d:raw("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " .. string.rep("a", 17 * 1024) .. "\r\n\r\n")
      local status, headers = parse_raw(text)
      assert.equal(431, status, text:sub(1, 200))
      assert.equal("close", headers.connection)
      local e = error_of(text)
      assert.equal("too_large", e.code)
      assert.equal("request line and headers exceed the limit of 16384 bytes", e.message)
      local many = {}
      for i = 1, 400 do many[i] = ("X-H%d: %s"):format(i, string.rep("b", 40)) end
      text = d:raw("GET /health HTTP/1.1\r\nHost: x\r\n" .. table.concat(many, "\r\n") .. "\r\n\r\n")
      assert.equal(431, (parse_raw(text)))
      text = d:raw("GET /health?" .. string.rep("a", 17 * 1024) .. " HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.equal(431, (parse_raw(text)))
      local s2 = d:get("/health", { headers = { ["X-Big"] = string.rep("a", 15 * 1024) } })
      assert.equal(200, s2)
    end)

    it("5.5 answers malformed HTTP with 400 bad_request and closes", function()
      local cases = {
        "GARBAGE\r\n\r\n",
        "GET /health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        "GET /health HTTP/7.0\r\nHost: x\r\n\r\n",
        "POST /commands HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        "POST /commands HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        "POST /commands HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /commands HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "GET /he alth HTTP/1.1\r\nHost: x\r\n\r\n",
      }
      for _, bytes in ipairs(cases) do
        local text = d:raw(bytes)
        local status, headers = parse_raw(text)
        assert.equal(400, status, bytes .. " -> " .. text)
        assert.equal("close", headers.connection)
        local e = error_of(text)
        assert.equal("bad_request", e.code)
        assert.matches("^malformed HTTP request", e.message)
      end
      assert.equal(200, (d:get("/health")))
    end)

    it("5.6 answers 408 when a request does not arrive within --request-timeout-ms", function()
      local t0 = socket.gettime()
      local text = d:raw("GET /health HTTP/1.1\r\nHost: x\r\n")
      local status = parse_raw(text)
      assert.equal(408, status, text)
      local e = error_of(text)
      assert.same({ "timeout", "request not received within 300 ms" }, { e.code, e.message })
      assert.is_true(socket.gettime() - t0 < 5)
      text = d:raw("POST /commands HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" ..
                   "Content-Length: 100\r\n\r\n{\"aggregate\":")
      assert.equal(408, (parse_raw(text)))
    end)

    it("5.7 closes a keep-alive connection left idle for --idle-timeout-ms", function()
      local c = daemon.connect(d)
      assert(c:send(req("GET", "/health")))
      local status, headers = daemon.read_response(c)
      assert.same({ 200, "keep-alive" }, { status, headers.connection })
      local t0 = socket.gettime()
      c:settimeout(5)
      local got, err = c:receive(1)
      c:close()
      assert.same({ nil, "closed" }, { got, err })
      local waited = socket.gettime() - t0
      assert.is_true(waited > 0.2 and waited < 3, "closed after " .. waited .. " s")
      -- a connection that never sends a byte too
      c = daemon.connect(d)
      c:settimeout(5)
      got, err = c:receive(1)
      c:close()
      assert.same({ nil, "closed" }, { got, err })
    end)

    it("5.8 refuses connections over --max-connections with 503", function()
      local small = start { args = { "--max-connections", "1" } }
      finally(function() stop(small) end)
      local first = daemon.connect(small)
      socket.sleep(0.05)
      local text = small:raw(req("GET", "/health"))
      local status = parse_raw(text)
      assert.equal(503, status, text)
      assert.same({ "unavailable", "too many connections (the limit is 1)" },
                  { error_of(text).code, error_of(text).message })
      -- the held connection still works
      assert(first:send(req("GET", "/health", nil, { "Connection: close" })))
      assert.equal(200, (daemon.read_response(first)))
      first:close()
      socket.sleep(0.05)
      assert.equal(200, (small:get("/health")))
    end)
  end)

  describe("6. keep-alive and pipelining", function()
    local d
    setup(function() d = start() end)
    teardown(function() stop(d) end)

    it("6.1 keeps a connection open across requests", function()
      local c = daemon.connect(d)
      for i = 1, 3 do
        assert(c:send(req("POST", "/commands", command_body("BankAccount", "k" .. i, "OpenAccount", { owner = "A" }))))
        local status, headers, body = daemon.read_response(c)
        assert.equal(200, status)
        assert.equal("keep-alive", headers.connection)
        assert.equal("BankAccount-k" .. i, json.decode(body).stream)
        assert(c:send(req("GET", "/streams/BankAccount-k" .. i)))
        status, headers = daemon.read_response(c)
        assert.equal(200, status)
        assert.equal("keep-alive", headers.connection)
      end
      c:close()
    end)

    it("6.2 answers pipelined requests in order, commands (answered later) included", function()
      local bytes = table.concat {
        req("POST", "/commands", command_body("Order", "p1", "CreateOrder", { customer_id = "c" })),
        req("GET", "/streams/Order-p1"),
        req("GET", "/health"),
        req("POST", "/commands", command_body("Order", "p1", "AddItem", { sku = "A", qty = 2, price = 3 })),
        req("POST", "/commands", command_body("Order", "p1", "CreateOrder", { customer_id = "c" })),
        req("POST", "/streams/Side-1", '{"events":[{"type":"A"}]}'),
        req("GET", "/aggregates/Order/p1"),
        req("GET", "/nope"),
        req("POST", "/commands", "{broken"),
        req("GET", "/streams/Order-p1", nil, { "Connection: close" }),
      }
      local r, closed = exchange(d, bytes, 11, true)
      assert.equal(10, #r)
      assert.same({ 200, 200, 200, 200, 422, 200, 200, 404, 400, 200 },
                  { r[1].status, r[2].status, r[3].status, r[4].status, r[5].status, r[6].status,
                    r[7].status, r[8].status, r[9].status, r[10].status })
      assert.same({ "Order-p1", 1 }, { r[1].json.stream, r[1].json.version })
      assert.same({ 1, 1 }, { r[2].json.version, #r[2].json.events })
      assert.equal("ok", r[3].json.status)
      assert.equal(r[1].json.position, r[3].json.position)
      assert.equal(2, r[4].json.version)
      assert.equal("order already exists", r[5].json.error.message)
      assert.equal("Side-1", r[6].json.stream)
      assert.same({ 2, 6 }, { r[7].json.version, r[7].json.state.total })
      assert.equal("not_found", r[8].json.error.code)
      assert.matches("^malformed JSON", r[9].json.error.message)
      assert.equal(2, #r[10].json.events)
      assert.equal("close", r[10].headers.connection)
      assert.is_true(closed)
    end)

    it("6.3 commits pipelined commands to one stream in order", function()
      local parts = { req("POST", "/commands", command_body("Order", "p2", "CreateOrder", { customer_id = "c" })) }
      for i = 1, 100 do -- about 40 KB in one write: more than the server reads ahead (16 KiB)
        parts[#parts + 1] = req("POST", "/commands", command_body("Order", "p2", "AddItem", { sku = "S" .. i, qty = 1, price = i }))
        parts[#parts + 1] = req("POST", "/commands", command_body("BankAccount", "p2-" .. i, "OpenAccount", { owner = "A" }))
      end
      local r = exchange(d, table.concat(parts), #parts)
      assert.equal(#parts, #r)
      assert.equal(1, r[1].json.version)
      for i = 1, 100 do
        local add, open = r[2 * i], r[2 * i + 1]
        assert.equal(200, add.status)
        assert.same({ i + 1, "S" .. i }, { add.json.version, add.json.events[1].data.sku })
        assert.same({ 200, "BankAccount-p2-" .. i }, { open.status, open.json.stream })
      end
      local _, stream = d:get("/streams/Order-p2")
      assert.equal(101, stream.version)
      for i = 1, 100 do assert.equal("S" .. i, stream.events[i + 1].data.sku) end
    end)

    it("6.4 skips the body of a GET and answers what follows it", function()
      local filler = "GET /nope HTTP/1.1\r\n\r\n" -- looks like a request; is only a body
      local bytes = "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: " .. #filler .. "\r\n\r\n" .. filler ..
                    req("GET", "/events?limit=1", nil, { "Connection: close" })
      local r, closed = exchange(d, bytes, 3, true)
      assert.equal(2, #r)
      assert.same({ 200, 200 }, { r[1].status, r[2].status })
      assert.equal("ok", r[1].json.status)
      assert.is_table(r[2].json.events)
      assert.is_true(closed)
    end)

    it("6.5 answers HTTP/1.0 and closes; Connection: close closes", function()
      local text = d:raw("GET /health HTTP/1.0\r\n\r\n")
      local status, headers = parse_raw(text)
      assert.equal(200, status)
      assert.equal("close", headers.connection)
      text = d:raw("GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /health HTTP/1.0\r\n\r\n")
      local n = select(2, text:gsub("HTTP/1%.1 200", ""))
      assert.equal(2, n)
      local r, closed = exchange(d, req("GET", "/health", nil, { "Connection: close" }) .. req("GET", "/health"), 2, true)
      assert.equal(1, #r)
      assert.is_true(closed)
    end)

    it("6.6 answers everything sent before the client shut down its sending side", function()
      local c = daemon.connect(d)
      assert(c:send(req("POST", "/commands", command_body("Order", "hc", "CreateOrder", { customer_id = "c" })) ..
                    req("GET", "/streams/Order-hc") .. req("GET", "/health")))
      assert(c:shutdown("send"))
      local statuses = {}
      for _ = 1, 4 do
        local status = daemon.read_response(c)
        if not status then break end
        statuses[#statuses + 1] = status
      end
      c:close()
      assert.same({ 200, 200, 200 }, statuses)
    end)
  end)

  describe("7. GET /health and GET /metrics", function()
    local d
    setup(function() d = start() end)
    teardown(function() stop(d) end)

    it("7.1 reports status, position, pid and work in flight", function()
      local status, h = d:get("/health")
      assert.equal(200, status)
      assert.same({ "ok", d.pid, 0, 0 }, { h.status, h.pid, h.subscribers, h.in_flight })
      assert.is_number(h.uptime_ms)
      assert.is_number(h.position)
      if support.store_kind == "sqlite" then
        -- one daemon on its own SQLite store is always the leader, with no store link to show
        assert.same({ true, nil }, { h.leader, h.connection })
      else
        -- on PostgreSQL it listens without waiting for its links to the
        -- server: "reconnecting" and not leader until they are up and the
        -- server grants the lock
        assert.is_truthy(h.connection == "connected" or h.connection == "reconnecting", h.connection)
        support.eventually(function()
          local _, now = d:get("/health")
          return now.connection == "connected" and now.leader == true
        end, 60, "the store links and the leader lock")
      end
      local _, r = d:command("Order", "h1", "CreateOrder", { customer_id = "c" })
      assert.equal(h.position + 1, r.position)
      d:command("Order", "h1", "AddItem", { sku = "A", qty = 1, price = 1 })
      local _, h2 = d:get("/health")
      assert.equal(h.position + 2, h2.position)
      local _, all = d:get("/events?limit=1")
      assert.equal(h2.position, all.head)
    end)

    it("7.2 exposes Prometheus metrics whose counters move", function()
      local before, headers = metrics(d)
      assert.equal("text/plain; version=0.0.4", headers["content-type"])
      for line in before:gmatch("[^\n]+") do
        assert.is_truthy(line:match("^# HELP [%w_]+ .+$") or line:match("^# TYPE [%w_]+ %a+$") or
                         line:match('^[%w_]+{[%w_]+="[^"]*"[^}]*} [%d%.e%+%-]+$') or line:match("^[%w_]+ [%d%.e%+%-]+$"),
                         "not Prometheus text: " .. line)
      end
      for _, name in ipairs { "ebb_events_appended_total", "ebb_commit_batch_size_count", "ebb_commit_seconds_sum",
                              "ebb_fsync_total", "ebb_subscribers", "ebb_aggregate_cache_hits_total",
                              "process_resident_memory_bytes", "ebb_head_position", "ebb_commands_in_flight" } do
        assert.is_number(sample(before, name), name)
      end
      assert.is_true(sample(before, "process_resident_memory_bytes") > 0)
      assert.equal(0, sample(before, "ebb_subscribers"))
      assert.is_number(sample(before, 'ebb_commit_batch_size_bucket{le="+Inf"}'))
      assert.is_number(sample(before, 'ebb_commands_total{result="ok"}'))

      d:command("BankAccount", "m1", "OpenAccount", { owner = "A", initial_deposit = 5 })
      d:command("BankAccount", "m1", "Deposit", { amount = 5 })
      d:command("BankAccount", "m1", "Withdraw", { amount = 500 })
      d:get("/streams/BankAccount-m1")
      d:get("/streams/BankAccount-none")
      d:post("/streams/Raw-m", { events = { { type = "A" }, { type = "B" } } })
      local after = metrics(d)
      local function delta(series) return (sample(after, series) or 0) - (sample(before, series) or 0) end
      assert.equal(2, delta('ebb_http_requests_total{route="commands",status="200"}'))
      assert.equal(1, delta('ebb_http_requests_total{route="commands",status="422"}'))
      assert.equal(1, delta('ebb_http_requests_total{route="stream",status="200"}'))
      assert.equal(1, delta('ebb_http_requests_total{route="stream",status="404"}'))
      assert.equal(1, delta('ebb_http_requests_total{route="append",status="200"}'))
      assert.is_true(sample(after, 'ebb_http_requests_total{route="metrics",status="200"}') >= 1)
      assert.equal(2, delta('ebb_commands_total{result="ok"}'))
      assert.equal(1, delta('ebb_commands_total{result="rejected"}'))
      assert.equal(4, delta("ebb_events_appended_total"))
      assert.is_true(delta("ebb_commit_batch_size_count") >= 1)
      assert.equal(3, delta("ebb_commit_batch_size_sum"))
      assert.equal(sample(after, "ebb_commit_batch_size_count"), sample(after, 'ebb_commit_batch_size_bucket{le="+Inf"}'))
      assert.is_true(delta("ebb_commit_seconds_count") >= 1)
      assert.is_true(sample(after, "ebb_commit_seconds_sum") > 0)
      assert.is_true(delta("ebb_aggregate_cache_hits_total") >= 1)
      assert.equal(head_position(d), sample(after, "ebb_head_position"))
      assert.is_true(sample(after, "ebb_fsync_total") >= 0)
    end)
  end)

  describe("8. bearer token", function()
    local d
    setup(function() d = start { args = { "--token", "s3cret" } } end)
    teardown(function() stop(d) end)

    it("8.1 needs Authorization: Bearer <token> on every route but /health: else 401 with WWW-Authenticate", function()
      local status, h = d:get("/health")
      assert.same({ 200, "ok" }, { status, h.status })
      local head = h.position
      local body = command_body("Order", "t1", "CreateOrder", { customer_id = "c" })
      local routes = { { "GET", "/events" }, { "GET", "/streams/Order-t1" }, { "GET", "/aggregates/Order/t1" },
                       { "GET", "/metrics" }, { "POST", "/commands", body },
                       { "POST", "/streams/Order-t1", '{"events":[{"type":"X"}]}' }, { "GET", "/subscribe" } }
      local bad = { {}, { token = "wrong" }, { token = "s3cre" }, { token = "s3cretX" }, { token = "" },
                    { headers = { Authorization = "Basic czNjcmV0" } }, { headers = { Authorization = "s3cret" } } }
      for _, route in ipairs(routes) do
        for _, opts in ipairs(bad) do
          opts.body = route[3]
          local s, r, _, headers = d:request(route[1], route[2], opts)
          assert.equal(401, s, route[2])
          assert.same({ code = "unauthorized", message = "this daemon needs Authorization: Bearer <token>" }, r.error)
          assert.equal("Bearer", headers["www-authenticate"])
        end
      end
      status, h = d:get("/health", { token = "s3cret" })
      assert.equal(head, h.position) -- nothing got in
    end)

    it("8.2 serves every route with the right token (the scheme in any case)", function()
      local body = command_body("Order", "t2", "CreateOrder", { customer_id = "c" })
      assert.equal(200, (d:post("/commands", body, { token = "s3cret" })))
      assert.equal(200, (d:get("/streams/Order-t2", { token = "s3cret" })))
      assert.equal(200, (d:get("/events", { token = "s3cret" })))
      assert.equal(200, (d:get("/aggregates/Order/t2", { headers = { Authorization = "bearer s3cret" } })))
      assert.equal(200, (d:get("/metrics", { headers = { Authorization = "BEARER s3cret" } })))
    end)

    it("8.3 the CLI goes through it with --token (or EBB_TOKEN), and fails with exit 1 without", function()
      local out, err, code = run { "send", "Order", "t3", "CreateOrder", '{"customer_id":"c"}', "--url", d.url,
                                   "--token", "s3cret" }
      assert.equal(0, code, err)
      assert.equal("Order-t3", json.decode(out).stream)
      out, err, code = run({ "read", "Order-t3", "--url", d.url }, { env = "EBB_TOKEN=s3cret" })
      assert.equal(0, code, err)
      assert.equal(1, #lines(out))
      out, err, code = run { "read", "Order-t3", "--url", d.url }
      assert.equal(1, code)
      assert.equal("", out)
      assert.matches("unauthorized", err)
      out, err, code = run { "send", "Order", "t4", "CreateOrder", '{"customer_id":"c"}', "--url", d.url,
                             "--token", "wrong" }
      assert.equal(1, code)
      assert.matches("unauthorized", err)
      assert.equal(404, (d:get("/streams/Order-t4", { token = "s3cret" })))
    end)

    it("8.4 refuses to listen beyond loopback without a token, and does with one", function()
      local dir = support.tmpdir()
      local out, err, code = run { "serve", "--listen", "0.0.0.0:0", "--data", dir,
                                   "--aggregates", support.root .. "/aggregates" }
      assert.is_true(code ~= 0 and code ~= 124, "exit " .. tostring(code))
      assert.is_nil(out:find("listening", 1, true))
      assert.matches("without a token", err)
      assert.matches("%-%-token", err)
      support.rmdir(dir)
      local open = start { listen = "0.0.0.0:0", args = { "--token", "s3cret" } }
      finally(function() stop(open) end)
      assert.matches("^http://0%.0%.0%.0:%d+$", open.url)
      open.host = "127.0.0.1"
      assert.equal(200, (open:get("/health")))
      assert.equal(401, (open:get("/events")))
      assert.equal(200, (open:get("/events", { token = "s3cret" })))
    end)
  end)

  describe("9. the data directory's daemon, and the CLI beside and through it", function()
    local d, aggs
    setup(function()
      aggs = support.root .. "/aggregates"
      d = start()
      assert.equal(200, (d:command("Order", "o-1", "CreateOrder", { customer_id = "c" })))
      assert.equal(200, (d:command("Order", "o-1", "AddItem", { sku = "A", qty = 1, price = 10 })))
      assert.equal(200, (d:command("Order", "o-1", "AddItem", { sku = "B", qty = 2, price = 20 })))
      assert.equal(200, (d:command("BankAccount", "a-1", "OpenAccount", { owner = "Ann", initial_deposit = 50 })))
    end)
    teardown(function() stop(d) end)

    local function here(args)
      local all = { table.unpack(args) }
      for _, a in ipairs { "--data", d.data, "--aggregates", aggs, "--durability", "normal" } do all[#all + 1] = a end
      return all
    end
    local function remote(args)
      local all = { table.unpack(args) }
      all[#all + 1] = "--url"
      all[#all + 1] = d.url
      return all
    end

    it("9.1 a second `ebb serve` on the same data directory exits 8 naming the holder", function()
      local out, err, code = run { "serve", "--data", d.data, "--aggregates", aggs, "--listen", "127.0.0.1:0" }
      assert.equal(8, code, err)
      assert.equal("", out)
      assert.matches("busy", err)
      assert.matches("pid " .. d.pid, err, 1, true)
      assert.matches(d.url, err, 1, true)
      assert.equal(200, (d:get("/health")))
    end)

    -- Readers on the directory, beside its daemon, answer what the daemon has.
    local function readers_agree()
      local _, stream = d:get("/streams/Order-o-1")
      local head = head_position(d)
      local out, err, code = run(here { "read", "Order-o-1" })
      assert.equal(0, code, err)
      assert.equal(stream.version, #lines(out))
      out, err, code = run(here { "events" })
      assert.equal(0, code, err)
      assert.equal(head, #lines(out))
      out, err, code = run(here { "state", "Order", "o-1" })
      assert.equal(0, code, err)
      assert.equal(50, json.decode(out).state.total)
      out, err, code = run(here { "export" })
      assert.equal(0, code, err)
      assert.equal(head, #lines(out))
      out, err, code = run(here { "check" })
      assert.equal(0, code, err)
    end

    if support.store_kind == "sqlite" then
      -- The SQLite store is the directory's file, and its daemon is its one writer.
      it("9.2 writers on the directory exit 8 naming --url; readers still work", function()
        for _, args in ipairs {
          { "send", "Order", "o-2", "CreateOrder", '{"customer_id":"c"}' },
          { "delete", "Order-o-1" },
          { "snapshots", "delete" },
        } do
          local out, err, code = run(here(args))
          assert.equal(8, code, args[1] .. ": " .. err)
          assert.equal("", out)
          assert.matches("%-%-url " .. d.url:gsub("%p", "%%%0"), err)
          assert.matches("pid " .. d.pid, err, 1, true)
        end
        local out, err, code = run(here { "import" }, { stdin = "" })
        assert.equal(8, code, err)
        assert.matches("--url " .. d.url, err, 1, true)
        assert.equal("", out)
        assert.equal(404, (d:get("/streams/Order-o-2")))
        readers_agree()
      end)
    else
      -- A PostgreSQL store is shared by design: the CLI with --store is one
      -- more writer beside the daemon (the directory's lock keeps a second
      -- daemon out, 9.1, for the read models it holds; the CLI writes none).
      it("9.2 writers beside the daemon write to the shared store, and the daemon decides on it; readers still work", function()
        assert.equal(200, (d:command("Order", "o-2", "CreateOrder", { customer_id = "c" }))) -- cached by the daemon
        local out, err, code = run(here { "send", "Order", "o-2", "AddItem", '{"sku":"A","qty":1,"price":10}' })
        assert.equal(0, code, err)
        assert.equal(2, json.decode(out).version)
        -- the daemon's cached state is one event behind: its command is decided again on the store's
        local status, r = d:command("Order", "o-2", "AddItem", { sku = "B", qty = 1, price = 5 })
        assert.equal(200, status)
        assert.equal(3, r.version)
        local _, state = d:get("/aggregates/Order/o-2")
        assert.same({ 3, 15 }, { state.version, state.state.total })
        out, err, code = run(here { "delete", "Order-o-2" })
        assert.equal(0, code, err)
        local deleted = json.decode(out)
        assert.same({ true, 4 }, { deleted.deleted, deleted.version })
        assert.equal(410, (d:command("Order", "o-2", "AddItem", { sku = "C", qty = 1, price = 1 })))
        out, err, code = run(here { "snapshots", "delete" })
        assert.equal(0, code, err)
        assert.is_number(json.decode(out).deleted)
        out, err, code = run(here { "import" }, { stdin = "" })
        assert.equal(0, code, err)
        -- the daemon's head follows the CLI's commits (it is notified of them)
        support.eventually(function() return head_position(d) == deleted.position end, 60,
                           "the daemon's head to reach the CLI's delete")
        readers_agree()
      end)
    end

    it("9.3 `--url` sends through the daemon and reads with exactly the local output", function()
      local out, err, code = run(remote { "send", "Order", "o-1", "ConfirmOrder" })
      assert.equal(0, code, err)
      local r = json.decode(out)
      assert.same({ "Order-o-1", 4, "OrderConfirmed" }, { r.stream, r.version, r.events[1].type })
      assert.equal(1, select(2, out:gsub("\n", "")))
      out, err, code = run(remote { "send", "order", "o-3", "CreateOrder", '{"customer_id":"z"}', "--expect",
                                    "no_stream", "--command-id", "cli-1", "--metadata", '{"user_id":"u"}' })
      assert.equal(0, code, err)
      r = json.decode(out)
      assert.same({ "Order-o-3", "cli-1", "u" }, { r.stream, r.events[1].metadata.command_id, r.events[1].metadata.user_id })
      local again = run(remote { "send", "order", "o-3", "CreateOrder", '{"customer_id":"z"}', "--command-id", "cli-1" })
      assert.same(json.decode(out), json.decode(again))

      for _, args in ipairs {
        { "read", "Order-o-1" },
        { "read", "Order-o-1", "--backward" },
        { "read", "Order-o-1", "--backward", "--limit", "2" },
        { "read", "Order-o-1", "--from", "2", "--limit", "2" },
        { "read", "Order-o-1", "--from", "3", "--backward" },
        { "read", "Order-o-1", "--from", "9" },
        { "events" },
        { "events", "--after", "2", "--limit", "2" },
        { "events", "--category", "Order", "--type", "ItemAdded" },
        { "events", "--category", "Nothing" },
      } do
        local lout, lerr, lcode = run(here(args))
        local rout, rerr, rcode = run(remote(args))
        local what = table.concat(args, " ")
        assert.equal(lcode, rcode, what .. ": " .. lerr .. " | " .. rerr)
        assert.equal(lout, rout, what)
      end
      local lout = run(here { "state", "Order", "o-1" })
      local rout, rerr, rcode = run(remote { "state", "Order", "o-1" })
      assert.equal(0, rcode, rerr)
      assert.same(json.decode(lout), json.decode(rout))
      lout = run(here { "state", "Order", "o-1", "--version", "2" })
      rout = run(remote { "state", "Order", "o-1", "--version", "2" })
      assert.same(json.decode(lout), json.decode(rout))
      assert.equal(2, json.decode(rout).version)
    end)

    it("9.4 `--url` pages through more events than one answer holds", function()
      local events = {}
      for i = 1, 1500 do events[i] = { type = "Tick", data = { i = i } } end
      assert.equal(200, (d:post("/streams/Big-1", { events = events })))
      local lout = run(here { "read", "Big-1" })
      local rout, rerr, rcode = run(remote { "read", "Big-1" })
      assert.equal(0, rcode, rerr)
      assert.equal(1500, #lines(rout))
      assert.equal(lout, rout)
      lout = run(here { "read", "Big-1", "--backward", "--limit", "1200" })
      rout = run(remote { "read", "Big-1", "--backward", "--limit", "1200" })
      assert.equal(1200, #lines(rout))
      assert.equal(lout, rout)
      lout = run(here { "events", "--type", "Tick", "--after", "3" })
      rout = run(remote { "events", "--type", "Tick", "--after", "3" })
      assert.equal(1500, #lines(rout))
      assert.equal(lout, rout)
    end)

    -- A directory of its own with the same history as the daemon's streams
    -- o-5, a-5 and o-95, for the local answers to compare with.
    local function twin()
      local other = support.tmpdir()
      local cli = support.cli(other)
      local history = {
        { "send", "Order", "o-5", "CreateOrder", '{"customer_id":"c"}' },
        { "send", "Order", "o-5", "AddItem", '{"sku":"A","qty":1,"price":10}' },
        { "send", "BankAccount", "a-5", "OpenAccount", '{"owner":"Ann","initial_deposit":50}' },
        { "send", "Order", "o-95", "CreateOrder", '{"customer_id":"c"}', "--command-id", "used-5" },
      }
      for _, args in ipairs(history) do
        assert.equal(0, select(3, cli(args)))
        local _, err, code = run(remote(args))
        assert.is_true(code == 0 or err:match("already exists") ~= nil, err) -- the daemon's may be there already
      end
      return other, cli
    end

    it("9.5 `--url` fails with the local exit codes and error lines", function()
      local other, cli = twin()
      finally(function() support.rmdir(other) end)
      local cases = {
        { { "send", "BankAccount", "a-5", "Withdraw", '{"amount":500}' }, 5 },
        { { "send", "Order", "o-5", "CreateOrder", '{"customer_id":"c"}' }, 5 },
        { { "send", "Order", "o-5", "AddItem", '{"sku":"A","qty":1,"price":11}' }, 5 },
        { { "send", "Nope", "1", "X" }, 3 },
        { { "send", "Order", "o-5", "Fly" }, 3 },
        { { "send", "Order", "o-5", "AddItem", '{"sku":"C","qty":1,"price":1}', "--expect", "1" }, 4 },
        { { "send", "Order", "o-5", "AddItem", '{"sku":"C","qty":1,"price":1}', "--expect", "no_stream" }, 4 },
        { { "send", "Order", "o-5", "AddItem", '{"sku":"C","qty":1,"price":1}', "--command-id", "used-5" }, 4 },
        { { "read", "Order-o-404" }, 3 },
        { { "state", "Nope", "1" }, 3 },
      }
      for _, c in ipairs(cases) do
        local what = table.concat(c[1], " ")
        local lout, lerr, lcode = cli(c[1])
        local rout, rerr, rcode = run(remote(c[1]))
        assert.equal(c[2], lcode, what .. " (local): " .. lerr)
        assert.equal(c[2], rcode, what .. " (--url): " .. rerr)
        assert.equal(lout, rout, what)
        assert.equal(first_line(lerr), first_line(rerr), what)
      end
      -- invalid command data: exit 7 either way (the messages differ: the daemon parses the body)
      local _, err, code = run(remote { "send", "Order", "o-5", "AddItem", "{nope" })
      assert.equal(7, code, err)
      assert.matches("^ebb: bad_request: ", err)
      -- nothing of the failures was recorded
      local _, stream = d:get("/streams/Order-o-5")
      assert.equal(2, stream.version)
    end)

    it("9.6 `--url` prints the daemon's error message as text, not as JSON string escapes", function()
      local other, cli = twin()
      finally(function() support.rmdir(other) end)
      local args = { "state", "Order", "o-5", "--at", "yesterday" }
      local _, lerr, lcode = cli(args)
      local rout, rerr, rcode = run(remote(args))
      assert.same({ 7, 7, "" }, { lcode, rcode, rout })
      assert.equal('ebb: bad_request: "yesterday" is not an RFC 3339 time such as 2026-01-31T12:00:00Z', first_line(lerr))
      assert.equal(first_line(lerr), first_line(rerr))
    end)

    it("9.7 `--url` reads an unknown stream from a version as the local read does: not found", function()
      local other = support.tmpdir()
      finally(function() support.rmdir(other) end)
      local lout, lerr, lcode = support.cli(other) { "read", "Order-o-404", "--from", "1" }
      assert.same({ "", "ebb: not_found: stream Order-o-404 does not exist\n", 3 }, { lout, lerr, lcode })
      local rout, rerr, rcode = run(remote { "read", "Order-o-404", "--from", "1" })
      assert.equal(lcode, rcode, rerr)
      assert.equal(lout, rout)
    end)

    it("9.8 the directory is free for writers once the daemon has stopped", function()
      local own = start()
      finally(function() stop(own) end)
      assert.equal(200, (own:command("Order", "s-1", "CreateOrder", { customer_id = "c" })))
      halt(own)
      local _, err, code = run { "send", "Order", "s-1", "ConfirmOrder", "--data", own.data, "--aggregates",
                                 aggs, "--durability", "normal" }
      assert.equal(5, code, err) -- rejected by the aggregate, not refused by the lock
      assert.matches("cannot confirm an empty order", err)
      local out
      out, err, code = run { "read", "Order-s-1", "--data", own.data, "--aggregates", aggs }
      assert.equal(0, code, err)
      assert.equal(1, #lines(out))
      -- and --url to a daemon that is gone fails plainly
      out, err, code = run { "read", "Order-s-1", "--url", own.url }
      assert.equal(1, code)
      assert.equal("", out)
      assert.matches("^ebb: unavailable: cannot connect to " .. own.url:gsub("%p", "%%%0"), err)
    end)
  end)

  describe("10. settings: flags > environment > config file > defaults", function()
    local dir, file, globals_file
    setup(function()
      dir = support.tmpdir()
      file = dir .. "/ebb.conf.lua"
      support.write(file, "return { max_body = 2048, log_level = 'warn' }\n")
      globals_file = dir .. "/globals.lua"
      support.write(globals_file, "max_body = 3072\n")
    end)
    teardown(function() support.rmdir(dir) end)

    local function check(args, env)
      local all = { "check", "--data", dir .. "/data", "--aggregates", support.root .. "/aggregates" }
      for _, a in ipairs(args or {}) do all[#all + 1] = a end
      local out, err, code = run(all, { env = env })
      assert.equal(0, code, err)
      return json.decode(out).config
    end

    it("10.1 `ebb check` reports each setting's value and source", function()
      local c = check()
      assert.same({ value = 1048576, source = "default" }, c.max_body)
      c = check { "--config", file }
      assert.same({ value = 2048, source = "file" }, c.max_body)
      assert.same({ value = "warn", source = "file" }, c.log_level)
      c = check({}, "EBB_CONFIG=" .. support.quote(file))
      assert.same({ value = 2048, source = "file" }, c.max_body)
      c = check({ "--config", file }, "EBB_MAX_BODY=4096")
      assert.same({ value = 4096, source = "env" }, c.max_body)
      assert.same({ value = "warn", source = "file" }, c.log_level)
      c = check({ "--config", file, "--max-body", "8192" }, "EBB_MAX_BODY=4096")
      assert.same({ value = 8192, source = "flag" }, c.max_body)
      c = check({ "--max-body=8192" }, "EBB_CONFIG=" .. support.quote(file) .. " EBB_MAX_BODY=4096")
      assert.same({ value = 8192, source = "flag" }, c.max_body)
      c = check { "--config", globals_file }
      assert.same({ value = 3072, source = "file" }, c.max_body)
      c = check({ "--config", file }, "EBB_CONFIG=" .. support.quote(globals_file))
      assert.same({ value = 2048, source = "file" }, c.max_body)
      c = check({ "--token", "abc" })
      assert.same({ value = "(set)", source = "flag" }, c.token)
    end)

    it("10.2 refuses an unknown setting, a wrong type or an out-of-range value in the file", function()
      local cases = {
        { "return { max_bodyy = 2048 }", 'unknown setting "max_bodyy"' },
        { "return { max_body = 'big' }", "max_body must be an integer, not a string" },
        { "return { max_body = 10 }", "max_body must be an integer from 1024" },
        { "return { durability = 1 }", "durability must be a string" },
        { "return { config = 'other.lua' }", 'unknown setting "config"' },
        { "return 5", "returned a number, not a table of settings" },
        { "return {", "config file" },
      }
      for i, c in ipairs(cases) do
        local bad = dir .. "/bad" .. i .. ".lua"
        support.write(bad, c[1])
        local out, err, code = run { "check", "--config", bad, "--data", dir .. "/data" }
        assert.equal(7, code, c[1] .. ": " .. err)
        assert.equal("", out)
        assert.matches(c[2], err, 1, true)
        out, err, code = run { "serve", "--config", bad, "--data", dir .. "/serve", "--listen", "127.0.0.1:0" }
        assert.is_true(code ~= 0 and code ~= 124, c[1] .. ": exit " .. tostring(code))
        assert.is_nil(out:find("listening", 1, true))
        assert.matches(c[2], err, 1, true)
      end
      local _, err, code = run({ "check", "--data", dir .. "/data" }, { env = "EBB_MAX_BODY=lots" })
      assert.equal(7, code)
      assert.matches("EBB_MAX_BODY: max_body must be an integer", err)
      _, err, code = run { "check", "--data", dir .. "/data", "--max-body", "12" }
      assert.equal(2, code)
      assert.matches("%-%-max%-body", err)
    end)

    it("10.3 the daemon's body limit follows the same precedence", function()
      local function limit_between(d, fits, refused)
        local s1, r1 = d:post("/commands", padded_command("fits-" .. fits, fits))
        local s2 = d:post("/commands", padded_command("over-" .. refused, refused))
        assert.equal(200, s1, r1 and r1.error and r1.error.message)
        assert.equal(413, s2)
      end
      local q = support.quote
      local a = start { env = "EBB_CONFIG=" .. q(file) }
      finally(function() stop(a) end)
      limit_between(a, 2048, 2049)
      halt(a)
      local b = start { env = "EBB_MAX_BODY=4096", args = { "--config", file } }
      finally(function() stop(a); stop(b) end)
      limit_between(b, 4096, 4097)
      halt(b)
      local c = start { env = "EBB_CONFIG=" .. q(file) .. " EBB_MAX_BODY=4096", args = { "--max-body", "8192" } }
      finally(function() stop(a); stop(b); stop(c) end)
      limit_between(c, 8192, 8193)
    end)
  end)

  describe("11. script errors and deleted streams", function()
    local d, aggs
    setup(function()
      aggs = support.aggregates_copy()
      support.write(aggs .. "/bad.lua", [[return { type = "Bad", initial = function() return {} end, apply = {},
  handle = { Boom = function() error("boom") end,
             Nil = function(s, c) return c.data.missing.field end } }
]])
      local data = support.tmpdir()
      local cli = support.cli(data, aggs)
      assert.equal(0, select(3, cli("send", "Order", "gone", "CreateOrder", '{"customer_id":"c"}')))
      assert.equal(0, select(3, cli("delete", "Order-gone", "--reason", "test")))
      d = start { data = data, aggregates = aggs }
    end)
    teardown(function()
      stop(d)
      support.rmdir(aggs)
    end)

    it("11.1 answers a Lua error with 500 script_error naming module and line, and keeps serving", function()
      local head = head_position(d)
      local status, r = d:command("Bad", "1", "Boom")
      assert.equal(500, status)
      assert.equal("script_error", r.error.code)
      assert.matches("bad%.lua:2: boom", r.error.message)
      status, r = d:command("Bad", "1", "Nil")
      assert.equal(500, status)
      assert.equal("script_error", r.error.code)
      assert.matches("bad%.lua:3:", r.error.message)
      assert.equal(head, head_position(d))
      assert.equal(404, (d:get("/streams/Bad-1")))
      assert.equal(200, (d:command("Order", "after-boom", "CreateOrder", { customer_id = "c" })))
      local after = metrics(d)
      assert.equal(2, sample(after, 'ebb_commands_total{result="script_error"}'))
      assert.equal(2, sample(after, 'ebb_http_requests_total{route="commands",status="500"}'))
    end)

    it("11.2 shows a deleted stream as deleted and refuses to write to it with 410", function()
      local status, r = d:get("/streams/Order-gone")
      assert.equal(200, status)
      assert.same({ 2, true, "$deleted" }, { r.version, r.deleted, r.events[2].type })
      status, r = d:get("/aggregates/Order/gone")
      assert.same({ 200, true, 2 }, { status, r.deleted, r.version })
      status, r = d:command("Order", "gone", "CancelOrder")
      assert.equal(410, status)
      assert.equal("stream_deleted", r.error.code)
      status, r = d:post("/streams/Order-gone", { events = { { type = "X" } } })
      assert.equal(410, status)
      assert.equal("stream_deleted", r.error.code)
      local _, stream = d:get("/streams/Order-gone")
      assert.equal(2, stream.version)
    end)
  end)

  describe("12. a stream's queue after a command that ends at once", function()
    -- A command that ends without an append (rejected, unknown command,
    -- wrong expected version, a repeated command id) is answered and freed
    -- before its stream's queue is let go of. MALLOC_PERTURB_ makes glibc fill
    -- freed memory, so that anything still reading the freed command shows.
    local d
    setup(function() d = start { env = "MALLOC_PERTURB_=165" } end)
    teardown(function() stop(d, 2) end)

    -- POST /commands with a short time limit: status, decoded answer.
    local function command(type_, data, extra)
      local c = daemon.connect(d)
      c:settimeout(3)
      assert(c:send(req("POST", "/commands", command_body("Order", "q-1", type_, data, extra), { "Connection: close" })))
      local ok, status, _, body = pcall(daemon.read_response, c)
      c:close()
      if not ok or not status then return nil end
      local dok, decoded = pcall(json.decode, body)
      return status, dok and decoded or nil
    end

    it("12.1 goes on serving the stream (and the daemon stays up)", function()
      local steps = {
        { "ConfirmOrder", nil, nil, 422 },
        { "CreateOrder", { customer_id = "c" }, nil, 200, 1 },
        { "Fly", nil, nil, 404 },
        { "AddItem", { sku = "A", qty = 1, price = 1 }, nil, 200, 2 },
        { "AddItem", { sku = "A", qty = 1, price = 1 }, { expected_version = 0 }, 409 },
        { "AddItem", { sku = "A", qty = 1, price = 1 }, nil, 200, 3 },
        { "AddItem", { sku = "B", qty = 1, price = 1 }, { command_id = "k-1" }, 200, 4 },
        { "AddItem", { sku = "B", qty = 1, price = 1 }, { command_id = "k-1" }, 200, 4 },
        { "AddItem", { sku = "C", qty = 1, price = 1 }, nil, 200, 5 },
      }
      for i, step in ipairs(steps) do
        local status, r = command(step[1], step[2], step[3])
        local what = ("step %d (%s): %s"):format(i, step[1], r and json.encode(r) or "no answer")
        assert.equal(step[4], status, what)
        if step[5] then assert.equal(step[5], r.version, what) end
      end
      assert.is_true(exited(d.pid) == false, "the daemon died")
      local _, stream = d:get("/streams/Order-q-1")
      assert.equal(5, stream.version)
    end)
  end)

  describe("13. a refused command's id", function()
    it("13.1 answers its refusal from then on, across a kill -9, even once the command would pass", function()
      local data = support.tmpdir()
      local d = start { data = data, durability = "full" }
      assert.equal(200, (d:command("BankAccount", "x1", "OpenAccount", { owner = "Ann", initial_deposit = 100 })))
      local status, r = d:command("BankAccount", "x1", "Withdraw", { amount = 500 }, { command_id = "w-1" })
      assert.equal(422, status)
      local refusal = { code = "rejected", message = "insufficient funds",
                        details = { balance = 100, requested = 500 } }
      assert.same(refusal, r.error)
      -- kill -9 right after the 422: the refusal was durable before it was answered
      daemon.signal(d, "KILL")
      assert(daemon.wait(d, 10))
      daemon.stop(d) -- (this file's stop removes the data)
      d = start { data = data, durability = "full" }
      local st, dep = d:command("BankAccount", "x1", "Deposit", { amount = 1000 })
      assert.equal(200, st, json.encode(dep))
      local head = head_position(d)
      for _ = 1, 2 do
        status, r = d:command("BankAccount", "x1", "Withdraw", { amount = 500 }, { command_id = "w-1" })
        assert.equal(422, status)
        assert.same(refusal, r.error)
      end
      assert.equal(head, head_position(d))
      local _, state = d:get("/aggregates/bank_account/x1")
      assert.equal(1100, state.state.balance)
      -- another command type, or another aggregate, on that id: a conflict, as for an accepted one
      status, r = d:command("BankAccount", "x1", "Deposit", { amount = 500 }, { command_id = "w-1" })
      assert.equal(409, status)
      assert.equal("conflict", r.error.code)
      status, r = d:command("BankAccount", "x2", "Withdraw", { amount = 500 }, { command_id = "w-1" })
      assert.equal(409, status)
      assert.equal("conflict", r.error.code)
      -- a new command id is decided on the state of now
      status, r = d:command("BankAccount", "x1", "Withdraw", { amount = 500 }, { command_id = "w-2" })
      assert.equal(200, status)
      assert.equal(600, r.events[1].data.balance)
      stop(d)
    end)
  end)
end)
