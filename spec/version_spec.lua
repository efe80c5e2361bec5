-- `ebb --version` and /health's version: the release from CMake's project
-- version and the git commit the binary was built from.
local support = require "support"
local daemon = require "daemon_support"
local json = require "cjson"

local function cmake_version()
  local text = support.read(support.root .. "/CMakeLists.txt")
  return assert(text:match("project%(ebb VERSION ([%d%.]+)"), "no project version in CMakeLists.txt")
end

local function git_head()
  local p = io.popen("git -C " .. support.quote(support.root) .. " rev-parse --short=12 HEAD 2>/dev/null")
  local head = p:read("l")
  p:close()
  return head
end

describe("ebb --version", function()
  it("prints the release and the commit it was built from, and exits 0", function()
    local out, err, code = support.run({ "--version" })
    assert.are.equal(0, code, err)
    local release, commit = out:match("^ebb (%S+) %(commit (%S+)%)\n$")
    assert.are.equal(cmake_version(), release)
    assert.truthy(commit, out)
    local head = git_head()
    if head then
      -- built from this checkout: its HEAD when configured (scripts/build configures every time)
      assert.are.equal(head, commit)
    else
      assert.are.equal("unknown", commit)
    end
  end)

  it("leaves --version of `ebb state` an option of that command", function()
    local data = support.tmpdir()
    local out, err, code = support.cli(data)({ "state", "Order", "o-1", "--version", "0" })
    assert.are.equal(0, code, err)
    assert.are.equal(0, json.decode(out).version)
    support.rmdir(data)
  end)
end)

describe("a source tree without git history", function()
  it("configures with the commit \"unknown\", or the one the packager names", function()
    local head = git_head()
    if not head then
      -- this checkout is itself such a tree: the first spec above checked "unknown"
      return
    end
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    local q = support.quote
    -- the tree as a release tarball has it: the committed files, no .git
    assert(os.execute("git -C " .. q(support.root) .. " archive HEAD | tar -x -C " .. q(dir)))
    local function configure(build, extra)
      local ok = os.execute("env -u LD_PRELOAD cmake -S " .. q(dir) .. " -B " .. q(dir .. "/" .. build)
                            .. " " .. (extra or "") .. " >/dev/null 2>&1")
      assert.is_true(ok == true or ok == 0, "cmake configure failed")
      return support.read(dir .. "/" .. build .. "/generated/version.h")
    end
    support.contains(configure("b1"), '#define EBB_COMMIT "unknown"')
    support.contains(configure("b2", "-DEBB_COMMIT=" .. head), '#define EBB_COMMIT "' .. head .. '"')
  end)
end)

describe("/health", function()
  it("says which release and commit serve it", function()
    local d = daemon.start()
    finally(function() d:stop(); support.rmdir(d.data) end)
    assert.truthy(d.url, daemon.logs(d))
    local status, h = d:get("/health")
    assert.are.equal(200, status)
    local out = support.run({ "--version" })
    assert.are.equal(out, "ebb " .. h.version .. " (commit " .. h.commit .. ")\n")
  end)
end)
