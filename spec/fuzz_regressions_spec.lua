-- Regressions of what the fuzz targets (fuzz/, scripts/fuzz) found: each
-- case is the smallest form of a crashing or hanging input, checked through
-- the interface a user reaches it by. The inputs are in fuzz/corpus too.
local support = require "support"

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

    it("that grows without end is stopped at a memory limit (fuzz_config)", function()
      local out, err, code = check "local s = 'x' while true do s = s .. s end"
      assert.equal(7, code, err)
      assert.equal("", out)
      assert.matches("config file .*: memory limit of %d+ bytes exceeded", err)
    end)

    it("still sets what it assigns or returns after the bounds were added", function()
      local out, err, code = check "local n = 0 for i = 1, 4096 do n = n + 1 end max_body = n"
      assert.equal(0, code, err)
      assert.matches('"max_body":{"value":4096,"source":"file"}', out, 1, true)
    end)
  end)
end)
