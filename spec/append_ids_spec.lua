-- One append of many events checks its event ids for duplicates with a hash
-- set, not pairwise (80,000 events once held the writer for 15 s): the
-- duplicate at the very end is still found, and unique ids pass.
local core = require "ebb.core"
local support = require "support"

describe("the duplicate-id check of one large append", function()
  local dir, rt
  before_each(function()
    dir = support.tmpdir()
    rt = assert(core.open { data = dir, aggregates = support.root .. "/aggregates", durability = "normal" })
  end)
  after_each(function()
    rt:close()
    support.rmdir(dir)
  end)

  local N = 80000
  local function events(dup_at_end)
    local list = {}
    for i = 1, N do list[i] = { type = "Tick", id = ("id-%06d"):format(i), data = {} } end
    if dup_at_end then list[N].id = "id-000017" end
    return list
  end

  it("refuses an append of 80,000 events whose last id repeats an earlier one", function()
    local r, msg, code = rt:append("Clock-1", "any", events(true))
    assert.is_nil(r)
    assert.equal("bad_request", code)
    assert.equal("event id id-000017 appears twice in one append", msg)
    assert.equal(0, rt:head())
  end)

  it("stores an append of 80,000 events with unique ids", function()
    local r = assert(rt:append("Clock-1", "any", events(false)))
    assert.equal(N, r.version)
    assert.equal(N, rt:head())
  end)
end)
