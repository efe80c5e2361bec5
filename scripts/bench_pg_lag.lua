-- Cross-daemon delivery lag (scripts/bench postgres): commands go to daemon A
-- one at a time; a subscriber on daemon B (GET /subscribe) receives the
-- events. The lag of one event is from the moment A's answer (the commit
-- acknowledged) is read to the moment B's subscriber reads that position.
-- Usage: lua5.4 scripts/bench_pg_lag.lua URL_A URL_B COUNT
-- Prints: LAG n=... p50_ms=... p99_ms=... max_ms=...
local socket = require "socket"
local json = require "cjson"

local a, b, count = arg[1], arg[2], tonumber(arg[3] or "1000")
local function hostport(url) local h, p = url:match("http://([%d%.]+):(%d+)"); return h, tonumber(p) end

local function connect(url)
  local c = assert(socket.tcp())
  c:settimeout(30)
  assert(c:connect(hostport(url)))
  c:setoption("tcp-nodelay", true)
  return c
end

local sub = connect(b)
assert(sub:send("GET /subscribe?after=" .. (arg[4] or "0") .. " HTTP/1.1\r\nHost: b\r\nAccept: text/event-stream\r\n\r\n"))
repeat local line = assert(sub:receive("*l")) until line == ""
sub:settimeout(0)
local sub_buf, arrived = "", {}
local function read_sub()
  local data, err, partial = sub:receive(65536)
  data = data or partial
  if err == "closed" then error("the subscription closed") end
  if data and #data > 0 then
    local now = socket.gettime()
    sub_buf = sub_buf .. data
    while true do
      local s, e = sub_buf:find("\n\n", 1, true)
      if not s then break end
      local block = sub_buf:sub(1, s - 1)
      sub_buf = sub_buf:sub(e + 1)
      local id = block:match("id: (%d+)")
      if id and block:match("\ndata: ") then arrived[tonumber(id)] = now end
    end
  end
end

local cmd = connect(a)
local acked = {}
local run = tostring(os.time())
for i = 1, count do
  local body = json.encode { aggregate = "bank_account", id = "lag-" .. run .. "-" .. i, type = "OpenAccount",
                             data = { owner = "lag" } }
  assert(cmd:send("POST /commands HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: "
    .. #body .. "\r\n\r\n" .. body))
  -- the answer's head, then its body, reading the subscription meanwhile
  cmd:settimeout(0)
  local text = ""
  while true do
    socket.select({ cmd, sub }, nil, 5)
    read_sub()
    local data, err, partial = cmd:receive(65536)
    data = data or partial
    if err == "closed" then error("daemon A closed the connection") end
    text = text .. (data or "")
    local he = text:find("\r\n\r\n", 1, true)
    if he then
      local len = tonumber(text:match("[Cc]ontent%-[Ll]ength: (%d+)"))
      if #text >= he + 3 + len then
        local answer = json.decode(text:sub(he + 4, he + 3 + len))
        assert(answer.position, text)
        acked[answer.position] = socket.gettime()
        break
      end
    end
  end
  socket.sleep(0.002) -- paced: a lag, not a queue
end
local deadline = socket.gettime() + 60
local function all_in()
  for p in pairs(acked) do if not arrived[p] then return false end end
  return true
end
while not all_in() and socket.gettime() < deadline do
  socket.select({ sub }, nil, 1)
  read_sub()
end
local lags, missing = {}, 0
for p, t in pairs(acked) do
  if arrived[p] then lags[#lags + 1] = math.max(0, arrived[p] - t) * 1000 else missing = missing + 1 end
end
table.sort(lags)
local function pct(q) return lags[math.max(1, math.ceil(#lags * q))] or 0 end
print(string.format("LAG n=%d missing=%d p50_ms=%.2f p99_ms=%.2f max_ms=%.2f", #lags, missing, pct(0.5),
  pct(0.99), lags[#lags] or 0))
