--[[
torture.lua: the reliability harness behind scripts/torture (not part of the
suite). It drives a real `ebb serve` with mixed write load and breaks it:

  crash   kill -9 at a random moment, restart, verify (at `full`).
  power   a simulated power cut inside the daemon (the test-only fault VFS,
          EBB_TEST_FAULTS=cut_after_syncs|cut_after_writes=N[,torn=1]): what
          was not fsynced is dropped or torn; restart, verify. At `full`
          nothing acknowledged may be lost; at `normal` losses must be seen.
  faults  fsync EIO and ENOSPC through the fault VFS's toggle file, and a
          real full disk (a 4 MB tmpfs, as root): no 200 without durability,
          writes stop after a failed fsync (/health 503), resume after space
          comes back, and a restart finds everything acknowledged, intact.

Verification after every restart: each acknowledged event is at its
acknowledged position, stream and version; every command's and raw append's
events are all there or none (each carries a tag and its count); positions
run 1..head with no gap (paging GET /events by next); re-sent command ids
answer the original result; the projection equals a rebuild computed here
from all the events; an SSE resume by Last-Event-ID has no gap and no
duplicate; what live subscribers saw is stored; PRAGMA integrity_check is ok.
]]
local socket = require "socket"
local json = require "cjson"

local root = assert(arg[1], "usage: torture.lua ROOT [options]")
local opts = {
  cycles = 1000, power_full = 300, power_normal = 60, faults = true, disk = true,
  seed = os.time(), verbose = false,
}
do
  local i = 2
  while arg[i] do
    local a = arg[i]
    local function num() i = i + 1; return assert(tonumber(arg[i]), a .. " needs a number") end
    if a == "--short" then
      opts.cycles, opts.power_full, opts.power_normal = 30, 40, 20
    elseif a == "--cycles" then opts.cycles = num()
    elseif a == "--power-cuts" then opts.power_full = num()
    elseif a == "--power-cuts-normal" then opts.power_normal = num()
    elseif a == "--no-faults" then opts.faults, opts.disk = false, false
    elseif a == "--seed" then opts.seed = num()
    elseif a == "--verbose" then opts.verbose = true
    else error("unknown option " .. a) end
    i = i + 1
  end
end
math.randomseed(opts.seed)
local ebb_bin = root .. "/build/ebb"

local function sh(cmd) return os.execute(cmd) end
local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
local function read(path)
  local f = io.open(path, "rb"); if not f then return "" end
  local s = f:read("a"); f:close(); return s
end
local function write(path, s) local f = assert(io.open(path, "wb")); f:write(s); f:close() end
local function int(v) return math.tointeger(v) or v end
local function log(...) if opts.verbose then io.stderr:write(string.format(...), "\n") end end

local work = os.getenv("TORTURE_DIR") or ("/tmp/ebb-torture-" .. os.time() .. "-" .. math.random(1e6))
sh("rm -rf " .. quote(work) .. " && mkdir -p " .. quote(work .. "/aggregates") .. " "
   .. quote(work .. "/projections"))

