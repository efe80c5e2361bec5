-- The daemon's write path and its store file: new stores get 1 KB pages
-- (each event rewrites one page of the (stream, version) index at a place
-- of its own, so smaller pages mean fewer bytes written per event), an older
-- store keeps the page size it has, and the writer, whose commits do not
-- checkpoint, copies the WAL into the database itself once it is idle.
local support = require "support"
local daemon = require "daemon_support"

-- SQLite only (scripts/test lists the exclusions): events.db's pages and WAL.
if support.store_kind ~= "sqlite" then
  pending("the daemon's store file: SQLite's events.db (page size, WAL checkpoints)")
  return
end
local socket = require "socket"

local function start(opts)
  local d = daemon.start(opts)
  assert(d.url, "the daemon did not start: " .. daemon.logs(d))
  return d
end

-- The page size in the database header (bytes 16-17, big-endian).
local function page_size(path)
  local f = assert(io.open(path, "rb"))
  local head = f:read(18)
  f:close()
  return head:byte(17) * 256 + head:byte(18)
end

local function file_size(path)
  local f = io.open(path, "rb")
  if f == nil then return 0 end
  local n = f:seek("end")
  f:close()
  return n
end

-- Opens n accounts over 8 connections; every answer must be a 200.
local function open_accounts(d, n, prefix)
  local sent, ok = 0, 0
  daemon.load(d, 8, function()
    if sent == n then return nil end
    sent = sent + 1
    return { aggregate = "bank_account", id = prefix .. sent, type = "OpenAccount",
             data = { owner = "writepath" } }
  end, function(_, status)
    assert.are.equal(200, status)
    ok = ok + 1
  end)
  assert.are.equal(n, ok)
end

describe("the daemon's store file", function()
  local d
  after_each(function()
    if d then d:stop(); support.rmdir(d.data) end
    d = nil
  end)

  it("is created with 1 KB pages, and the writer checkpoints the WAL into it once idle", function()
    d = start { durability = "full" }
    local db = d.data .. "/events.db"
    assert.are.equal(1024, page_size(db))
    local before = file_size(db)
    open_accounts(d, 400, "acc-")
    -- 400 events are far below SQLite's own checkpoint (1000 pages): only
    -- the writer's idle checkpoint puts them into the database file.
    local deadline = socket.gettime() + 20
    while file_size(db) < before + 100 * 1024 and socket.gettime() < deadline do socket.sleep(0.05) end
    assert.is_true(file_size(db) >= before + 100 * 1024,
                   "events.db did not grow: " .. before .. " -> " .. file_size(db) .. " bytes")
    local status, page = d:get("/events?limit=1000")
    assert.are.equal(200, status)
    assert.are.equal(400, #page.events)
  end)

  it("keeps the page size of a store made before, and takes commands on it", function()
    local data = support.tmpdir()
    local p = assert(io.popen("sqlite3 " .. support.quote(data .. "/events.db")
      .. " 'PRAGMA page_size = 4096; PRAGMA journal_mode = WAL; CREATE TABLE t (x);"
      .. " DROP TABLE t;' 2>&1"))
    local out = p:read("a")
    assert.is_true(p:close(), out)
    d = start { data = data, durability = "full" }
    open_accounts(d, 50, "old-")
    d:stop()
    assert.are.equal(4096, page_size(data .. "/events.db"))
    d = start { data = data }
    local status, page = d:get("/events?limit=100")
    assert.are.equal(200, status)
    assert.are.equal(50, #page.events)
  end)
end)
