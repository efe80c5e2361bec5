-- json_spec.lua: the JSON codec seen from Lua (core.json_encode, core.json_decode,
-- core.null, core.array). It must keep int64 exact, keep floats floats, be strict
-- about UTF-8 and the grammar, and refuse Lua values JSON cannot hold, naming where.

local core = require "ebb.core"
local cjson = require "cjson"

local encode, decode, null = core.json_encode, core.json_decode, core.null

-- decode that must succeed
local function dec(s)
  local v, err = decode(s)
  assert(err == nil, "unexpected decode error: " .. tostring(err))
  return v
end

-- encode that must succeed
local function enc(v)
  local s, err = encode(v)
  assert(s ~= nil, "unexpected encode error: " .. tostring(err))
  return s
end

-- decode that must fail, with `fragment` in the message
local function decode_fails(s, fragment)
  local v, err = decode(s)
  assert.is_nil(v, "decode(" .. string.format("%q", s) .. ") should fail")
  assert.is_string(err)
  assert.truthy(err:find("invalid JSON", 1, true), err)
  if fragment then assert.truthy(err:find(fragment, 1, true), "message was: " .. err) end
  return err
end

-- encode that must fail, with `fragment` in the message
local function encode_fails(v, fragment)
  local s, err = encode(v)
  assert.is_nil(s)
  assert.is_string(err)
  assert.truthy(err:find("cannot encode", 1, true), err)
  if fragment then assert.truthy(err:find(fragment, 1, true), "message was: " .. err) end
  return err
end

local function is_array(t)
  local mt = getmetatable(t)
  return mt ~= nil and mt.__jsontype == "array"
end

-- Structural equality that sees integer vs float, array vs object and null.
local function same(a, b, path)
  path = path or "value"
  if type(a) ~= type(b) then return false, path .. ": " .. type(a) .. " vs " .. type(b) end
  if type(a) == "number" then
    if math.type(a) ~= math.type(b) then return false, path .. ": " .. math.type(a) .. " vs " .. math.type(b) end
    if a ~= b and not (a ~= a and b ~= b) then return false, path .. ": " .. tostring(a) .. " vs " .. tostring(b) end
    return true
  end
  if type(a) ~= "table" then
    if a ~= b then return false, path .. ": " .. tostring(a) .. " vs " .. tostring(b) end
    return true
  end
  for k, v in pairs(a) do
    local ok, why = same(v, b[k], path .. "[" .. tostring(k) .. "]")
    if not ok then return false, why end
  end
  for k in pairs(b) do
    if a[k] == nil then return false, path .. ": extra key " .. tostring(k) end
  end
  return true
end

local function assert_same(a, b)
  local ok, why = same(a, b)
  assert(ok, why)
end

-- ---------------------------------------------------------------------------

