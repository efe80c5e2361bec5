-- Snapshots: taken every N events, loaded instead of a full replay and equal
-- to it (checked over random command sequences), valid only for the code that
-- made them, used by state-in-time queries, listed and deleted.
local core = require "ebb.core"
local support = require "support"

-- A test aggregate whose state has every kind of value a snapshot must keep:
-- integers and floats, nested and empty tables, arrays with holes, booleans,
-- a shared subtable. Its Digest command rejects with a rendering of the state
-- (types included), so two runtimes' states can be compared exactly.
local LEDGER = [[
local ebb = require "ebb"
local ledger = { type = "Ledger", snapshot_every = SNAPSHOT_EVERY }
SNAPSHOT_VERSION
function ledger.initial()
  local shared = { tag = "shared" }
  return { n = 0, sum = 0, avg = 0.0, flags = {}, holes = {}, empty = {}, list = ebb.array(),
           nested = { a = { b = { c = true } } }, left = shared, right = shared }
end
ledger.apply = {
  Added = function(s, e)
    s.n = s.n + 1
    s.sum = s.sum + e.data.amount * FACTOR
    s.avg = s.sum / s.n
    s.flags[e.data.key] = (e.data.amount % 2 == 0)
    s.holes[e.data.slot] = e.data.amount
    s.list[#s.list + 1] = e.data.amount
    s.left.count = (s.left.count or 0) + 1
    return s
  end,
  Cleared = function(s) s.holes = {}; s.list = ebb.array(); return s end,
}
local function render(v, seen)
  if type(v) == "number" then return math.type(v) .. ":" .. string.format("%.17g", v) end
  if type(v) ~= "table" then return type(v) .. ":" .. tostring(v) end
  if seen[v] then return "@" .. seen[v] end
  seen.n = (seen.n or 0) + 1
  seen[v] = seen.n
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(x, y) return render(x, {}) < render(y, {}) end)
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = render(k, {}) .. "=" .. render(v[k], seen) end
  local mt = getmetatable(v)
  return (mt and mt.__jsontype or "") .. "{" .. table.concat(parts, ",") .. "}"
end
ledger.handle = {
  Add = function(_, c) return { { type = "Added", data = c.data } } end,
  Clear = function() return { { type = "Cleared" } } end,
  Digest = function(s) ebb.reject("digest", { digest = render(s, {}) }) end,
}
return ledger
]]

local function ledger_source(opts)
  return (LEDGER:gsub("SNAPSHOT_EVERY", tostring(opts.every or 10))
                :gsub("SNAPSHOT_VERSION", opts.snapshot_version
                  and ("ledger.snapshot_version = " .. opts.snapshot_version) or "")
                :gsub("FACTOR", tostring(opts.factor or 1)))
end

