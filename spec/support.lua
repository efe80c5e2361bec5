-- Shared helpers for the specs: temporary data directories, the ebb binary,
-- and running the CLI with its output and exit code.
local support = {}

support.root = assert(os.getenv("PWD"), "run the specs from the repository root")
support.build = os.getenv("EBB_BUILD") or (support.root .. "/build")
support.ebb = support.build .. "/ebb"

local function sh_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
support.quote = sh_quote

function support.tmpdir()
  local name = os.tmpname()
  os.remove(name)
  assert(os.execute("mkdir -p " .. sh_quote(name)))
  return name
end

function support.rmdir(dir)
  if dir and dir:match("^/tmp/") then os.execute("rm -rf " .. sh_quote(dir)) end
end

function support.write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

function support.read(path)
  local f = assert(io.open(path, "r"))
  local s = f:read("a")
  f:close()
  return s
end

-- Copies the example aggregates into a fresh directory, so a spec can add modules.
function support.aggregates_copy()
  local dir = support.tmpdir()
  assert(os.execute("cp " .. support.root .. "/aggregates/*.lua " .. sh_quote(dir)))
  return dir
end

-- Runs `ebb args...` (a list of strings); returns stdout, stderr, exit code.
function support.run(args, opts)
  opts = opts or {}
  local parts = { sh_quote(support.ebb) }
  for _, a in ipairs(args) do parts[#parts + 1] = sh_quote(a) end
  local errfile = os.tmpname()
  local cmd = table.concat(parts, " ")
  if opts.stdin then
    local infile = os.tmpname()
    support.write(infile, opts.stdin)
    cmd = cmd .. " < " .. sh_quote(infile)
  end
  if opts.cwd then cmd = "cd " .. sh_quote(opts.cwd) .. " && " .. cmd end
  local p = assert(io.popen(cmd .. " 2> " .. sh_quote(errfile), "r"))
  local out = p:read("a")
  local _, _, code = p:close()
  local err = support.read(errfile)
  os.remove(errfile)
  return out, err, code
end

-- A runner of `ebb` on a data directory and aggregates directory (default: the
-- example's), at normal durability: cli(args[, opts]) or cli(arg, arg, ...).
function support.cli(data, aggregates)
  local base = { "--data", data, "--aggregates", aggregates or (support.root .. "/aggregates"),
                 "--durability", "normal" }
  return function(first, ...)
    local args, opts = { table.unpack(base) }, nil
    local rest = type(first) == "table" and first or { first, ... }
    if type(first) == "table" then opts = ... end
    for _, a in ipairs(rest) do args[#args + 1] = a end
    -- Calls fn until it returns a true value, and returns that. Waits at least a
-- minute (seconds raises it): a loaded machine is slow, and waiting longer only
-- delays a failure, never causes one.
function support.eventually(fn, seconds, what)
  local socket = require "socket"
  local deadline = os.time() + math.max(seconds or 60, 60)
  while true do
    local v = fn()
    if v then return v end
    assert(os.time() <= deadline, "timed out waiting for " .. (what or "a condition"))
    socket.sleep(0.02)
  end
end

return support.run(args, opts)
  end
end

-- Splits NDJSON output into decoded objects.
function support.lines(text, decode)
  local list = {}
  for line in text:gmatch("[^\n]+") do list[#list + 1] = decode(line) end
  return list
end

-- Milliseconds of wall-clock time spent in fn (coarse; for "within a second" checks).
function support.elapsed(fn)
  local t0 = os.time()
  local c0 = os.clock()
  local r = table.pack(fn())
  return os.clock() - c0, os.time() - t0, table.unpack(r, 1, r.n)
end

-- Runs f(...), which must raise; returns the error as text.
function support.failure(f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "expected an error, but there was none")
  return tostring(err)
end

-- Asserts that text contains part, literally.
function support.contains(text, part)
  assert(text:find(part, 1, true), "expected to find\n  " .. part .. "\nin\n  " .. text)
end

-- Calls fn until it returns a true value, and returns that. Waits at least a
-- minute (seconds raises it): a loaded machine is slow, and waiting longer only
-- delays a failure, never causes one.
function support.eventually(fn, seconds, what)
  local socket = require "socket"
  local deadline = os.time() + math.max(seconds or 60, 60)
  while true do
    local v = fn()
    if v then return v end
    assert(os.time() <= deadline, "timed out waiting for " .. (what or "a condition"))
    socket.sleep(0.02)
  end
end

return support