describe("json integers", function()
  it("decodes small integers as Lua integers", function()
    for _, case in ipairs { { "0", 0 }, { "-1", -1 }, { "1", 1 }, { "42", 42 }, { "-0", 0 } } do
      local v = dec(case[1])
      assert.are.equal(case[2], v)
      assert.are.equal("integer", math.type(v))
    end
  end)

  it("keeps 2^53 + 1 exact both ways", function()
    local v = dec("9007199254740993")
    assert.are.equal("integer", math.type(v))
    assert.are.equal(9007199254740993, v)
    assert.are_not.equal(9007199254740992, v)
    assert.are.equal("9007199254740993", enc(9007199254740993))
    assert.are.equal("-9007199254740993", enc(-9007199254740993))
  end)

  it("decodes the int64 extremes exactly", function()
    local max = dec("9223372036854775807")
    local min = dec("-9223372036854775808")
    assert.are.equal(math.maxinteger, max)
    assert.are.equal(math.mininteger, min)
    assert.are.equal("integer", math.type(max))
    assert.are.equal("integer", math.type(min))
  end)

  it("encodes the int64 extremes exactly", function()
    assert.are.equal("9223372036854775807", enc(math.maxinteger))
    assert.are.equal("-9223372036854775808", enc(math.mininteger))
    assert.are.equal("[9223372036854775807,-9223372036854775808]", enc(core.array { math.maxinteger, math.mininteger }))
  end)

  it("round-trips a spread of integers", function()
    local values = { 0, 1, -1, 9, 10, 99, 100, -100, 2 ^ 31 | 0, -(2 ^ 31 | 0), 4294967296, 1 << 53, (1 << 53) + 1,
      -(1 << 53) - 1, 1 << 62, math.maxinteger - 1, math.mininteger + 1, 1234567890123456789 }
    for _, n in ipairs(values) do
      local s = enc(n)
      assert.are.equal(string.format("%d", n), s)
      local back = dec(s)
      assert.are.equal("integer", math.type(back))
      assert.are.equal(n, back)
    end
  end)

  it("turns integer literals beyond int64 into floats", function()
    local above = dec("9223372036854775808")
    assert.are.equal("float", math.type(above))
    assert.are.equal(2.0 ^ 63, above)
    local below = dec("-9223372036854775809")
    assert.are.equal("float", math.type(below))
    assert.are.equal(-(2.0 ^ 63), below)
    local huge = dec("123456789012345678901234567890")
    assert.are.equal("float", math.type(huge))
    assert.are.equal(1.2345678901234568e29, huge)
  end)

  it("treats a fraction or an exponent as a float even when integral", function()
    for _, s in ipairs { "1.0", "10.0", "1e2", "1E2", "1e+2", "100e-2", "-0.0", "0e0" } do
      assert.are.equal("float", math.type(dec(s)), s)
    end
    assert.are.equal(100.0, dec("1e2"))
    assert.are.equal(1.0, dec("100e-2"))
  end)

  it("keeps integers inside arrays and objects exact", function()
    local v = dec('{"id":9223372036854775807,"list":[-9223372036854775808,9007199254740993]}')
    assert.are.equal(math.maxinteger, v.id)
    assert.are.equal(math.mininteger, v.list[1])
    assert.are.equal(9007199254740993, v.list[2])
    assert.are.equal("integer", math.type(v.list[2]))
  end)
end)

