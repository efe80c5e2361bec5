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

-- The store the specs run against: SQLite in each data directory, or with
-- EBB_TEST_STORE=postgres (under scripts/pg, which sets EBB_TEST_PG_URI) a
-- PostgreSQL schema of its own per data directory, so each spec starts empty
-- and reopening the same directory reopens the same store.
support.store_kind = os.getenv("EBB_TEST_STORE") or "sqlite"

local function pg_uri()
  return assert(os.getenv("EBB_TEST_PG_URI"),
    "EBB_TEST_STORE=postgres needs EBB_TEST_PG_URI: run the specs under scripts/pg")
end

-- Runs SQL on the test server (psql, stopping at the first error).
function support.psql(sql)
  -- without the sanitizer runtimes scripts/test --sanitize preloads (psql hangs under them)
  assert(os.execute("env -u LD_PRELOAD PGOPTIONS=-cclient_min_messages=warning psql -q -X -v ON_ERROR_STOP=1 " ..
    sh_quote(pg_uri()) .. " -c " ..
    sh_quote(sql) .. " >/dev/null"))
end

local function schema_of(dir)
  return "t" .. dir:gsub("%u", function(c) return "_" .. c:lower() end):gsub("[^%w_]", "_")
end

local pg_made = {}
function support.store_for(dir)
  if support.store_kind ~= "postgres" then return nil end
  local schema = schema_of(dir)
  if not pg_made[schema] then
    support.psql("CREATE SCHEMA IF NOT EXISTS " .. schema)
    pg_made[schema] = true
  end
  return pg_uri() .. "?options=-csearch_path%3D" .. schema
end

-- A copy of the store of data directory dir (no daemon may be running on
-- it) in the directory backup: events.db and its WAL on SQLite, the tables of
-- its schema on PostgreSQL (in backup's schema). restore_store(backup, dir)
-- puts it back, as restoring an older backup of the store would.
local STORE_TABLES = { "ebb_head", "events", "commands", "snapshots" }
function support.backup_store(dir, backup)
  if support.store_kind == "sqlite" then
    assert(os.execute("cp " .. sh_quote(dir) .. "/events.db* " .. sh_quote(backup) .. "/"))
    return
  end
  support.store_for(backup)
  local sql = {}
  for _, t in ipairs(STORE_TABLES) do
    sql[#sql + 1] = ("DROP TABLE IF EXISTS %s.%s; CREATE TABLE %s.%s AS TABLE %s.%s;")
      :format(schema_of(backup), t, schema_of(backup), t, schema_of(dir), t)
  end
  support.psql(table.concat(sql, " "))
end

function support.restore_store(backup, dir)
  if support.store_kind == "sqlite" then
    assert(os.execute("rm -f " .. sh_quote(dir) .. "/events.db* && cp " .. sh_quote(backup) .. "/events.db* "
      .. sh_quote(dir) .. "/"))
    return
  end
  local sql = { "BEGIN;" }
  for _, t in ipairs(STORE_TABLES) do
    sql[#sql + 1] = ("DELETE FROM %s.%s; INSERT INTO %s.%s SELECT * FROM %s.%s;")
      :format(schema_of(dir), t, schema_of(dir), t, schema_of(backup), t)
  end
  sql[#sql + 1] = "COMMIT;"
  support.psql(table.concat(sql, " "))
end

-- Under EBB_TEST_STORE=postgres, ebb.core's open gets that store for its data
-- directory unless the spec names one.
if support.store_kind == "postgres" then
  local ok, core = pcall(require, "ebb.core")
  if ok and not core.sqlite_open then
    core.sqlite_open = core.open
    core.open = function(opts)
      if type(opts) == "table" and opts.store == nil and type(opts.data) == "string" then
        opts.store = support.store_for(opts.data)
      end
      return core.sqlite_open(opts)
    end
  end
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

-- `ebb` arguments (a list of strings) with the store of their --data
-- directory added: under EBB_TEST_STORE=postgres every ebb a spec starts
-- opens the same store as ebb.core for the same data directory. The list
-- itself when there is nothing to add.
function support.store_args(args)
  if support.store_kind == "sqlite" then return args end
  local data, store
  for i, a in ipairs(args) do
    if args[i - 1] == "--data" then data = a end
    if a == "--store" then store = true end
  end
  if data == nil or store then return args end
  return { "--store", support.store_for(data), table.unpack(args) }
end

-- Runs `ebb args...` (a list of strings); returns stdout, stderr, exit code.
-- opts: stdin (text), cwd, env ("VAR=value ..." before the command), timeout (seconds).
function support.run(args, opts)
  opts = opts or {}
  args = support.store_args(args)
  local parts = { sh_quote(support.ebb) }
  if opts.timeout then table.insert(parts, 1, "timeout " .. opts.timeout) end
  if opts.env then table.insert(parts, 1, opts.env) end
  for _, a in ipairs(args) do parts[#parts + 1] = sh_quote(a) end
  local errfile = os.tmpname()
  local cmd = table.concat(parts, " ")
  local infile
  if opts.stdin then
    infile = os.tmpname()
    support.write(infile, opts.stdin)
    cmd = cmd .. " < " .. sh_quote(infile)
  end
  if opts.cwd then cmd = "cd " .. sh_quote(opts.cwd) .. " && " .. cmd end
  local p = assert(io.popen(cmd .. " 2> " .. sh_quote(errfile), "r"))
  local out = p:read("a")
  local _, _, code = p:close()
  local err = support.read(errfile)
  os.remove(errfile)
  if infile then os.remove(infile) end
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
    return support.run(args, opts)
  end
end

-- Splits NDJSON output into decoded objects.
function support.lines(text, decode)
  local list = {}
  for line in text:gmatch("[^\n]+") do list[#list + 1] = decode(line) end
  return list
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

-- Calls fn until it returns a true value, and returns that. Waits at least
-- three minutes (seconds raises it): a loaded machine is slow (a 2-core box at
-- a load average of 10 took over a minute to catch a projection up), and
-- waiting longer only delays a failure, never causes one.
function support.eventually(fn, seconds, what)
  local socket = require "socket"
  local deadline = os.time() + math.max(seconds or 180, 180)
  while true do
    local v = fn()
    if v then return v end
    assert(os.time() <= deadline, "timed out waiting for " .. (what or "a condition"))
    socket.sleep(0.02)
  end
end

return support
