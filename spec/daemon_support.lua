-- Runs `ebb serve` for a spec, on an ephemeral port, and talks HTTP to it
-- over real sockets (luasocket): plain requests, raw bytes (pipelining,
-- malformed requests), and Server-Sent Events.
local socket = require "socket"
local support = require "support"
local json = require "cjson"

local M = {}

local function sleep(s) socket.sleep(s) end
M.sleep = sleep

-- Starts a daemon. opts: data, aggregates, args (more flags), env (string of
-- VAR=value assignments). Returns a handle with url, host, port, pid.
function M.start(opts)
  opts = opts or {}
  local d = {
    data = opts.data or support.tmpdir(),
    aggregates = opts.aggregates or (support.root .. "/aggregates"),
  }
  d.out = os.tmpname()
  d.log = os.tmpname()
  local args = { "serve", "--data", d.data, "--aggregates", d.aggregates,
                 "--listen", opts.listen or "127.0.0.1:0", "--log-format", "json" }
  for _, a in ipairs(opts.args or {}) do args[#args + 1] = a end
  local store = opts.store or support.store_for(d.data)
  if store then
    args[#args + 1] = "--store"
    args[#args + 1] = store
  end
  if not opts.durability_given then
    args[#args + 1] = "--durability"
    args[#args + 1] = opts.durability or "normal"
  end
  local parts = { support.quote(support.ebb) }
  for _, a in ipairs(args) do parts[#parts + 1] = support.quote(a) end
  local cmd = (opts.env or "") .. " " .. table.concat(parts, " ") .. " > " .. support.quote(d.out)
      .. " 2> " .. support.quote(d.log) .. " & echo $!"
  local p = assert(io.popen(cmd))
  d.pid = tonumber(p:read("l"))
  p:close()
  -- Wait for the line saying where it listens, or for the process to end:
  -- conditions, not a count of polls (a loaded machine, or a PostgreSQL
  -- store that creates its schema first, can take seconds to start).
  support.eventually(function()
    local url = support.read(d.out):match("ebb listening on (http://%S+)")
    if url then
      d.url = url
      d.host, d.port = url:match("http://([%d%.]+):(%d+)")
      d.port = tonumber(d.port)
      return true
    end
    return not M.alive(d)
  end, nil, "the daemon to listen or exit")
  return setmetatable(d, { __index = M })
end

-- Running, and not a zombie waiting for a slow init to reap it.
function M.alive(d)
  local f = io.open("/proc/" .. d.pid .. "/stat", "r")
  if not f then return false end
  local stat = f:read("a")
  f:close()
  return stat:match("^%d+ %b() (%a)") ~= "Z"
end

function M.signal(d, sig)
  os.execute("kill -" .. sig .. " " .. d.pid .. " 2>/dev/null")
end

-- Waits for the process to exit; returns its exit status (via the shell) or nil on timeout.
function M.wait(d, timeout)
  local deadline = socket.gettime() + (timeout or 10)
  while socket.gettime() < deadline do
    if not M.alive(d) then return true end
    sleep(0.02)
  end
  return nil
end

function M.logs(d) return support.read(d.log) end

-- Stops it with SIGTERM and waits; kills it if it does not stop.
function M.stop(d)
  if d.pid and M.alive(d) then
    M.signal(d, "TERM")
    if not M.wait(d, 15) then M.signal(d, "KILL"); M.wait(d, 5) end
  end
  os.remove(d.out)
  os.remove(d.log)
end

local function connect(d, timeout)
  local c = assert(socket.tcp())
  c:settimeout(timeout or 60)
  assert(c:connect(d.host, d.port))
  return c
end
M.connect = connect

-- Reads one HTTP response from a connected socket: status, headers (lower-case names), body.
function M.read_response(c)
  local status, headers = M.read_response_head(c)
  if not status then return nil, headers end
  local body = ""
  local len = tonumber(headers["content-length"])
  if len and len > 0 then body = assert(c:receive(len)) end
  return status, headers, body
end

-- One request on a new connection. opts: body (string or table -> JSON), headers, token,
-- timeout (seconds to wait for the answer: 60 unless given; a loaded machine is slow).
function M.request(d, method, path, opts)
  opts = opts or {}
  local body = opts.body
  if type(body) == "table" then body = json.encode(body) end
  local lines = { method .. " " .. path .. " HTTP/1.1", "Host: " .. d.host, "Connection: close" }
  local ctype = opts.content_type
  if body and ctype == nil then ctype = "application/json" end
  if ctype then lines[#lines + 1] = "Content-Type: " .. ctype end
  if body then lines[#lines + 1] = "Content-Length: " .. #body end
  local token = opts.token or d.token
  if token then lines[#lines + 1] = "Authorization: Bearer " .. token end
  for k, v in pairs(opts.headers or {}) do lines[#lines + 1] = k .. ": " .. v end
  local c = connect(d, opts.timeout)
  assert(c:send(table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or "")))
  local status, headers, text = M.read_response(c)
  c:close()
  local ok, decoded = pcall(json.decode, text or "")
  return status, ok and decoded or nil, text, headers
end

function M.get(d, path, opts) return M.request(d, "GET", path, opts) end
function M.post(d, path, body, opts)
  opts = opts or {}
  opts.body = body
  return M.request(d, "POST", path, opts)
end

-- Sends raw bytes; returns everything the server sends until it closes.
function M.raw(d, bytes, wait)
  local c = connect(d)
  assert(c:send(bytes))
  if wait then sleep(wait) end
  local chunks = {}
  while true do
    local s, err, partial = c:receive(8192)
    if s then chunks[#chunks + 1] = s
    else
      if partial and #partial > 0 then chunks[#chunks + 1] = partial end
      if err == "closed" or err == "timeout" then break end
    end
  end
  c:close()
  return table.concat(chunks)
end

-- Opens a subscription: returns an object with :next(timeout) -> {id, event, data} and :close().
function M.subscribe(d, query, headers)
  local c = connect(d)
  local lines = { "GET /subscribe" .. (query or "") .. " HTTP/1.1", "Host: x", "Accept: text/event-stream" }
  if d.token then lines[#lines + 1] = "Authorization: Bearer " .. d.token end
  for k, v in pairs(headers or {}) do lines[#lines + 1] = k .. ": " .. v end
  assert(c:send(table.concat(lines, "\r\n") .. "\r\n\r\n"))
  local status, hdrs = M.read_response_head(c)
  local sub = { c = c, status = status, headers = hdrs }
  function sub.next(_, timeout)
    c:settimeout(timeout or 5)
    local ev = {}
    while true do
      local line, err = c:receive("*l")
      if not line then return nil, err end
      if line == "" then
        if ev.data or ev.event then
          if ev.data and ev.data:sub(1, 1) == "{" then ev.json = json.decode(ev.data) end
          return ev
        end
      elseif line:sub(1, 1) == ":" then
        ev.comment = line
      else
        local k, v = line:match("^(%w+): ?(.*)$")
        if k == "data" then ev.data = ev.data and (ev.data .. "\n" .. v) or v
        elseif k then ev[k] = v end
      end
    end
  end
  function sub.close() c:close() end
  return sub
end

function M.read_response_head(c)
  local line, err = c:receive("*l")
  if not line then return nil, err end
  local status = tonumber(line:match("^HTTP/1%.%d (%d%d%d)"))
  local headers = {}
  while true do
    local h = assert(c:receive("*l"))
    if h == "" then break end
    local k, v = h:match("^([^:]+):%s*(.*)$")
    headers[k:lower()] = v
  end
  return status, headers
end

-- Sends a command; returns status, decoded answer.
function M.command(d, aggregate, id, type_, data, extra)
  local body = { aggregate = aggregate, id = id, type = type_, data = data or {} }
  for k, v in pairs(extra or {}) do body[k] = v end
  local status, answer = M.post(d, "/commands", body)
  return status, answer
end

-- Keep-alive clients for load: n connections, each with one request in
-- flight per round, all sent before any answer is read, so the daemon has
-- n concurrent requests. step(i) returns the next request body for client i
-- (a table, POSTed to /commands) or nil when the client is done;
-- done(i, status, answer) sees each answer. Stops when every client is done,
-- or when should_stop() says so; a lost connection ends that client.
-- d is a daemon or a list of daemons (the clients spread over them).
function M.load(d, n, step, done, should_stop)
  local conns = {}
  local active = n
  -- d may be a list of daemons: client i then talks to daemon (i - 1) % #d + 1
  for i = 1, n do conns[i] = connect(d[1] and d[(i - 1) % #d + 1] or d) end
  while active > 0 and not (should_stop and should_stop()) do
    for i = 1, n do
      if conns[i] then
        local body = step(i)
        if body == nil then
          conns[i]:close(); conns[i] = false; active = active - 1
        else
          body = json.encode(body)
          local ok = conns[i]:send("POST /commands HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            .. (d.token and ("Authorization: Bearer " .. d.token .. "\r\n") or "")
            .. "Content-Length: " .. #body .. "\r\n\r\n" .. body)
          if not ok then conns[i]:close(); conns[i] = false; active = active - 1 end
        end
      end
    end
    for i = 1, n do
      if conns[i] then
        local status, headers, text = M.read_response(conns[i])
        if not status then
          conns[i]:close(); conns[i] = false; active = active - 1
        else
          local ok, answer = pcall(json.decode, text)
          done(i, status, ok and answer or nil)
          if (headers["connection"] or ""):lower() == "close" then
            conns[i]:close(); conns[i] = false; active = active - 1
          end
        end
      end
    end
  end
  for i = 1, n do if conns[i] then conns[i]:close() end end
end

return M