describe("json floats", function()
  it("round-trips floats exactly and keeps them floats", function()
    local values = { 0.1, 0.2, 0.3, 1e300, -1e300, -2.5, 1.0, -1.0, 0.0, 1 / 3, math.pi, 2 ^ 53, 2 ^ 63, 2 ^ 64,
      1.7976931348623157e308, 2.2250738585072014e-308, 5e-324, 123456.789, 1e15, 1e16, 1e17, 1e21, 1e-7, 0.5 }
    for _, x in ipairs(values) do
      local s = enc(x)
      local back = dec(s)
      assert.are.equal("float", math.type(back), s)
      assert.are.equal(x, back, s)
    end
  end)

  it("writes familiar floats in their short form", function()
    assert.are.equal("0.1", enc(0.1))
    assert.are.equal("-2.5", enc(-2.5))
    assert.are.equal("1e+300", enc(1e300))
    assert.are.equal("0.3333333333333333", enc(1 / 3))
  end)

  it("writes integral floats so they read back as floats", function()
    assert.are.equal("1.0", enc(1.0))
    assert.are.equal("-3.0", enc(-3.0))
    assert.are.equal("0.0", enc(0.0))
    assert.are.equal("9007199254740992.0", enc(2.0 ^ 53))
    local back = dec(enc(1.0))
    assert.are.equal("float", math.type(back))
  end)

  it("keeps the sign of negative zero", function()
    local back = dec(enc(-0.0))
    assert.are.equal("float", math.type(back))
    assert.are.equal(-math.huge, 1 / back)
  end)

  it("writes the shortest of %.15g, %.16g, %.17g that reads back", function()
    local function expected(x)
      local text
      for prec = 15, 17 do
        text = string.format("%." .. prec .. "g", x)
        if tonumber(text) == x then break end
      end
      if not text:find("[.e]") then text = text .. ".0" end
      return text
    end
    math.randomseed(20240601)
    local checked = 0
    for _ = 1, 20000 do
      local x
      local kind = math.random(4)
      if kind == 1 then
        x = math.random(-10 ^ 7, 10 ^ 7) / 10 ^ math.random(0, 8)   -- short decimals
      elseif kind == 2 then
        x = (math.random() - 0.5) * 10 ^ math.random(-30, 30)       -- full precision
      elseif kind == 3 then
        x = math.random(-2 ^ 52, 2 ^ 52) * 2.0 ^ math.random(-60, 20) -- binary fractions
      else
        x = string.unpack("d", string.pack("i8", math.random(math.mininteger, math.maxinteger)))
      end
      if x == x and x ~= math.huge and x ~= -math.huge then
        local text = enc(x)
        assert.are.equal(expected(x), text)
        local back = dec(text)
        assert.are.equal(x, back)
        assert.are.equal("float", math.type(back))
        checked = checked + 1
      end
    end
    assert.is_true(checked > 19000)
  end)

  it("reads number literals as Lua's own conversion does", function()
    math.randomseed(7)
    for _ = 1, 20000 do
      local int = tostring(math.random(0, 10 ^ math.random(0, 9)))
      local frac = math.random(2) == 1 and ("." .. tostring(math.random(0, 10 ^ math.random(0, 12)))) or ""
      local exp = math.random(3) == 1 and ("e" .. math.random(-330, 330)) or ""
      local sign = math.random(2) == 1 and "-" or ""
      local text = sign .. int .. frac .. exp
      local want = tonumber(text)
      if frac == "" and exp == "" then
        assert.are.equal("integer", math.type(dec(text)), text)
      end
      if want == math.huge or want == -math.huge then
        decode_fails(text, "out of range")
      else
        assert.are.equal(want, dec(text), text)
        if want == 0 and (frac ~= "" or exp ~= "") then
          assert.are.equal(1 / want, 1 / dec(text), text) -- same signed zero
        end
      end
    end
  end)

  it("refuses NaN and infinities when encoding", function()
    encode_fails(0 / 0, "NaN")
    encode_fails(math.huge, "infinity")
    encode_fails(-math.huge, "-infinity")
    encode_fails({ x = { 1, 0 / 0 } }, "data.x[2]: NaN")
  end)

  it("refuses number literals beyond double range", function()
    decode_fails("1e400", "out of range")
    decode_fails("-1e400", "out of range")
    decode_fails("[" .. string.rep("9", 400) .. "]", "out of range")
  end)

  it("underflows tiny literals to zero and reads long literals correctly", function()
    assert.are.equal(0.0, dec("1e-400"))
    assert.are.equal(0.1, dec("0." .. string.rep("0", 299) .. "1e299"))
    assert.are.equal(1.0, dec("1." .. string.rep("0", 500)))
  end)

  it("reads decimal literals independently of the C locale", function()
    -- Under a locale whose decimal point is ',' when one is installed (e.g. built
    -- with localedef and found through LOCPATH); under "C" otherwise.
    local old = os.setlocale(nil, "numeric")
    local _ = os.setlocale("de_DE.UTF-8", "numeric") or os.setlocale("fr_FR.UTF-8", "numeric")
    local ok, err = pcall(function()
      assert.are.equal(1.5, dec("1.5"))
      assert.are.equal(-0.25, dec("-0.25e0"))
      assert.are.equal("1.5", enc(1.5))
      assert.are.equal("[0.1,2.0]", enc(core.array { 0.1, 2.0 }))
    end)
    os.setlocale(old, "numeric")
    assert(ok, err)
  end)
end)