describe("snapshots", function()
  local dir, aggs, rt

  local function open(extra)
    local o = { data = dir, aggregates = aggs, durability = "normal" }
    for k, v in pairs(extra or {}) do o[k] = v end
    return assert(core.open(o))
  end

  local function write_module(opts)
    support.write(aggs .. "/ledger.lua", ledger_source(opts or {}))
  end

  local function add(r, id, amount, slot)
    return assert(r:send { aggregate = "Ledger", id = id, type = "Add",
                           data = { amount = amount, key = "k" .. (amount % 7), slot = slot } })
  end

  local function digest(r, id)
    local _, _, code, info = r:send { aggregate = "Ledger", id = id, type = "Digest" }
    assert.equal("rejected", code)
    return info.details.digest
  end

  before_each(function()
    dir = support.tmpdir()
    aggs = support.tmpdir()
    write_module()
    rt = open()
  end)
  after_each(function()
    rt:close()
    support.rmdir(dir)
    support.rmdir(aggs)
  end)

  it("are taken every N events, after the commit", function()
    for i = 1, 25 do add(rt, "l-1", i, i) end
    assert(rt:flush())
    local list = rt:snapshots()
    assert.same({ 10, 20 }, { list[1].version, list[2].version })
    for _, s in ipairs(list) do
      assert.equal("Ledger-l-1", s.stream)
      assert.is_true(s.current)
      assert.is_true(s.bytes > 0)
      assert.equal(s.version, s.position)
    end
  end)

  it("are used before they are written, so a cold runtime folds each event once", function()
    rt:close()
    rt = open { cache_size = -1 }
    for i = 1, 25 do add(rt, "l-1", i, i) end
    local s = assert(rt:state("Ledger", "l-1"))
    assert.same({ 25, 20 }, { s.version, s.snapshot_version })
    assert.same({ 10, 20 }, (function()
      assert(rt:flush())
      local versions = {}
      for _, snap in ipairs(rt:snapshots()) do versions[#versions + 1] = snap.version end
      return versions
    end)())
  end)

  it("are loaded instead of a full replay, which they equal", function()
    for i = 1, 25 do add(rt, "l-1", i, i) end
    rt:close()
    rt = open { cache_size = -1 }
    local s = assert(rt:state("Ledger", "l-1"))
    assert.same({ 25, 20 }, { s.version, s.snapshot_version })
    local replay = open { snapshots = false, cache_size = -1 }
    local r = assert(replay:state("Ledger", "l-1"))
    assert.equal(0, r.snapshot_version)
    assert.equal(digest(replay, "l-1"), digest(rt, "l-1"))
    replay:close()
  end)

  it("equal a full replay over many random command sequences", function()
    local seed = os.time()
    math.randomseed(seed)
    for round = 1, 12 do
      local id = "r-" .. round
      for _ = 1, math.random(1, 60) do
        if math.random() < 0.1 then
          assert(rt:send { aggregate = "Ledger", id = id, type = "Clear" })
        else
          add(rt, id, math.random(-1000, 1000), math.random(1, 40))
        end
      end
    end
    rt:close()
    rt = open { cache_size = -1 }
    local replay = open { snapshots = false, cache_size = -1 }
    for round = 1, 12 do
      local id = "r-" .. round
      assert.equal(digest(replay, id), digest(rt, id), "seed " .. seed .. ", stream " .. id)
    end
    replay:close()
  end)

  it("are ignored and replaced once the module changes", function()
    for i = 1, 12 do add(rt, "l-1", i, i) end
    rt:close()
    write_module { factor = 2 } -- the same events now fold differently
    rt = open { cache_size = -1 }
    local s = assert(rt:state("Ledger", "l-1"))
    assert.same({ 0, 156 }, { s.snapshot_version, s.state.sum })
    assert(rt:flush())
    local current, stale = 0, 0
    for _, snap in ipairs(rt:snapshots()) do
      if snap.current then current = current + 1 else stale = stale + 1 end
    end
    assert.same({ 1, 1 }, { current, stale })
    assert.equal(1, rt:delete_snapshots { stale = true })
    assert.equal(1, #rt:snapshots())
    assert.equal(12, assert(rt:state("Ledger", "l-1")).snapshot_version)
  end)

  it("are ignored when a helper module beside the aggregate changes", function()
    for i = 1, 10 do add(rt, "l-1", i, i) end
    rt:close()
    support.write(aggs .. "/ledger_helpers.lua", "return { version = 2 }\n")
    rt = open { cache_size = -1 }
    assert.equal(0, assert(rt:state("Ledger", "l-1")).snapshot_version)
  end)

  it("are ignored when a helper in a subdirectory changes", function()
    assert(os.execute("mkdir -p " .. support.quote(aggs .. "/lib")))
    support.write(aggs .. "/lib/weights.lua", "return { weight = 1 }\n")
    rt:close()
    rt = open()
    for i = 1, 10 do add(rt, "l-1", i, i) end
    rt:close()
    rt = open { cache_size = -1 }
    assert.equal(10, assert(rt:state("Ledger", "l-1")).snapshot_version)
    rt:close()
    support.write(aggs .. "/lib/weights.lua", "return { weight = 100 }\n")
    rt = open { cache_size = -1 }
    assert.equal(0, assert(rt:state("Ledger", "l-1")).snapshot_version)
  end)

  it("follow a declared snapshot_version instead of the code", function()
    rt:close()
    write_module { snapshot_version = 1 }
    rt = open()
    for i = 1, 10 do add(rt, "l-1", i, i) end
    rt:close()
    write_module { snapshot_version = 1, factor = 1 } -- same version: still valid
    support.write(aggs .. "/ledger_helpers.lua", "return {}\n")
    rt = open { cache_size = -1 }
    assert.equal(10, assert(rt:state("Ledger", "l-1")).snapshot_version)
    rt:close()
    write_module { snapshot_version = 2 }
    rt = open { cache_size = -1 }
    assert.equal(0, assert(rt:state("Ledger", "l-1")).snapshot_version)
  end)

  it("serve state-in-time queries from a snapshot at or below the point", function()
    for i = 1, 25 do add(rt, "l-1", i, i) end
    assert(rt:flush())
    local at15 = assert(rt:state("Ledger", "l-1", { version = 15 }))
    assert.same({ 15, 10, 120 }, { at15.version, at15.snapshot_version, at15.state.sum })
    local at5 = assert(rt:state("Ledger", "l-1", { version = 5 }))
    assert.same({ 5, 0, 15 }, { at5.version, at5.snapshot_version, at5.state.sum })
    local replay = open { snapshots = false, cache_size = -1 }
    assert.same(replay:state("Ledger", "l-1", { version = 15 }).state, at15.state)
    replay:close()
  end)

  it("are listed and deleted from the CLI", function()
    for i = 1, 20 do add(rt, "l-1", i, i) end
    for i = 1, 10 do add(rt, "l-2", i, i) end
    rt:close()
    local ebb = support.cli(dir, aggs)
    local out, err, code = ebb("snapshots")
    assert.equal(0, code, err)
    local list = support.lines(out, core.json_decode)
    assert.equal(3, #list)
    out = ebb("snapshots", "delete", "Ledger-l-1")
    assert.same({ deleted = 2 }, core.json_decode(out))
    assert.equal(1, #support.lines((ebb("snapshots")), core.json_decode))
    local _, err2, code2 = ebb("snapshots", "purge")
    assert.equal(2, code2)
    assert.matches("only delete", err2)
    rt = open()
  end)
end)
