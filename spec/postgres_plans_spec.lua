-- The PostgreSQL store's statements keep using their indexes as the store
-- grows (EBB_TEST_STORE=postgres only). Its connections prepare every
-- statement once; PostgreSQL then caches a generic plan chosen while the
-- tables were small, where a sequential scan is cheapest, and keeps it until
-- the next ANALYZE. A fresh store's appends then read the whole events table
-- each, and slowed down as it grew (a benchmark on a new cluster fell from
-- 2,500 to 650 appends/s within 30,000 events).
local core = require "ebb.core"
local support = require "support"

if support.store_kind ~= "postgres" then return end

local function psql(uri, sql)
  local p = assert(io.popen("env -u LD_PRELOAD psql -q -X -At -v ON_ERROR_STOP=1 " ..
    support.quote(uri) .. " -c " .. support.quote(sql)))
  local out = p:read("a")
  p:close()
  return out
end

-- The server publishes a backend's table statistics when it goes idle, but
-- may hold them back for up to 10 s (PostgreSQL 15's idle interval): wait
-- until the counts have not moved for longer than that. The events table's
-- sequential scans, and the rows read from it by any scan, sequential or of
-- an index (a whole index read in order is no sequential scan).
local function events_read(uri)
  local sql = "SELECT s.seq_scan || ' ' || s.seq_tup_read + (SELECT coalesce(sum(i.idx_tup_read), 0) " ..
    "FROM pg_stat_user_indexes i WHERE i.relid = s.relid) FROM pg_stat_user_tables s " ..
    "WHERE s.relid = 'events'::regclass"
  local last, since = nil, os.time()
  while true do
    local now = psql(uri, sql)
    if now ~= last then last, since = now, os.time() end
    if os.time() - since >= 12 then
      local scans, rows = last:match("^(%d+) (%d+)")
      return tonumber(scans), tonumber(rows)
    end
    os.execute("sleep 0.5")
  end
end

describe("the PostgreSQL store's plans", function()
  it("an append reads no whole table once the store has grown", function()
    local dir = support.tmpdir()
    local uri = support.store_for(dir)
    local rt = assert(core.open { data = dir, aggregates = support.root .. "/aggregates", durability = "normal" })
    local function append(stream)
      assert(rt:append(stream, "no_stream", { { type = "Opened", data = { n = 1 } } }))
    end
    -- The first appends, on a nearly empty table, are where a generic plan is chosen.
    for i = 1, 10 do append("Early-" .. i) end
    for i = 1, 2000 do append("Grow-" .. i) end
    local scans_before, rows_before = events_read(uri)
    for i = 1, 200 do append("Late-" .. i) end
    -- A plan cached while the table was empty scans it on (nearly) every
    -- append; a few scans from the first appends may still be published late.
    local scans_after, rows_after = events_read(uri)
    local scans, rows = scans_after - scans_before, rows_after - rows_before
    assert.is_true(scans < 50, ("200 appends on a store of 2,000 events scanned the events table %d times")
      :format(scans))
    -- An append reads a few rows: its streams' last versions, its ids, the
    -- head. One that read them all (once, a head read joined to the table
    -- by mistake) read 400,000 here.
    assert.is_true(rows < 20000, ("200 appends on a store of 2,000 events read %d of its rows"):format(rows))
    rt:close()
    support.rmdir(dir)
  end)
end)
