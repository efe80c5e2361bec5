-- A real nats-server for the NATS specs (Debian's 2.9): started on a free
-- loopback port with JetStream and a temporary store directory, optionally
-- with a config file (authorization, TLS), killed and restarted as a spec
-- needs. Its streams are read back by ebb-nats-read (scripts/nats_read.c,
-- libnats, nothing of ebb's).
local socket = require "socket"
local json = require "cjson"
local support = require "support"
local luassert = require "luassert"

local M = {}
M.reader = support.build .. "/ebb-nats-read"
local q = support.quote

local function port_free(port)
  local c = socket.tcp()
  c:settimeout(0.2)
  local ok = c:connect("127.0.0.1", port)
  c:close()
  return not ok
end

-- A nats-server: n.url, n.dir (its store, kept across restarts), n.pid.
local Nats = {}
Nats.__index = Nats

-- ebb-nats-read with this server's URL and the reader's own options
-- (credentials in the URL, TLS files), then args.
function Nats:reader_cmd(args)
  local parts = { "env -u LD_PRELOAD", q(M.reader) }
  for _, a in ipairs(self.reader_args or {}) do parts[#parts + 1] = q(a) end
  parts[#parts + 1] = q(self.reader_url or self.url)
  for _, a in ipairs(args) do parts[#parts + 1] = q(a) end
  return table.concat(parts, " ")
end

local function nats_start(n)
  n.log = n.log or os.tmpname()
  local conf = n.conf_file and (" -c " .. q(n.conf_file)) or ""
  -- not the sanitizer runtimes scripts/test --sanitize preloads for busted
  local p = assert(io.popen("env -u LD_PRELOAD nats-server" .. conf .. " -js -a 127.0.0.1 -p " .. n.port ..
    " -sd " .. q(n.dir) .. " >> " .. q(n.log) .. " 2>&1 & echo $!"))
  n.pid = tonumber(p:read("l"))
  p:close()
  -- Ready, or gone (another process took the port first: the caller picks another).
  local ready = support.eventually(function()
    local text = support.read(n.log) or ""
    local from = n.log_at or 1
    if text:find("Server is ready", from, true) then return "ready" end
    if not os.execute("kill -0 " .. n.pid .. " 2>/dev/null") then return "gone" end
  end, 60, "nats-server to be ready")
  n.log_at = #(support.read(n.log) or "") + 1
  if ready == "gone" then return nil end
  -- JetStream answers (here: that there is no such stream) once it has read its store
  support.eventually(function()
    local r = assert(io.popen(n:reader_cmd { "NOSUCH", "--info" } .. " 2>&1"))
    local text = r:read("a")
    r:close()
    return text:find("10059", 1, true)
  end, 60, "JetStream to answer")
  return n
end

-- Ports below the kernel's ephemeral range (32768 and up), so that no
-- outgoing connection or port-0 listener of another spec takes it meanwhile;
-- if something still does, nats-server exits and another port is tried.
-- opts (all optional): conf (text of a nats-server config file: authorization,
-- tls), scheme ("nats" or "tls"), userinfo (put before the host in the
-- reader's URL: "token@", "user:password@"), reader_args (ebb-nats-read's
-- TLS options).
function M.new(opts)
  opts = opts or {}
  local n = setmetatable({ dir = support.tmpdir(), reader_args = opts.reader_args }, Nats)
  if opts.conf then
    n.conf_file = n.dir .. "/nats.conf"
    support.write(n.conf_file, opts.conf)
  end
  for _ = 1, 20 do
    for _ = 1, 50 do
      n.port = 20000 + math.random(0, 12000)
      if port_free(n.port) then break end
    end
    local scheme = opts.scheme or "nats"
    n.url = scheme .. "://127.0.0.1:" .. n.port
    n.reader_url = scheme .. "://" .. (opts.userinfo or "") .. "127.0.0.1:" .. n.port
    if nats_start(n) then return n end
  end
  error("nats-server did not start: " .. (support.read(n.log) or ""))
end

function Nats:kill(sig)
  os.execute("kill -" .. (sig or "KILL") .. " " .. self.pid .. " 2>/dev/null")
  support.eventually(function()
    local f = io.open("/proc/" .. self.pid .. "/stat")
    if not f then return true end
    local zombie = f:read("a"):match("^%d+ %b() (%a)") == "Z"
    f:close()
    return zombie
  end, 60, "nats-server to exit")
  support.eventually(function() return port_free(self.port) end, 60, "the port to be free")
end

function Nats:restart() return assert(nats_start(self), "nats-server did not start again on its port") end

function Nats:close()
  if self.pid then os.execute("kill -KILL " .. self.pid .. " 2>/dev/null") end
  support.rmdir(self.dir)
  if self.log then os.remove(self.log) end
end

-- The stream's messages, decoded, in stream order.
function Nats:read(stream)
  local p = assert(io.popen(self:reader_cmd { stream or "EBB" } .. " 2>&1"))
  local text = p:read("a")
  p:close()
  local list = {}
  for line in text:gmatch("[^\n]+") do
    local ok, m = pcall(json.decode, line)
    assert(ok, "ebb-nats-read: " .. line)
    list[#list + 1] = m
  end
  return list
end

-- ebb-nats-read's --create: a stream with that one subject.
function Nats:create(stream, subject)
  return os.execute(self:reader_cmd { stream, "--create", subject })
end

-- The daemon's /health, or nil.
function M.health(d)
  local status, h = d:get("/health")
  return status == 200 and h or nil
end

-- Waits until JetStream acknowledged every committed event.
function M.caught_up(d)
  return support.eventually(function()
    local h = M.health(d)
    return h and h.nats and h.nats.state == "live" and h.nats.position == h.position and h.nats.lag_events == 0
        and h.nats
  end, 120, "the publisher to catch up")
end

function M.metric(d, name)
  local _, _, text = d:get("/metrics")
  return tonumber(text:match("\n" .. name .. " (%d+)"))
end

function M.open(d, i)
  local status, answer = d:command("bank_account", "acct-" .. i, "OpenAccount", { owner = "o" .. i })
  luassert.are.equal(200, status, json.encode(answer))
  return answer
end

-- Every event of the store, once, in order, as GET /events shows it.
function M.assert_stream_is_store(d, n, stream)
  local msgs = n:read(stream)
  local events, after = {}, 0
  while true do
    local status, page = d:get(("/events?limit=500&after=%d"):format(after))
    luassert.are.equal(200, status)
    if #page.events == 0 then break end
    for _, e in ipairs(page.events) do events[#events + 1] = e end
    after = page.next
  end
  luassert.are.equal(#events, #msgs, "messages in the stream")
  for i, m in ipairs(msgs) do
    local e = events[i]
    luassert.are.equal(("%d"):format(e.position), m.headers["Ebb-Position"], "message " .. i)
    luassert.are.equal(e.id, m.headers["Nats-Msg-Id"])
    luassert.are.same(e, m.data)
  end
  return msgs
end

-- A shell command without the sanitizer runtimes, its output dropped; fails the spec if it fails.
function M.sh(cmd)
  local ok = os.execute("env -u LD_PRELOAD sh -c " .. q(cmd .. " > /dev/null 2>&1"))
  luassert(ok, "failed: " .. cmd)
end

-- `ebb args...` with a time limit and VAR=value assignments: stdout, stderr, exit code.
function M.run(args, env)
  return support.run(args, { env = env, timeout = 20, stdin = "" })
end

return M
