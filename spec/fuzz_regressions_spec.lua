-- Regressions of what the fuzz targets (fuzz/, scripts/fuzz) found: each
-- case is the smallest form of a crashing or hanging input, checked through
-- the interface a user reaches it by. The inputs are in fuzz/corpus too.
local core = require "ebb.core"
local support = require "support"
local daemon = require "daemon_support"

-- Runs `ebb args...` bounded by a generous timeout, so that a hang fails
-- the spec (exit 124) instead of stopping the suite.
local function run(args)
  local parts = { "timeout", "120", support.quote(support.ebb) }
  for _, a in ipairs(args) do parts[#parts + 1] = support.quote(a) end
  local errfile = os.tmpname()
  local p = assert(io.popen(table.concat(parts, " ") .. " 2> " .. support.quote(errfile), "r"))
  local out = p:read("a")
  local _, _, code = p:close()
  local err = support.read(errfile)
  os.remove(errfile)
  return out, err, code
end

describe("fuzzing regressions", function()
  local dir
  before_each(function() dir = support.tmpdir() end)
  after_each(function() support.rmdir(dir) end)

  describe("a config file", function()
    local function check(text)
      local file = dir .. "/ebb.conf.lua"
      support.write(file, text)
      return run { "check", "--config", file, "--data", dir .. "/data" }
    end

    it("that loops forever is stopped with an error, not a hang (fuzz_config)", function()
      for _, text in ipairs { "while true do end", "::a:: goto a", "data = 'x' repeat until false" } do
        local out, err, code = check(text)
        assert.equal(7, code, text .. ": " .. err)
        assert.equal("", out)
        assert.matches("config file .*: instruction budget of %d+ exceeded", err)
      end
    end)

    it("that grows without end is stopped within its bounds (fuzz_config)", function()
      local out, err, code = check "local s = 'x' while true do s = s .. s end"
      assert.equal(7, code, err)
      assert.equal("", out)
      -- Allocation is charged to the budget: 100,000 instructions buy
      -- less memory than the 8 MiB cap.
      assert.matches("config file .*: instruction budget of 100000 exceeded %(allocating %d+ bytes%)", err)
    end)

    it("still sets what it assigns or returns after the bounds were added", function()
      local out, err, code = check "local n = 0 for i = 1, 4096 do n = n + 1 end max_body = n"
      assert.equal(0, code, err)
      assert.matches('"max_body":{"value":4096,"source":"file"}', out, 1, true)
    end)
  end)

  describe("over HTTP", function()
    local d
    setup(function() d = daemon.start { args = { "--projections", support.root .. "/projections" } } end)
    teardown(function() d:stop() end)

    -- The body of the answer to raw request bytes, decoded by ebb's own
    -- (strict UTF-8) JSON decoder.
    local function answer(request)
      local text = d:raw(request)
      local status = tonumber(text:match("^HTTP/1%.1 (%d+)"))
      local body = text:match("\r\n\r\n(.*)$")
      local v, err = core.json_decode(body or "")
      return status, v, err, body
    end

    it("refuses projection query arguments that are not UTF-8 with 400, not a script error (fuzz_http)", function()
      for _, path in ipairs { "/projections/order_summary/get?id=%FF",
                              "/projections/order_summary/list?%C0%AF=1",
                              "/projections/order_summary/list?limit=%ED%A0%80" } do
        local status, v, err, body = answer("GET " .. path .. " HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert.equal(400, status, path .. ": " .. tostring(body))
        assert.is_table(v, err)
        assert.equal("bad_request", v.error.code)
        assert.matches("query argument 1 is not valid UTF%-8", v.error.message)
      end
    end)

    it("answers JSON that is valid UTF-8 when the message quotes bytes that are not (fuzz_http)", function()
      -- a raw byte in the path, and a parameter name cut inside a character
      local long = string.rep("a", 63) .. "%C3%A9"
      for _, path in ipairs { "/no\255route", "/events?" .. long .. "=1" } do
        local status, v, err, body = answer("GET " .. path .. " HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert.is_true(status == 400 or status == 404, path .. ": " .. tostring(status))
        assert.is_table(v, path .. ": " .. tostring(err) .. ": " .. tostring(body))
        assert.is_string(v.error.message)
      end
    end)
  end)
end)