describe("json strings", function()
  it("decodes every simple escape", function()
    assert.are.equal("\"\\/\b\f\n\r\t", dec([["\"\\\/\b\f\n\r\t"]]))
  end)

  it("decodes \\u escapes to UTF-8", function()
    assert.are.equal("A", dec([["\u0041"]]))
    assert.are.equal("é", dec([["\u00e9"]]))
    assert.are.equal("€", dec([["\u20AC"]]))
    assert.are.equal("\u{FFFF}", dec([["\uffff"]]))
  end)

  it("decodes surrogate pairs to one 4-byte character", function()
    assert.are.equal("\xF0\x9F\x98\x80", dec([["\ud83d\ude00"]]))
    assert.are.equal("\u{10FFFF}", dec([["\uDBFF\uDFFF"]]))
    assert.are.equal("a\u{10000}b", dec([["a\uD800\uDC00b"]]))
  end)

  it("decodes \\u0000 into a string holding a NUL byte", function()
    local s = dec([["a\u0000b"]])
    assert.are.equal(3, #s)
    assert.are.equal("a\0b", s)
  end)

  it("encodes NUL and control characters as escapes and round-trips them", function()
    assert.are.equal([["a\u0000b"]], enc("a\0b"))
    assert.are.equal([["\"\\\n\r\t\b\f\u0001\u001f"]], enc("\"\\\n\r\t\b\f\1\31"))
    local all = {}
    for i = 0, 127 do all[#all + 1] = string.char(i) end
    local s = table.concat(all)
    local text = enc(s)
    assert.is_nil(text:find("[%z\1-\31]"))
    assert.are.equal(s, dec(text))
  end)

  it("passes valid multi-byte UTF-8 through unchanged", function()
    for _, s in ipairs { "é", "€", "😀", "\u{10FFFF}", "\u{80}", "\u{7FF}", "\u{800}", "\u{FFFD}", "日本語テキスト" } do
      assert.are.equal('"' .. s .. '"', enc(s))
      assert.are.equal(s, dec('"' .. s .. '"'))
    end
  end)

  it("refuses invalid UTF-8 when decoding", function()
    local bad = {
      "\xC0\x80",         -- overlong NUL
      "\xC1\xBF",         -- overlong
      "\xE0\x80\x80",     -- overlong 3-byte
      "\xE0\x9F\xBF",     -- overlong 3-byte (U+07FF)
      "\xF0\x80\x80\x80", -- overlong 4-byte
      "\xF0\x8F\xBF\xBF", -- overlong 4-byte (U+FFFF)
      "\xED\xA0\x80",     -- UTF-8-encoded surrogate U+D800
      "\xED\xBF\xBF",     -- UTF-8-encoded surrogate U+DFFF
      "\xF4\x90\x80\x80", -- U+110000
      "\xF5\x80\x80\x80", -- lead byte beyond the range
      "\xFF",
      "\x80",             -- stray continuation byte
      "a\xBFb",
      "\xE2\x82",         -- truncated
      "\xE2\x28\xA1",     -- bad continuation
      "\xF0\x9F\x98",     -- truncated 4-byte
    }
    for _, b in ipairs(bad) do
      decode_fails('"' .. b .. '"', "invalid UTF-8")
      decode_fails('{"' .. b .. '":1}', "invalid UTF-8")
    end
  end)

  it("refuses invalid UTF-8 when encoding, naming the path", function()
    encode_fails("\xFF", "cannot encode data: string is not valid UTF-8")
    encode_fails({ name = "ok\xC0\x80" }, "data.name: string is not valid UTF-8")
    encode_fails({ list = { "fine", "\xED\xA0\x80" } }, "data.list[2]: string is not valid UTF-8")
    encode_fails({ ["k\xF4\x90\x80\x80"] = 1 }, "key is not valid UTF-8")
  end)

  it("refuses lone surrogates in \\u escapes", function()
    decode_fails([["\ud800"]], "lone surrogate")
    decode_fails([["\udc00"]], "lone surrogate")
    decode_fails([["\udfff\ud800"]], "lone surrogate")
    decode_fails([["\ud800\u0041"]], "lone surrogate")
    decode_fails([["\ud800\ud800"]], "lone surrogate")
    decode_fails([["\ud800x"]], "lone surrogate")
    decode_fails([["x\ud83d"]], "lone surrogate")
  end)

  it("refuses bad escapes", function()
    decode_fails([["\x41"]], "invalid escape")
    decode_fails([["\U0041"]], "invalid escape")
    decode_fails([["\'"]], "invalid escape")
    decode_fails([["\u12G4"]], "invalid \\u escape")
    decode_fails([["\u12"]], "invalid \\u escape")
    decode_fails('"\\', "unterminated string")
  end)

  it("refuses raw control characters in strings but accepts DEL", function()
    for _, c in ipairs { "\0", "\1", "\t", "\n", "\r", "\31" } do
      decode_fails('"a' .. c .. 'b"', "control character in string")
    end
    assert.are.equal("a\127b", dec('"a\127b"'))
  end)

  it("decodes object keys with escapes", function()
    local v = dec([[{"a\nb":1,"\u00e9":2,"plain":3}]])
    assert.are.equal(1, v["a\nb"])
    assert.are.equal(2, v["é"])
    assert.are.equal(3, v.plain)
  end)
end)

describe("malformed JSON", function()
  local cases = {
    { "", "unexpected end of input" },
    { "   ", "unexpected end of input" },
    { "[1,2,]", "unexpected character ']'" },
    { '{"a":1,}', "expected a string key" },
    { "[1] x", "unexpected data after the value" },
    { "1 2", "unexpected data after the value" },
    { "{}{}", "unexpected data after the value" },
    { "nullx", "unexpected data after the value" },
    { "{a:1}", "expected a string key" },
    { "{'a':1}", "expected a string key" },
    { "'a'", "unexpected character" },
    { "01", "leading zero" },
    { "-01", "leading zero" },
    { "00", "leading zero" },
    { "1.", "invalid number" },
    { "1.e5", "invalid number" },
    { ".5", "unexpected character '.'" },
    { "+1", "unexpected character '+'" },
    { "-", "invalid number" },
    { "- 1", "invalid number" },
    { "1e", "invalid number" },
    { "1e+", "invalid number" },
    { "0x10", "unexpected data after the value" },
    { "NaN", "unexpected character 'N'" },
    { "-NaN", "invalid number" },
    { "Infinity", "unexpected character 'I'" },
    { "-Infinity", "invalid number" },
    { '"abc', "unterminated string" },
    { '["abc]', "unterminated string" },
    { '"a\tb"', "control character in string" },
    { "tru", "invalid literal" },
    { "True", "unexpected character 'T'" },
    { "nul", "invalid literal" },
    { "fals", "invalid literal" },
    { "[", "unexpected end of input" },
    { "[1", "expected ',' or ']'" },
    { "[1 2]", "expected ',' or ']'" },
    { "{", "unexpected end of input" },
    { "{1:2}", "expected a string key" },
    { '{"a"', "expected ':'" },
    { '{"a" 1}', "expected ':'" },
    { '{"a":}', "unexpected character '}'" },
    { '{"a":1 "b":2}', "expected ',' or '}'" },
    { '{"a":1', "expected ',' or '}'" },
    { "[,1]", "unexpected character ','" },
    { "]", "unexpected character ']'" },
    { "\xEF\xBB\xBF1", "unexpected byte 0xef" }, -- a byte order mark is not JSON
    { "\v1", "unexpected byte 0x0b" },
    { "\f1", "unexpected byte 0x0c" },
    { "/* c */ 1", "unexpected character '/'" },
    { "[1]\0", "unexpected data after the value" },
  }
  for _, case in ipairs(cases) do
    it(string.format("refuses %q", case[1]), function()
      decode_fails(case[1], case[2])
    end)
  end

  it("reports the byte offset of the problem", function()
    assert.are.equal("invalid JSON at byte 5: expected ':'", decode_fails('{"a" 1}'))
    assert.are.equal("invalid JSON at byte 7: unexpected data after the value", decode_fails('[1, 2] x'))
    assert.are.equal("invalid JSON at byte 0: unexpected end of input", decode_fails(""))
  end)

  it("allows surrounding JSON whitespace", function()
    assert.are.equal(1, dec(" \t\r\n1 \t\r\n"))
    assert_same({ a = 1 }, dec('\n{ "a" :\t1 }\n'))
    assert.are.equal(0, #dec(" [ ] "))
  end)
end)

describe("json arrays and objects", function()
  it("marks decoded arrays with one shared array metatable", function()
    local a, b = dec("[1,2]"), dec("[]")
    assert.is_true(is_array(a))
    assert.is_true(is_array(b))
    assert.are.equal(getmetatable(a), getmetatable(b))
    assert.are.equal(getmetatable(a), getmetatable(core.array()))
    assert.are.equal("array", getmetatable(a).__jsontype)
  end)

  it("decodes objects to plain tables without a metatable", function()
    assert.is_nil(getmetatable(dec('{"a":1}')))
    assert.is_nil(getmetatable(dec("{}")))
  end)

  it("keeps empty arrays and empty objects apart through decode and encode", function()
    assert.are.equal("[]", enc(dec("[]")))
    assert.are.equal("{}", enc(dec("{}")))
    assert.are.equal('[[],{},[{}]]', enc(dec('[[],{},[{}]]')))
    assert.are.equal('{"c":[[],{}]}', enc(dec('{"c":[[],{}]}')))
    local v = dec('{"a":[],"b":{}}')
    local again = dec(enc(v))
    assert.is_true(is_array(again.a))
    assert.is_false(is_array(again.b))
    assert.are.equal("[]", enc(again.a))
    assert.are.equal("{}", enc(again.b))
  end)

  it("encodes an unmarked empty table as an object", function()
    assert.are.equal("{}", enc({}))
  end)

  it("array() marks a new or given table", function()
    assert.are.equal("[]", enc(core.array()))
    local t = { 1, 2 }
    assert.are.equal(t, core.array(t))
    assert.are.equal("[1,2]", enc(t))
    assert.has_error(function() core.array("x") end)
  end)

  it("honours an object marker on an empty table", function()
    assert.are.equal("{}", enc(setmetatable({}, { __jsontype = "object" })))
    assert.are.equal('{"a":1}', enc(setmetatable({ a = 1 }, { __jsontype = "object" })))
    encode_fails(setmetatable({ 1 }, { __jsontype = "object" }), "data: object with a non-string key")
  end)

  it("requires keys 1..n of a marked array", function()
    encode_fails(core.array { 1, 2, x = 3 }, "data: array with a string key")
    encode_fails(core.array { [2] = 1 }, "data: sparse array")
    encode_fails(core.array { [0] = 1, 2 }, "data: sparse array")
  end)

  it("decodes null in arrays and objects to the null sentinel", function()
    local a = dec("[1,null,3,null]")
    assert.are.equal(4, #a)
    assert.are.equal(null, a[2])
    assert.are.equal(null, a[4])
    local o = dec('{"x":null}')
    assert.are.equal(null, o.x)
    assert.are.equal(null, dec("null"))
    assert.are.equal("userdata", type(null))
    assert.are.equal(cjson.null, null)
  end)

  it("encodes the null sentinel and nil as null", function()
    assert.are.equal("null", enc(null))
    assert.are.equal("[1,null,3]", enc(core.array { 1, null, 3 }))
    assert.are.equal('{"x":null}', enc({ x = null }))
    assert.are.equal("null", enc(nil))
    assert.are.equal("[null,null]", enc(dec("[null,null]")))
  end)

  it("encodes booleans", function()
    assert.are.equal("[true,false]", enc({ true, false }))
    assert.are.equal(true, dec("true"))
    assert.are.equal(false, dec("false"))
  end)

  it("lets the last of duplicate keys win", function()
    assert.are.equal(3, dec('{"a":1,"b":2,"a":3}').a)
  end)

  it("writes compact text with all the keys of an object", function()
    local t = { alpha = 1, beta = "two", gamma = { 1, 2 } }
    local s = enc(t)
    assert.is_nil(s:find("%s"))
    assert_same(t, dec(s))
    local back = dec(s)
    assert.are.equal(1, back.alpha)
    assert.are.equal("two", back.beta)
    assert.are.same({ 1, 2 }, setmetatable(back.gamma, nil))
  end)

  it("round-trips a nested document", function()
    local text = '{"id":"a1","n":9223372036854775807,"f":0.1,"ok":true,"none":null,"tags":["x","y"],' ..
        '"nested":{"list":[{"k":1},{"k":2.5}],"empty":[],"obj":{}}}'
    local v = dec(text)
    assert_same(v, dec(enc(v)))
    assert.are.equal(math.maxinteger, dec(enc(v)).n)
  end)

  it("leaves a table's own metatable alone when it has no marker", function()
    local t = setmetatable({ a = 1 }, { __index = function() return "x" end })
    assert.are.equal('{"a":1}', enc(t))
  end)

  it("does not call __pairs or __index while encoding", function()
    local calls = 0
    local t = setmetatable({ 1, 2 }, {
      __pairs = function() calls = calls + 1 return next, {}, nil end,
      __index = function() calls = calls + 1 return 99 end,
      __len = function() calls = calls + 1 return 5 end,
    })
    assert.are.equal("[1,2]", enc(t))
    assert.are.equal(0, calls)
  end)
end)

describe("json nesting limit", function()
  local function nested_arrays(n) return string.rep("[", n) .. string.rep("]", n) end
  local function nested_objects(n) return string.rep('{"a":', n) .. "1" .. string.rep("}", n) end
  local function nested_tables(n)
    local root = {}
    local cur = root
    for _ = 2, n do
      cur.a = {}
      cur = cur.a
    end
    return root
  end

  it("decodes 256 levels", function()
    local v = dec(nested_arrays(256))
    local depth = 0
    while v do
      depth = depth + 1
      v = v[1]
    end
    assert.are.equal(256, depth)
    assert.is_table(dec(nested_objects(256)))
  end)

  it("refuses 257 levels when decoding", function()
    decode_fails(nested_arrays(257), "nesting deeper than 256")
    decode_fails(nested_objects(257), "nesting deeper than 256")
    decode_fails(string.rep("[", 100000), "nesting deeper than 256")
  end)

  it("encodes 256 levels and refuses 257", function()
    local s = enc(nested_tables(256))
    assert.are.equal(256, select(2, s:gsub("{", "")))
    local err = encode_fails(nested_tables(257), "nesting deeper than 256")
    assert.truthy(err:find("^cannot encode data%.a%.a"))
  end)

  it("refuses a table that contains itself", function()
    local t = {}
    t.self = t
    encode_fails(t, "nesting deeper than 256")
  end)
end)

describe("json refusals name the path", function()
  it("refuses sparse arrays", function()
    encode_fails({ 1, nil, 3 }, "cannot encode data: sparse array")
    encode_fails({ [2] = "b" }, "data: sparse array")
    encode_fails({ [0] = "z", "a" }, "data: sparse array")
    encode_fails({ [-1] = "z" }, "data: sparse array")
    encode_fails({ items = { {}, {}, { [1] = 1, [3] = 3 } } }, "cannot encode data.items[3]: sparse array")
  end)

  it("refuses mixed integer and string keys", function()
    encode_fails({ 1, 2, x = 3 }, "cannot encode data: mixed integer and string keys")
    encode_fails({ a = { b = { [1] = true, c = 2 } } }, "data.a.b: mixed integer and string keys")
  end)

  it("refuses keys that are neither strings nor integers", function()
    encode_fails({ [1.5] = 1 }, "data: float key")
    encode_fails({ [true] = 1 }, "data: boolean key")
    encode_fails({ x = { [{}] = 1 } }, "data.x: table key")
  end)

  it("refuses functions, threads and full userdata", function()
    encode_fails(print, "cannot encode data: function")
    encode_fails({ x = function() end }, "cannot encode data.x: function")
    encode_fails({ co = coroutine.create(function() end) }, "data.co: thread")
    encode_fails({ f = io.stdout }, "data.f: userdata")
  end)

  it("names array indexes and unusual keys in the path", function()
    encode_fails({ a = { { b = 1 }, { b = print } } }, "cannot encode data.a[2].b: function")
    encode_fails({ ["a b"] = { ['q"'] = print } }, 'cannot encode data["a b"]["q\\""]: function')
    encode_fails({ ["1x"] = print }, 'cannot encode data["1x"]: function')
  end)

  it("returns nil and a message rather than raising, and raises on misuse", function()
    local s, err = encode({ f = print })
    assert.is_nil(s)
    assert.is_string(err)
    local v, derr = decode("[")
    assert.is_nil(v)
    assert.is_string(derr)
    assert.has_error(function() encode() end)
    assert.has_error(function() decode({}) end)
    assert.has_error(function() decode() end)
  end)

  it("is still usable after a refusal", function()
    encode_fails({ f = print })
    assert.are.equal('{"ok":true}', enc({ ok = true }))
  end)
end)

describe("json large values", function()
  it("round-trips a 1 MiB string", function()
    local chunk = 'abc"\\\n\t\1é€😀' .. string.rep("x", 40)
    local s = string.rep(chunk, math.ceil(1048576 / #chunk)):sub(1, 1048576)
    -- cut at a character boundary: drop any partial UTF-8 sequence at the end
    while not utf8.len(s) do s = s:sub(1, -2) end
    local text = enc(s)
    assert.are.equal(s, dec(text))
    local plain = string.rep("y", 1048576)
    assert.are.equal(plain, dec(enc(plain)))
    assert.are.equal(1048576 + 2, #enc(plain))
  end)

  it("round-trips a 100000-element array of integers", function()
    local t = core.array()
    for i = 1, 100000 do t[i] = i * 92233720368547 end
    local back = dec(enc(t))
    assert.are.equal(100000, #back)
    for i = 1, 100000, 997 do assert.are.equal(t[i], back[i]) end
    assert.are.equal(t[100000], back[100000])
  end)

  it("decodes an object with many keys", function()
    local parts = {}
    for i = 1, 20000 do parts[i] = string.format('"k%d":%d', i, i) end
    local v = dec("{" .. table.concat(parts, ",") .. "}")
    assert.are.equal(20000, v.k20000)
    assert.are.equal(1, v.k1)
  end)
end)

describe("json against lua-cjson", function()
  -- cjson reads every number as a double, so integers are compared by their
  -- nearest double; everything else must match exactly.
  local function same_as_cjson(ours, theirs, path)
    path = path or "value"
    if type(ours) == "number" then
      assert.are.equal("number", type(theirs), path)
      assert.are.equal(ours + 0.0, theirs + 0.0, path)
      return
    end
    assert.are.equal(type(ours), type(theirs), path)
    if type(ours) ~= "table" then
      assert.are.equal(ours, theirs, path)
      return
    end
    for k, v in pairs(ours) do same_as_cjson(v, theirs[k], path .. "." .. tostring(k)) end
    for k in pairs(theirs) do assert.is_not_nil(ours[k], path .. ": extra key " .. tostring(k)) end
  end

  local documents = {
    { a = 1, b = "two", c = { 1, 2, 3 }, d = { e = { f = true } } },
    core.array { 0.1, -2.5, 1e300, 1.0, 5e-324, 1 / 3 },
    core.array { math.maxinteger, math.mininteger, 9007199254740993 },
    { text = "quote \" backslash \\ slash / newline \n tab \t nul \0 ctl \1\31 del \127" },
    { unicode = "é € 😀 \u{10FFFF} 日本" },
    { nulls = core.array { null, 1, null }, obj = { x = null } },
    { empty_array = core.array(), empty_object = {} },
    { ["key with spaces"] = 1, ["ключ"] = 2, [""] = 3 },
    core.array { core.array { core.array { core.array {} } } },
    "just a string",
    42,
    -0.5,
    true,
    null,
  }

  for i, doc in ipairs(documents) do
    it("cjson reads our encoding of document " .. i .. " back the same", function()
      local text = enc(doc)
      local theirs = cjson.decode(text)
      same_as_cjson(doc, theirs)
    end)
  end

  it("we read cjson's encodings back the same", function()
    for _, doc in ipairs {
      { a = { 1, 2, { b = "c" } }, s = "\"\\/\b\f\n\r\t\1 é 😀", t = true, f = false, n = cjson.null },
      { 1.5, -3, 0, "x" },
      { deep = { { { { { "x" } } } } } },
    } do
      local text = cjson.encode(doc)
      same_as_cjson(dec(text), cjson.decode(text))
    end
  end)

  it("agrees with cjson on which documents are valid", function()
    local texts = { "[1,2]", '{"a":[true,false,null]}', '"\\u00e9"', "[1,]", "{,}", "[1,,2]", '{"a" 1}',
      "[1.5e3]", "[-0]", "[\"\\q\"]", "[1 2]", "{\"a\":1}}" }
    for _, text in ipairs(texts) do
      local theirs_ok = pcall(cjson.decode, text)
      local ours = decode(text)
      assert.are.equal(theirs_ok, ours ~= nil, text)
    end
  end)
end)