-- A counter whose commands record 1..3 events and snapshot every 3 events,
-- so commands cross snapshot boundaries all the time.
write(work .. "/aggregates/counter.lua", [[
local c = { type = "Counter", snapshot_every = 3 }
function c.initial() return { total = 0, count = 0 } end
c.apply = { Added = function(s, e) s.total = s.total + e.data.k; s.count = s.count + 1; return s end }
c.handle = {
  Add = function(s, cmd)
    local out = {}
    for i = 1, cmd.data.n do
      out[i] = { type = "Added", data = { k = i, tag = cmd.data.tag, of = cmd.data.n,
                                          total = s.total + i * (i + 1) // 2 } }
    end
    return out
  end,
}
return c
]])
-- Per stream: how many events, the last version, the sum of k.
write(work .. "/projections/tally.lua", [[
local p = { name = "tally", version = 1, from = { "Counter", "Raw" } }
function p.setup(db)
  db:exec [=[CREATE TABLE t (stream TEXT PRIMARY KEY, n INTEGER NOT NULL,
                            last INTEGER NOT NULL, sum INTEGER NOT NULL)]=]
end
local function count(db, e)
  db:exec("INSERT INTO t VALUES (?, 1, ?, ?) ON CONFLICT (stream) DO UPDATE SET n = n + 1, "
          .. "last = excluded.last, sum = sum + excluded.sum",
          e.stream, e.version, e.data.k or 0)
end
p.on = { Added = count, RawEvent = count }
p.queries = { all = function(db) return db:rows "SELECT stream, n, last, sum FROM t ORDER BY stream" end }
return p
]])

-- ------------------------------------------------------------------ the daemon

local D = {}

local function alive(pid)
  local stat = read("/proc/" .. pid .. "/stat")
  return stat ~= "" and stat:match("^%d+ %b() (%a)") ~= "Z"
end

-- Starts ebb serve; returns the daemon or nil, log text.
local function start(data, durability, env)
  local out, errf = work .. "/out", work .. "/err"
  os.remove(out)
  local cmd = (env and (env .. " ") or "") .. quote(ebb_bin) .. " serve --data " .. quote(data)
      .. " --aggregates " .. quote(work .. "/aggregates") .. " --projections "
      .. quote(work .. "/projections") .. " --listen 127.0.0.1:0 --log-level warn --durability "
      .. durability .. " > " .. quote(out) .. " 2>> " .. quote(errf) .. " & echo $!"
  local p = assert(io.popen(cmd))
  local pid = tonumber(p:read("l"))
  p:close()
  for _ = 1, 1500 do
    local url = read(out):match("ebb listening on (http://%S+)")
    if url then
      local host, port = url:match("http://([%d%.]+):(%d+)")
      return setmetatable({ pid = pid, host = host, port = tonumber(port) }, { __index = D })
    end
    if not alive(pid) then break end
    socket.sleep(0.01)
  end
  sh("kill -9 " .. pid .. " 2>/dev/null")
  return nil, read(errf)
end

function D:wait_exit(timeout)
  local deadline = socket.gettime() + timeout
  while socket.gettime() < deadline do
    if not alive(self.pid) then return true end
    socket.sleep(0.01)
  end
  return false
end
function D:kill9()
  sh("kill -9 " .. self.pid .. " 2>/dev/null")
  self:wait_exit(10)
end
function D:stop()
  sh("kill -TERM " .. self.pid .. " 2>/dev/null")
  if not self:wait_exit(20) then self:kill9() end
end

local function connect(d)
  local c = socket.tcp()
  c:settimeout(10)
  local ok = c:connect(d.host, d.port)
  if not ok then c:close(); return nil end
  c:setoption("tcp-nodelay", true)
  return c
end

local function request_bytes(d, method, path, body, headers)
  local lines = { method .. " " .. path .. " HTTP/1.1", "Host: " .. d.host }
  if body then
    lines[#lines + 1] = "Content-Type: application/json"
    lines[#lines + 1] = "Content-Length: " .. #body
  end
  for k, v in pairs(headers or {}) do lines[#lines + 1] = k .. ": " .. v end
  return table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or "")
end

-- Reads one response; nil when the connection broke.
local function read_response(c)
  local line = c:receive("*l")
  if not line then return nil end
  local status = tonumber(line:match("^HTTP/1%.%d (%d%d%d)"))
  local len = 0
  while true do
    local h = c:receive("*l")
    if not h then return nil end
    if h == "" then break end
    local k, v = h:match("^([^:]+):%s*(.*)$")
    if k and k:lower() == "content-length" then len = tonumber(v) end
  end
  local body = ""
  if len > 0 then
    body = c:receive(len)
    if not body then return nil end
  end
  local ok, decoded = pcall(json.decode, body)
  return status, ok and decoded or nil, body
end

-- One request on its own connection: status, decoded, text (nil when it failed).
function D:req(method, path, body)
  if type(body) == "table" then body = json.encode(body) end
  local c = connect(self)
  if not c then return nil end
  c:settimeout(60)
  if not c:send(request_bytes(self, method, path, body, { Connection = "close" })) then
    c:close(); return nil
  end
  local st, dec, text = read_response(c)
  c:close()
  return st, dec, text
end

-- ------------------------------------------------------------------ the model

-- What the harness was told. acked: position -> {stream, version, id};
-- tags: tag -> n (events a command or append carries; all or none stored);
-- commands: command_id -> {body, answer (nil: outcome unknown)};
-- raws: stream -> {known version}; appends: list of acknowledged raw appends
-- (body, answer) for idempotent re-sends.
local M = { acked = {}, tags = {}, commands = {}, cmd_ids = {}, raws = {}, appends = {}, seen = {},
            tagn = 0, hot = { "hot-1", "hot-2", "hot-3" } }

local function new_tag(n)
  M.tagn = M.tagn + 1
  local t = ("t%d-%d"):format(opts.seed, M.tagn)
  M.tags[t] = n
  return t
end

local function uuid()
  local r = math.random
  return ("%08x-%04x-4%03x-8%03x-%012x"):format(r(0, 0x7fffffff), r(0, 0xffff), r(0, 0xfff),
                                               r(0, 0xfff), r(0, 0xffffffffff))
end

local stats = { requests = 0, acked_requests = 0, acked_events = 0, unknown = 0, refused_5xx = 0,
                idem_mismatch = 0, acked_after_fail = 0 }

-- The next request of the load: {method, path, body(table), kind, ...}.
local function next_request()
  local r = math.random()
  if r < 0.55 then
    local id = math.random() < 0.6 and M.hot[math.random(#M.hot)] or ("cold-" .. math.random(1, 5000))
    local n = math.random(1, 3)
    local body = { aggregate = "counter", id = id, type = "Add", data = { n = n, tag = new_tag(n) } }
    if math.random() < 0.6 then
      body.command_id = "c-" .. body.data.tag
    end
    return { kind = "command", path = "/commands", body = body, n = n }
  elseif r < 0.85 then
    local s = "Raw-" .. math.random(1, 8)
    local n = math.random(1, 3)
    local tag = new_tag(n)
    local events = {}
    for i = 1, n do events[i] = { id = uuid(), type = "RawEvent", data = { tag = tag, of = n, i = i } } end
    local body = { expected_version = M.raws[s] or 0, events = events }
    return { kind = "append", path = "/streams/" .. s, body = body, stream = s, n = n }
  elseif r < 0.93 and #M.appends > 0 then
    local a = M.appends[math.random(#M.appends)]
    return { kind = "reappend", path = a.path, body = a.body, original = a.answer }
  else
    local ids = M.cmd_ids
    if #ids == 0 then return next_request() end
    local cmd = M.commands[ids[math.random(#ids)]]
    return { kind = "recommand", path = "/commands", body = cmd.body, original = cmd.answer }
  end
end

local function same_answer(a, b)
  return a and b and int(a.position) == int(b.position) and int(a.version) == int(b.version)
      and a.stream == b.stream
end

-- Records an answer. status nil: the outcome is unknown (the daemon died).
local function record(req, status, ans)
  stats.requests = stats.requests + 1
  if req.kind == "command" and req.body.command_id and not M.commands[req.body.command_id] then
    M.commands[req.body.command_id] = { body = req.body }
    M.cmd_ids[#M.cmd_ids + 1] = req.body.command_id
  end
  if status == nil then stats.unknown = stats.unknown + 1; return end
  if status >= 500 then stats.refused_5xx = stats.refused_5xx + 1 end
  if status ~= 200 then
    if req.kind == "append" and status == 409 and ans and ans.error and ans.error.actual then
      M.raws[req.stream] = int(ans.error.actual)
    end
    return
  end
  stats.acked_requests = stats.acked_requests + 1
  if req.kind == "command" or req.kind == "append" then
    stats.acked_events = stats.acked_events + #(ans.events or {})
  end
  for _, e in ipairs(ans.events or {}) do
    M.acked[int(e.position)] = { stream = e.stream, version = int(e.version), id = e.id }
  end
  if req.kind == "command" and req.body.command_id then
    M.commands[req.body.command_id].answer = ans
  elseif req.kind == "append" then
    M.raws[req.stream] = int(ans.version)
    M.appends[#M.appends + 1] = { path = req.path, body = req.body, answer = ans }
    if #M.appends > 200 then table.remove(M.appends, 1) end
  elseif req.original and not same_answer(req.original, ans) then
    -- A re-send of something acknowledged must answer the original result.
    stats.idem_mismatch = stats.idem_mismatch + 1
    log("idempotent re-send answered differently: %s", json.encode(ans):sub(1, 200))
  end
end

-- ------------------------------------------------------------------ load

-- Drives `clients` keep-alive connections (one request in flight each) and
-- `subs` SSE subscribers until should_stop() or the daemon dies; reads what
-- was answered before the end.
local function drive(d, clients, subs, should_stop)
  local conns = {}
  for i = 1, clients do conns[i] = { c = connect(d) } end
  local sse = {}
  for i = 1, subs do
    local c = connect(d)
    if c then
      c:send(request_bytes(d, "GET", "/subscribe?after=" .. math.random(0, 10), nil,
                           { Accept = "text/event-stream" }))
      c:settimeout(0)
      sse[i] = { c = c, buf = "" }
    end
  end
  local function pump_sse(s)
    while true do
      local chunk, err, partial = s.c:receive(65536)
      chunk = chunk or partial
      if chunk and #chunk > 0 then s.buf = s.buf .. chunk end
      if not chunk or #chunk == 0 or err then break end
    end
    for block in s.buf:gmatch("(.-)\n\n") do
      local id = block:match("id: (%d+)")
      local data = block:match("data: (%b{})")
      if id and data then
        local ok, e = pcall(json.decode, data)
        if ok and e.id then M.seen[tonumber(id)] = e.id end
      end
    end
    s.buf = s.buf:match(".*\n\n(.*)$") or s.buf
  end
  local dead = false
  while true do
    local stop = should_stop() or dead
    local readers = {}
    for _, cl in ipairs(conns) do
      if cl.c and not cl.req and not stop then
        cl.req = next_request()
        local ok = cl.c:send(request_bytes(d, "POST", cl.req.path, json.encode(cl.req.body)))
        if not ok then record(cl.req, nil); cl.req = nil; cl.c:close(); cl.c = nil end
      end
      if cl.c and cl.req then readers[#readers + 1] = cl.c end
    end
    for _, s in pairs(sse) do readers[#readers + 1] = s.c end
    if stop and #readers == #sse then break end
    local ready = socket.select(readers, nil, 0.05)
    for _, cl in ipairs(conns) do
      if cl.c and cl.req and ready[cl.c] then
        cl.c:settimeout(stop and 0.5 or 10)
        local st, ans = read_response(cl.c)
        -- After a failed fsync nothing may be written and acknowledged. On one
        -- connection answers come in order, and the next request is sent only
        -- after the 5xx arrived. (A re-sent command id is answered from the
        -- store without a write: not counted.)
        if M.watch_fail and st and st >= 500 then cl.fail_seen = true end
        if st == 200 and cl.fail_seen and cl.req.kind ~= "recommand" then
          stats.acked_after_fail = stats.acked_after_fail + 1
          log("acknowledged after a failed fsync: %s", json.encode(ans))
        end
        record(cl.req, st, ans)
        cl.req = nil
        if not st then cl.c:close(); cl.c = nil end
      end
    end
    for _, s in pairs(sse) do if ready[s.c] then pump_sse(s) end end
    if not alive(d.pid) then
      if dead then
        -- Already dead: collect what sits in the sockets, the rest is unknown.
        for _, cl in ipairs(conns) do
          if cl.c and cl.req then
            cl.c:settimeout(0.2)
            local st, ans = read_response(cl.c)
            record(cl.req, st, ans)
            cl.req = nil
          end
        end
        break
      end
      dead = true
    end
  end
  for _, s in pairs(sse) do pump_sse(s); s.c:close() end
  for _, cl in ipairs(conns) do if cl.c then cl.c:close() end end
end

-- ------------------------------------------------------------------ verify

local totals = { checked = 0, lost = 0, partial = 0, gaps = 0, projection = 0, resend = 0,
                 sse = 0, corrupt = 0, seen_lost = 0 }

-- The events after `after`, slimmed to what the checks need.
local function all_events(d, after)
  local out = {}
  after = after or 0
  while true do
    local st, page = d:req("GET", ("/events?after=%d&limit=10000"):format(after))
    if st ~= 200 then return nil, "GET /events answered " .. tostring(st) end
    if #page.events == 0 then return out, int(page.head) end
    for _, e in ipairs(page.events) do
      out[#out + 1] = { position = int(e.position), stream = e.stream, version = int(e.version),
                        id = e.id, type = e.type, tag = e.data.tag, k = int(e.data.k) }
    end
    after = int(page.next)
  end
end

local function integrity(data)
  -- On a copy: opening the store here must not change what ebb recovers from.
  local copy = work .. "/icopy"
  sh("rm -rf " .. quote(copy) .. " && mkdir -p " .. quote(copy) .. " && cp " .. quote(data)
     .. "/events.db* " .. quote(copy) .. "/ 2>/dev/null")
  local p = io.popen("sqlite3 " .. quote(copy .. "/events.db") .. " 'PRAGMA integrity_check' 2>&1")
  local out = p:read("a")
  p:close()
  return out:match("^ok%s*$") ~= nil, out
end

-- Verifies the store behind a freshly started daemon. losses_allowed: at
-- `normal` after a power cut (counted, reported, then forgotten).
local function verify(d, losses_allowed, cycle_totals, full)
  local t = cycle_totals or totals
  -- What the last scan read is kept; only its last 500 positions and what
  -- follows are read again, except on every 25th verification (and when
  -- asked), which reads the whole store again from position 1.
  M.verifications = (M.verifications or 0) + 1
  local from = 0
  if M.scan and not full and M.verifications % 25 ~= 0 then from = math.max(0, M.scan_head - 500) end
  local events, head = all_events(d, from)
  if not events then
    t.corrupt = t.corrupt + 1
    print("  cannot read the events: " .. tostring(head))
    return
  end
  local by_pos = {}
  if from > 0 then for p = 1, from do by_pos[p] = M.scan[p] end end
  for i, e in ipairs(events) do
    local p = e.position
    if p ~= from + i then t.gaps = t.gaps + 1; log("gap: position %d at index %d", p, from + i) break end
    by_pos[p] = e
  end
  if from + #events ~= head then t.gaps = t.gaps + 1 end
  M.scan, M.scan_head = by_pos, head
  local tags = {}
  for p = 1, head do
    local e = by_pos[p]
    if e and e.tag then tags[e.tag] = (tags[e.tag] or 0) + 1 end
  end
  -- Every acknowledged event at its place.
  local lost = 0
  for p, a in pairs(M.acked) do
    local e = by_pos[p]
    if p > from then t.checked = t.checked + 1 end -- read again this time
    if not e or e.id ~= a.id or e.stream ~= a.stream or int(e.version) ~= a.version then
      lost = lost + 1
      log("lost: position %d %s v%d", p, a.stream, a.version)
    end
  end
  for p, id in pairs(M.seen) do
    if not by_pos[p] or by_pos[p].id ~= id then t.seen_lost = t.seen_lost + 1 end
  end
  t.lost = t.lost + lost
  -- All or none.
  for tag, n in pairs(tags) do
    if n ~= M.tags[tag] then t.partial = t.partial + 1; log("partial: %s has %d of %s", tag, n, M.tags[tag]) end
  end
  local grew = false
  if not losses_allowed or lost == 0 then
    -- Re-sent command ids answer the original result.
    local ids = M.cmd_ids
    for _ = 1, math.min(5, #ids) do
      local c = M.commands[ids[math.random(#ids)]]
      local st, ans = d:req("POST", "/commands", c.body)
      -- At `normal` a command acknowledged before an earlier cut may have
      -- been lost and now runs again: whatever it wrote is read below.
      if st == 200 and int(ans.position) > head then grew = true end
      if c.answer then
        if st ~= 200 or not same_answer(c.answer, ans) then t.resend = t.resend + 1 end
      elseif st == 200 then
        c.answer = ans -- it had been lost or never run: now it ran exactly once
        grew = true
        for _, e in ipairs(ans.events or {}) do
          M.acked[int(e.position)] = { stream = e.stream, version = int(e.version), id = e.id }
        end
      end
    end
  end
  -- The projection against a rebuild computed from the events.
  if grew then
    local more, head2 = all_events(d, head)
    if more then
      for _, e in ipairs(more) do by_pos[e.position] = e end
      head = head2
      M.scan_head = head
    end
  end
  local expect = {}
  for p = 1, head do
    local e = by_pos[p]
    local cat = e and e.stream:match("^([^-]+)")
    if e and (cat == "Counter" or cat == "Raw") and (e.type == "Added" or e.type == "RawEvent") then
      local r = expect[e.stream] or { n = 0, sum = 0 }
      r.n, r.last, r.sum = r.n + 1, e.version, r.sum + (e.k or 0)
      expect[e.stream] = r
    end
  end
  local st, rows, text = d:req("GET", ("/projections/tally/all?after=%d"):format(head))
  local mism = 0
  if st ~= 200 or type(rows) ~= "table" then
    mism = 1
    log("projection query answered %s %s", tostring(st), tostring(text))
  else
    local list = rows.result or rows.rows or rows
    local got = 0
    for _, r in ipairs(list) do
      got = got + 1
      local x = expect[r.stream]
      if not x or x.n ~= int(r.n) or x.last ~= int(r.last) or x.sum ~= int(r.sum) then
        mism = mism + 1
        log("projection row %s differs: %s, a rebuild has %s", r.stream, json.encode(r),
            x and json.encode(x) or "nothing")
      end
    end
    local want = 0
    for _ in pairs(expect) do want = want + 1 end
    if got ~= want then mism = mism + 1 end
  end
  t.projection = t.projection + (mism > 0 and 1 or 0)
  if mism > 0 then log("projection status: %s", select(3, d:req("GET", "/projections/tally"))) end
  if mism > 0 and os.getenv("TORTURE_STOP") then -- debugging: keep the evidence
    d:kill9()
    print("stopped at a projection mismatch: " .. work)
    os.exit(3)
  end
  -- SSE resume from a random position: no gap, no duplicate.
  if head > 0 then
    local resume = math.random(math.max(0, head - 2000), head - 1)
    local c = connect(d)
    c:send(request_bytes(d, "GET", "/subscribe", nil,
                         { Accept = "text/event-stream", ["Last-Event-ID"] = tostring(resume) }))
    c:settimeout(10)
    local want, bad = resume + 1, false
    while want <= head do
      local line = c:receive("*l")
      if not line then bad = true break end
      local id = line:match("^id: (%d+)")
      if id then
        if tonumber(id) ~= want then bad = true break end
        want = want + 1
      end
    end
    c:close()
    if bad then t.sse = t.sse + 1; log("SSE resume from %d broke at %d", resume, want) end
  end
  -- Forget what was lost; the store is the truth from here on.
  M.seen = {}
  for p in pairs(M.acked) do if p > head then M.acked[p] = nil end end
  for p = 1, head do
    local e = by_pos[p]
    if e then
      M.acked[p] = { stream = e.stream, version = e.version, id = e.id }
      if e.stream:match("^Raw%-") then M.raws[e.stream] = e.version end
    end
  end
  return lost
end

-- ------------------------------------------------------------------ modes

local failures = 0
local function check(name, ok, detail)
  if not ok then
    failures = failures + 1
    print(("FAIL %s %s"):format(name, detail or ""))
  end
end

local function reset_model()
  M.acked, M.commands, M.cmd_ids, M.raws, M.appends, M.seen = {}, {}, {}, {}, {}, {}
  M.scan, M.scan_head = nil, 0
end

local function crash_loop(n)
  local data = work .. "/crash"
  reset_model()
  local t0 = socket.gettime()
  local before = { checked = totals.checked, acked = stats.acked_events }
  for cycle = 1, n do
    local d, why = start(data, "full")
    if not d then print("cannot start ebb: " .. why); failures = failures + 1; return end
    if cycle > 1 then verify(d, false) end
    local deadline = socket.gettime() + 0.05 + math.random() * 0.5
    drive(d, 6, 2, function()
      if socket.gettime() >= deadline and alive(d.pid) then d:kill9() end
      return not alive(d.pid)
    end)
    d:kill9()
    if cycle % 50 == 0 then
      io.stderr:write(("  crash cycle %d/%d, %.0f s, %d events acknowledged, lost %d partial %d "
                       .. "gaps %d projection %d sse %d re-send %d\n")
        :format(cycle, n, socket.gettime() - t0, stats.acked_events - before.acked, totals.lost,
                totals.partial, totals.gaps, totals.projection, totals.sse,
                totals.resend + stats.idem_mismatch))
    end
  end
  local d = assert(start(data, "full"))
  verify(d, false, nil, true)
  local ok, out = integrity(data)
  if not ok then totals.corrupt = totals.corrupt + 1; print("integrity_check: " .. out) end
  d:stop()
  print(("crash loop: %d kill -9 cycles in %.0f s, %d events acknowledged, %d checks of an "
         .. "acknowledged event after a restart, %d requests (%d acknowledged, %d outcome "
         .. "unknown); lost %d, partial %d, gaps %d, projection "
         .. "mismatches %d, SSE resume errors %d, re-send mismatches %d, seen-but-lost %d, corrupt %d")
    :format(n, socket.gettime() - t0, stats.acked_events - before.acked,
            totals.checked - before.checked, stats.requests,
            stats.acked_requests, stats.unknown, totals.lost, totals.partial, totals.gaps,
            totals.projection, totals.sse, totals.resend + stats.idem_mismatch, totals.seen_lost,
            totals.corrupt))
  check("crash", totals.lost + totals.partial + totals.gaps + totals.projection + totals.sse
        + totals.resend + stats.idem_mismatch + totals.seen_lost + totals.corrupt == 0)
end

local function power(n, durability)
  local data = work .. "/power-" .. durability
  reset_model()
  local t = { checked = 0, lost = 0, partial = 0, gaps = 0, projection = 0, resend = 0, sse = 0,
              corrupt = 0, seen_lost = 0 }
  local cuts, cycles_with_loss, t0 = 0, 0, socket.gettime()
  local req0, idem0, ack0 = stats.requests, stats.idem_mismatch, stats.acked_events
  for cycle = 1, n do
    local which = math.random() < 0.5 and "cut_after_syncs" or "cut_after_writes"
    -- At `normal` only checkpoints sync: far fewer syncs than at `full`.
    local at = which == "cut_after_writes" and math.random(1, 1000)
        or math.random(1, durability == "full" and 150 or 5)
    local env = ("EBB_TEST_FAULTS=%s=%d,seed=%d%s"):format(which, at, math.random(1, 1e9),
                                                          math.random() < 0.5 and ",torn=1" or "")
    local d, why = start(data, durability, env)
    if not d then
      -- A cut during startup (e.g. the projection's setup) is a cut too.
      cuts = cuts + 1
      if not why:match("simulated power cut") then
        print("cannot start ebb: " .. why); failures = failures + 1; return
      end
    else
      -- Load until the cut (at most 20 s): a slow machine must not mean no cut.
      local deadline = socket.gettime() + 20
      drive(d, 6, 1, function() return socket.gettime() >= deadline or not alive(d.pid) end)
      if alive(d.pid) then d:kill9() else cuts = cuts + 1 end
    end
    local v = assert(start(data, durability))
    -- At `normal` a cut can lose more than the last 500 positions: read it all.
    local lost = verify(v, durability ~= "full", t, durability ~= "full")
    if (lost or 0) > 0 then cycles_with_loss = cycles_with_loss + 1 end
    v:stop()
    local ok, out = integrity(data)
    if not ok then t.corrupt = t.corrupt + 1; print("integrity_check: " .. out) end
    log("power %s %d: %s lost %s", durability, cycle, env, tostring(lost))
    if cycle % 25 == 0 then
      io.stderr:write(("  power %s run %d/%d, %d cuts, %.0f s, %d events acknowledged, lost %d partial %d "
                       .. "gaps %d projection %d corrupt %d\n")
        :format(durability, cycle, n, cuts, socket.gettime() - t0, stats.acked_events - ack0, t.lost,
                t.partial, t.gaps, t.projection, t.corrupt))
    end
  end
  print(("power loss at %s: %d runs, %d power cuts (%s) in %.0f s, %d requests, %d events "
         .. "acknowledged, %d checks of an acknowledged event; lost %d (in %d runs), partial %d, "
         .. "gaps %d, projection mismatches %d, "
         .. "SSE resume errors %d, re-send mismatches %d, corrupt %d")
    :format(durability, n, cuts, "dropped or torn unsynced pages", socket.gettime() - t0,
            stats.requests - req0, stats.acked_events - ack0, t.checked, t.lost, cycles_with_loss, t.partial, t.gaps,
            t.projection, t.sse, t.resend + stats.idem_mismatch - idem0, t.corrupt))
  local structural = t.partial + t.gaps + t.corrupt + t.sse
  if durability == "full" then
    check("power full", t.lost + structural + t.projection + t.resend + t.seen_lost == 0)
  else
    check("power normal: no corruption, projections equal a rebuild", structural + t.projection == 0)
    check("power normal: the harness must see losses at normal", t.lost > 0 or n < 5,
          "(no loss seen in " .. n .. " cuts)")
  end
  check("power cuts happened", cuts >= n * 0.5, ("only %d of %d runs were cut"):format(cuts, n))
end

-- fsync EIO and ENOSPC through the toggle file.
local function faults()
  local data, toggle = work .. "/faults", work .. "/toggle"
  reset_model()
  os.remove(toggle)
  local res = { false_acks = 0 }
  local after0 = stats.acked_after_fail
  local function phase(kind, secs)
    local d = assert(start(data, "full", "EBB_TEST_FAULTS=toggle=" .. toggle))
    local t0 = socket.gettime()
    local flipped = false
    drive(d, 4, 1, function()
      local now = socket.gettime() - t0
      if not flipped and now > secs / 3 then
        write(toggle, kind)
        flipped = true
        M.watch_fail = kind == "eio"
      end
      if flipped and kind == "enospc" and now > 2 * secs / 3 then os.remove(toggle) end
      return now > secs
    end)
    M.watch_fail = false
    local st, h = d:req("GET", "/health")
    os.remove(toggle)
    if kind == "eio" then
      -- After a failed fsync nothing may be acknowledged, even with the disk back.
      check("eio: /health is 503 failed", st == 503 and h and h.status == "failed",
            tostring(st) .. " " .. json.encode(h or {}))
      local cst = d:req("POST", "/commands", { aggregate = "counter", id = "after-eio",
                                               type = "Add", data = { n = 1, tag = new_tag(1) } })
      check("eio: no write after a failed fsync", cst == 503, tostring(cst))
    else
      check("enospc: writes resume", st == 200, tostring(st))
      local cst = d:req("POST", "/commands", { aggregate = "counter", id = "after-enospc",
                                               type = "Add", data = { n = 1, tag = new_tag(1) } })
      check("enospc: a command succeeds once space is back", cst == 200, tostring(cst))
    end
    d:kill9()
    local v = assert(start(data, "full"))
    local before = totals.lost + totals.partial + totals.gaps
    verify(v, false)
    res.false_acks = res.false_acks + (totals.lost + totals.partial + totals.gaps - before)
    v:stop()
    local ok, out = integrity(data)
    if not ok then totals.corrupt = totals.corrupt + 1; print("integrity_check: " .. out) end
  end
  local r0 = stats.refused_5xx
  for _ = 1, 3 do phase("eio", 1.5); phase("enospc", 1.5) end
  print(("storage faults (fault VFS): 3 fsync-EIO and 3 ENOSPC runs, %d requests refused with 5xx, "
         .. "%d acknowledged after the fsync failed, acknowledged-but-lost %d, corrupt %d")
    :format(stats.refused_5xx - r0, stats.acked_after_fail - after0, res.false_acks, totals.corrupt))
  check("faults", res.false_acks == 0 and totals.corrupt == 0 and stats.acked_after_fail == after0)
end

-- A real full disk: a 4 MB tmpfs (root only).
local function disk_full()
  local mnt = work .. "/tiny"
  sh("mkdir -p " .. quote(mnt))
  if not sh("mount -t tmpfs -o size=4m tmpfs " .. quote(mnt) .. " 2>/dev/null") then
    print("disk full (tmpfs): skipped (mount needs root)")
    return
  end
  reset_model()
  local data = mnt .. "/data"
  local d = assert(start(data, "full"))
  local r0, a0 = stats.refused_5xx, stats.acked_requests
  local full_seen = false
  local t0 = socket.gettime()
  drive(d, 4, 0, function()
    if stats.refused_5xx > r0 then full_seen = true end
    return (full_seen and stats.refused_5xx - r0 > 50) or socket.gettime() - t0 > 60
  end)
  local _, h = d:req("GET", "/health")
  -- Free space (the harness's ballast file is not needed: grow the mount).
  sh("mount -o remount,size=16m " .. quote(mnt))
  local st = d:req("POST", "/commands", { aggregate = "counter", id = "after-full", type = "Add",
                                          data = { n = 1, tag = new_tag(1) } })
  d:stop()
  local v = assert(start(data, "full"))
  local before = totals.lost + totals.partial + totals.gaps
  verify(v, false)
  local bad = totals.lost + totals.partial + totals.gaps - before
  v:stop()
  local ok, out = integrity(data)
  sh("umount " .. quote(mnt))
  print(("disk full (4 MB tmpfs): %d commands acknowledged until the disk filled, %d refused with "
         .. "5xx, /health then %s, after more space: %s; acknowledged-but-lost %d, integrity %s")
    :format(stats.acked_requests - a0, stats.refused_5xx - r0, h and h.status or "?",
            st == 200 and "writes resume" or ("command answered " .. tostring(st)), bad,
            ok and "ok" or out))
  check("disk full", full_seen and bad == 0 and ok and st == 200)
end

print(("ebb torture: seed %d, work dir %s"):format(opts.seed, work))
if opts.cycles > 0 then crash_loop(opts.cycles) end
if opts.power_full > 0 then power(opts.power_full, "full") end
if opts.power_normal > 0 then power(opts.power_normal, "normal") end
if opts.faults then faults() end
if opts.disk then disk_full() end
print(failures == 0 and "torture: all checks passed" or ("torture: %d checks FAILED"):format(failures))
if failures == 0 and not os.getenv("TORTURE_KEEP") then sh("rm -rf " .. quote(work)) end
os.exit(failures == 0 and 0 or 1)
