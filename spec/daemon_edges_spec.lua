-- Small holes found by review: the example queries validate their page
-- arguments (limit=-1 meant no limit at all), an argument that is not UTF-8
-- once percent-decoded is a 400, HEAD /subscribe sends no body, and a low
-- file-descriptor limit makes the server refuse with 503 before the process
-- runs out of descriptors.
local support = require "support"
local daemon = require "daemon_support"
local socket = require "socket"

local PROJECTIONS = { "--projections", support.root .. "/projections" }

describe("query arguments of the example projections", function()
  local d
  setup(function()
    d = daemon.start({ args = PROJECTIONS })
    for i = 1, 3 do
      assert.are.equal(200, (d:command("order", "o" .. i, "CreateOrder", { customer_id = "c" })))
      assert.are.equal(200, (d:command("bank_account", "a" .. i, "OpenAccount",
        { owner = "o", initial_deposit = i })))
    end
  end)
  teardown(function() d:stop() end)

  for _, case in ipairs {
    { "order_summary/list?limit=-1", "limit must be a whole number from 1, not %-1" },
    { "order_summary/list?limit=0", "limit must be a whole number from 1, not 0" },
    { "order_summary/list?limit=2.5", "limit must be a whole number from 1, not 2.5" },
    { "order_summary/list?limit=lots", "limit must be a whole number from 1, not lots" },
    { "order_summary/list?offset=-3", "offset must be a whole number from 0, not %-3" },
    { "account_balances/top?limit=-1", "limit must be a whole number from 1, not %-1" },
  } do
    it("refuses " .. case[1] .. " with a 400 saying why", function()
      local st, answer = d:get("/projections/" .. case[1] .. "&after=6")
      assert.are.equal(400, st)
      assert.are.equal("bad_request", answer.error.code)
      assert.matches(case[2], answer.error.message)
    end)
  end

  it("still answers good arguments, capping a limit above the page size", function()
    local st, page = d:get("/projections/order_summary/list?limit=2&offset=1&after=6")
    assert.are.equal(200, st)
    assert.are.equal(2, #page)
    st, page = d:get("/projections/account_balances/top?limit=1000")
    assert.are.equal(200, st)
    assert.are.equal(3, #page)
  end)

  it("answers an argument that is not UTF-8 once percent-decoded with a 400", function()
    local st, answer = d:get("/projections/order_summary/get?id=%FF")
    assert.are.equal(400, st)
    assert.are.equal("bad_request", answer.error.code)
    assert.matches("UTF%-8", answer.error.message)
  end)
end)

describe("HEAD /subscribe", function()
  it("answers the headers of a subscription and no body", function()
    local d = daemon.start()
    local c = daemon.connect(d)
    assert(c:send("HEAD /subscribe HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n" ..
                  "Connection: close\r\n\r\n"))
    local status, headers = daemon.read_response_head(c)
    assert.are.equal(200, status)
    assert.are.equal("text/event-stream", headers["content-type"])
    -- The next bytes are the answer to the pipelined request, not a stream.
    local line = c:receive("*l")
    assert.matches("^HTTP/1%.1 200", line)
    c:close()
    d:stop()
  end)
end)

describe("a low file-descriptor limit", function()
  local d
  after_each(function() if d then d:stop() end d = nil end)

  local function limits(pid)
    local text = support.read("/proc/" .. pid .. "/limits")
    local soft, hard = text:match("Max open files%s+(%d+)%s+(%d+)")
    return tonumber(soft), tonumber(hard)
  end

  it("raises the soft limit to the hard one at start", function()
    d = daemon.start({ env = "ulimit -Sn 200;" })
    assert.is_not_nil(d.url, d:logs())
    local soft, hard = limits(d.pid)
    assert.are.equal(hard, soft)
    assert.is_true(soft > 200)
  end)

  it("refuses connections with 503 while descriptors remain, and recovers", function()
    d = daemon.start({ env = "ulimit -n 256;" })
    assert.is_not_nil(d.url, d:logs())
    assert.matches("max_connections lowered to fit the file descriptor limit", d:logs())
    local max = tonumber(d:logs():match('"max_connections":(%d+)'))
    assert.is_true(max > 0 and max < 128)
    local function open_idle(list, n)
      for i = 1, n do
        local c = socket.tcp()
        c:settimeout(5)
        if c:connect(d.host, d.port) then list[#list + 1] = c else c:close() end
        if i % 50 == 0 then daemon.sleep(0.05) end
      end
    end
    -- More idle connections than the lowered limit: a new request is refused
    -- politely, not left hanging in the backlog for want of a descriptor.
    local idle = {}
    open_idle(idle, max + 10)
    daemon.sleep(0.3)
    local st, answer = d:get("/health")
    assert.are.equal(503, st)
    assert.matches("too many connections", answer.error.message)
    -- Far more than the descriptors: the process never runs out of them.
    open_idle(idle, 300)
    daemon.sleep(0.3)
    local fds = 0
    for _ in io.popen("ls /proc/" .. d.pid .. "/fd"):lines() do fds = fds + 1 end
    assert.is_true(fds < 256, fds .. " descriptors open")
    assert.is_nil(d:logs():lower():find("too many open files", 1, true))
    for _, c in ipairs(idle) do c:close() end
    local ok
    for _ = 1, 200 do
      ok = pcall(function() return assert(d:get("/health") == 200) end)
      if ok then break end
      daemon.sleep(0.05)
    end
    assert.is_true(ok, "the daemon did not recover")
    assert.is_true(d:alive())
  end)
end)
