-- Export and import accept exactly the same event data: the deepest data
-- the encoder writes (256 levels) goes in by an append, out by export, back
-- in by import and out again byte for byte; one level more is refused on
-- the way in with a clear error (an export line wraps data in one more
-- level, an append body in three: documents may, data may not).
local support = require "support"
local daemon = require "daemon_support"

-- JSON text of an object nested `levels` deep ({} is 1).
local function nested(levels)
  return string.rep('{"a":', levels - 1) .. "{}" .. string.rep("}", levels - 1)
end

local function body(data)
  return '{"events":[{"type":"Deep","data":' .. data .. "}]}"
end

describe("event data at the maximum depth", function()
  local data, copy, d
  before_each(function() data, copy = support.tmpdir(), support.tmpdir() end)
  after_each(function()
    if d then d:stop() end
    d = nil
    support.rmdir(data)
    support.rmdir(copy)
  end)

  it("goes in, out by export, back in by import and out again unchanged; one more is refused", function()
    d = daemon.start({ data = data })
    assert.are.equal(200, (d:post("/streams/Deep-1", body(nested(256)))))
    local st, answer = d:post("/streams/Deep-2", body(nested(257)))
    assert.are.equal(400, st)
    assert.are.equal("bad_request", answer.error.code)
    assert.matches("nesting deeper than 259 %(256 for a value, inside 3 of envelope%)", answer.error.message)
    st = d:post("/commands", '{"aggregate":"order","id":"x","type":"CreateOrder","data":' ..
      nested(257) .. "}")
    assert.are.equal(400, st)
    -- Read back through the daemon by the CLI (its answers wrap the data three deep).
    local out, err, code = support.run { "read", "Deep-1", "--url", d.url }
    assert.are.equal(0, code, err)
    assert.truthy(out:find(nested(256), 1, true))
    d:stop()
    d = nil
    local export, eerr, ecode = support.cli(data)("export")
    assert.are.equal(0, ecode, eerr)
    assert.truthy(export:find(nested(256), 1, true))
    local file = copy .. "/backup.ndjson"
    support.write(file, export)
    out, err, code = support.cli(copy)("import", file)
    assert.are.equal(0, code, err)
    assert.matches('"imported":1', out)
    assert.are.equal(export, (support.cli(copy)("export")))
    -- An import line with data one level deeper is refused, naming the line.
    local deeper = export:gsub('"data":' .. nested(256):gsub("%p", "%%%0"), function()
      return '"data":' .. nested(257)
    end)
    assert.are_not.equal(export, deeper)
    support.write(file, deeper)
    local again = support.tmpdir()
    local _, ierr, icode = support.cli(again)("import", file)
    assert.are_not.equal(0, icode)
    assert.matches("line 1 .*nesting deeper than 256", ierr)
    support.rmdir(again)
  end)
end)
