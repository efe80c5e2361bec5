-- `ebb init` (a project from the skeleton, never overwriting) and `ebb test`
-- (the project's specs under busted, with ebb's library found for the user),
-- and EBB_LUA_DIR, the override of where the runtime's Lua library is.
local support = require "support"

local q = support.quote

local function exists(path)
  local f = io.open(path, "r")
  if f then f:close() end
  return f ~= nil
end

local function last_line(text)
  return text:match("([^\n]*)\n?$")
end

-- Runs `ebb ARGS` in dir with extra environment assignments (a string).
local function ebb_in(dir, args, env)
  local parts = { q(support.ebb) }
  for _, a in ipairs(args) do parts[#parts + 1] = q(a) end
  local errfile = os.tmpname()
  local p = assert(io.popen("cd " .. q(dir) .. " && " .. (env or "") .. " " .. table.concat(parts, " ")
                            .. " 2> " .. q(errfile)))
  local out = p:read("a")
  local _, _, code = p:close()
  local err = support.read(errfile)
  os.remove(errfile)
  return out, err, code
end

local FILES = { "README.md", "ebb.conf.lua", ".gitignore", "aggregates/task.lua",
                "projections/open_tasks.lua", "reactors/overdue_tasks.lua", "spec/task_spec.lua",
                "spec/open_tasks_spec.lua", "spec/overdue_tasks_spec.lua" }

describe("ebb init", function()
  local root
  before_each(function() root = support.tmpdir() end)
  after_each(function() support.rmdir(root) end)

  it("1 lays out a project in a new directory and says what it created", function()
    local dir = root .. "/shop"
    local out, err, code = support.run({ "init", dir })
    assert.are.equal(0, code, err)
    for _, f in ipairs(FILES) do
      assert.is_true(exists(dir .. "/" .. f), f)
      support.contains(out, "created " .. dir .. "/" .. f .. "\n")
      assert.are.equal(support.read(support.root .. "/skeleton/" .. f), support.read(dir .. "/" .. f))
    end
    assert.is_nil(out:find("skipped", 1, true))
  end)

  it("2 defaults to the current directory", function()
    local out, err, code = ebb_in(root, { "init" })
    assert.are.equal(0, code, err)
    assert.is_true(exists(root .. "/aggregates/task.lua"))
    support.contains(out, "created ./aggregates/task.lua")
  end)

  it("3 never overwrites a file, and names the ones it skipped", function()
    assert(os.execute("mkdir -p " .. q(root .. "/aggregates")))
    support.write(root .. "/README.md", "mine\n")
    support.write(root .. "/aggregates/task.lua", "return 'my own task'\n")
    local out, err, code = support.run({ "init", root })
    assert.are.equal(0, code, err)
    assert.are.equal("mine\n", support.read(root .. "/README.md"))
    assert.are.equal("return 'my own task'\n", support.read(root .. "/aggregates/task.lua"))
    support.contains(out, "skipped " .. root .. "/README.md (it exists)")
    support.contains(out, "skipped " .. root .. "/aggregates/task.lua (it exists)")
    support.contains(out, "created " .. root .. "/spec/task_spec.lua")
    -- a second run creates nothing and skips everything
    out = support.run({ "init", root })
    for _, f in ipairs(FILES) do support.contains(out, "skipped " .. root .. "/" .. f .. " (it exists)") end
    assert.is_nil(out:find("created", 1, true))
  end)

  it("4 fails clearly when a directory it needs is a file, keeping what it made", function()
    support.write(root .. "/spec", "not a directory\n")
    local out, err, code = support.run({ "init", root })
    assert.are_not.equal(0, code)
    support.contains(err, root .. "/spec exists and is not a directory")
    assert.are.equal("not a directory\n", support.read(root .. "/spec"))
    support.contains(out, "created " .. root .. "/aggregates/task.lua")
  end)
end)

describe("ebb test", function()
  local dir
  before_each(function()
    dir = support.tmpdir()
    local _, err, code = support.run({ "init", dir })
    assert.are.equal(0, code, err)
  end)
  after_each(function() support.rmdir(dir) end)

  it("1 passes right after init, with busted's exit status and a last line of totals", function()
    local out, err, code = ebb_in(dir, { "test" })
    assert.are.equal(0, code, out .. err)
    assert.are.equal("12 passed, 0 failed", last_line(out))
    support.contains(out, "12 successes / 0 failures / 0 errors")
  end)

  it("2 fails with a readable diff once a rule of the example aggregate is broken", function()
    local path = dir .. "/aggregates/task.lua"
    local text = support.read(path)
    -- completing a task now leaves it "finished" instead of "done": it completes
    -- with the wrong state, and can then be completed twice
    local broken, n = text:gsub('s%.status = "done"', 's.status = "finished"')
    assert.are.equal(1, n)
    support.write(path, broken)
    local out, _, code = ebb_in(dir, { "test" })
    assert.are_not.equal(0, code)
    assert.are.equal("8 passed, 4 failed", last_line(out))
    support.contains(out, "Task completes once it is open")
    support.contains(out, 'states differ at state.status: expected "done" (string), got "finished" (string)')
    support.contains(out, 'expected:\n  { status = "done" }\n'
                          .. 'got:\n  { status = "finished", title = "Water the plants" }')
  end)

  it("3 hands its arguments to busted", function()
    local out, err, code = ebb_in(dir, { "test", "--filter", "needs a title" })
    assert.are.equal(0, code, out .. err)
    assert.are.equal("1 passed, 0 failed", last_line(out))
    out, err, code = ebb_in(dir, { "test", "-o", "TAP", "spec/open_tasks_spec.lua" })
    assert.are.equal(0, code, out .. err)
    support.contains(out, "ok 1 - open_tasks")
    assert.are.equal("2 passed, 0 failed", last_line(out))
  end)

  it("4 takes the module directories from the settings", function()
    assert(os.execute("mv " .. q(dir .. "/aggregates") .. " " .. q(dir .. "/domain")))
    local out, _, code = ebb_in(dir, { "test" })
    assert.are_not.equal(0, code)
    support.contains(out, "module 'task' not found")
    out, _, code = ebb_in(dir, { "test" }, "EBB_AGGREGATES=domain")
    assert.are.equal(0, code, out)
    assert.are.equal("12 passed, 0 failed", last_line(out))
    support.write(dir .. "/my.conf.lua", 'aggregates = "domain"\n')
    out, _, code = ebb_in(dir, { "test" }, "EBB_CONFIG=my.conf.lua")
    assert.are.equal(0, code, out)
  end)

  it("5 keeps the user's own Lua paths after its own", function()
    assert(os.execute("mkdir -p " .. q(dir .. "/lib")))
    support.write(dir .. "/lib/helper.lua", "return { answer = 42 }\n")
    support.write(dir .. "/spec/helper_spec.lua",
                  'it("finds helper", function() assert.are.equal(42, require("helper").answer) end)\n')
    for _, var in ipairs { "LUA_PATH", "LUA_PATH_5_4" } do
      local out, _, code = ebb_in(dir, { "test" }, var .. "=" .. q(dir .. "/lib/?.lua;;"))
      assert.are.equal(0, code, out)
      assert.are.equal("13 passed, 0 failed", last_line(out))
    end
    local out, _, code = ebb_in(dir, { "test" })
    assert.are_not.equal(0, code)
    support.contains(out, "module 'helper' not found")
  end)

  it("6 says what is missing when busted cannot be found", function()
    local out, err, code = ebb_in(dir, { "test" }, "PATH=/nonexistent")
    assert.are.equal(1, code)
    assert.are.equal("", out)
    support.contains(err, "ebb test needs lua5.4")
  end)
end)

describe("a new project, served", function()
  local daemon = require "daemon_support"
  local dir, d
  before_each(function()
    dir = support.tmpdir()
    local _, err, code = support.run({ "init", dir })
    assert.are.equal(0, code, err)
  end)
  after_each(function()
    if d then d:stop() end
    d = nil
    support.rmdir(dir)
  end)

  local function serve(overdue_seconds)
    d = daemon.start({ aggregates = dir .. "/aggregates",
                       args = { "--projections", dir .. "/projections", "--reactors", dir .. "/reactors" },
                       env = "EBB_REACTOR_OVERDUE_TASKS_OVERDUE_SECONDS=" .. overdue_seconds })
    assert.truthy(d.url, "the daemon did not start: " .. d:logs())
  end

  local function command(id, type_, data)
    local st, answer = d:command("Task", id, type_, data)
    assert.are.equal(200, st, type_ .. " " .. id .. ": " .. require("cjson").encode(answer or {}))
    return answer
  end

  it("1 is checked with its reactor listed", function()
    local out, err, code = ebb_in(dir, { "check", "--data", dir .. "/data" })
    assert.are.equal(0, code, err)
    support.contains(out, '"reactors":["overdue_tasks"]')
  end)

  it("2 schedules a reminder per open task, and drops it once the task is done", function()
    serve(86400)
    local opened = command("t-1", "OpenTask", { title = "Water the plants" })
    command("t-2", "OpenTask", { title = "Buy bread" })
    command("t-2", "CompleteTask")
    local pending = support.eventually(function()
      local st, body = d:get("/reactors/overdue_tasks")
      if st ~= 200 or body.state ~= "live" or body.position ~= body.head then return nil end
      local _, l = d:get("/reactors/overdue_tasks/schedules")
      return l
    end, 20, "the reactor to catch up")
    assert.are.equal(1, #pending, require("cjson").encode(pending))
    assert.are.equal("overdue:t-1", pending[1].key)
    assert.are.same({ aggregate = "Task", id = "t-1", type = "MarkOverdue", data = {} }, pending[1].command)
    assert.are.equal("overdue_tasks:" .. opened.events[1].id .. ":schedule:overdue:t-1", pending[1].command_id)
  end)

  it("3 marks a task still open when the reminder falls due overdue", function()
    serve(1)
    command("t-1", "OpenTask", { title = "Water the plants" })
    support.eventually(function()
      local _, body = d:get("/aggregates/Task/t-1")
      return body and body.state and body.state.status == "overdue"
    end, 20, "the task to become overdue")
    -- still on the to-do list, and it can still be done
    local _, list = d:get("/projections/open_tasks/list")
    assert.are.equal("t-1", list[1].id)
    command("t-1", "CompleteTask")
  end)
end)

describe("EBB_LUA_DIR", function()
  it("overrides where the runtime's Lua library is loaded from", function()
    local data = support.tmpdir()
    local out, err, code = support.run({ "check", "--data", data, "--aggregates",
                                         support.root .. "/aggregates" })
    assert.are.equal(0, code, err)
    assert.truthy(out:find('"ok":true', 1, true))
    local cmd = "EBB_LUA_DIR=/nonexistent/lua " .. q(support.ebb) .. " check --data " .. q(data)
        .. " --aggregates " .. q(support.root .. "/aggregates") .. " 2>&1"
    local p = io.popen(cmd)
    out = p:read("a")
    local _, _, status = p:close()
    assert.are_not.equal(0, status)
    support.contains(out, "/nonexistent/lua")
    support.rmdir(data)
  end)
end)
