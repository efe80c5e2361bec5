-- serialize_spec.lua: the binary snapshot codec seen from Lua (core.serialize,
-- core.deserialize). A snapshot replaces the replay of an aggregate's events, so
-- what comes back must be equal to what went in in every way aggregate code can
-- observe: math.type, float bits, string bytes, every key, the ebb.array and
-- ebb.object markers, and the identity of tables reachable twice (cycles too).
-- Corrupt or truncated input must give nil and a message, never a crash.

local core = require "ebb.core"

local serialize, deserialize, null = core.serialize, core.deserialize, core.null
local ARRAY_MT = getmetatable(core.array())

-- The exact bits of a float, so NaN and -0.0 compare as themselves.
local function bits(x) return string.pack("<d", x) end

local function describe_key(k)
  if type(k) == "string" then return string.format("[%q]", k) end
  return "[" .. tostring(k) .. "]"
end

-- Deep equality that also compares math.type, float bits, metatable markers
-- and the identity of tables: each table of `a` must match exactly one table of
-- `b` and the other way round, so sharing and cycles must be kept, not copied.
-- Returns true, or false and the path of the first difference.
local function same(a, b, path, a2b, b2a)
  path, a2b, b2a = path or "v", a2b or {}, b2a or {}
  if type(a) ~= type(b) then return false, path .. ": type " .. type(a) .. " vs " .. type(b) end
  if type(a) == "number" then
    if math.type(a) ~= math.type(b) then return false, path .. ": " .. math.type(a) .. " vs " .. math.type(b) end
    if math.type(a) == "float" then
      if bits(a) ~= bits(b) then return false, path .. ": float bits differ" end
      return true
    end
    if a ~= b then return false, path .. ": " .. a .. " vs " .. b end
    return true
  end
  if type(a) ~= "table" then
    if a ~= b then return false, path .. ": " .. tostring(a) .. " vs " .. tostring(b) end
    return true
  end
  if a2b[a] ~= nil or b2a[b] ~= nil then
    if a2b[a] ~= b or b2a[b] ~= a then return false, path .. ": table identity not kept" end
    return true
  end
  a2b[a], b2a[b] = b, a
  local ma, mb = getmetatable(a), getmetatable(b)
  if ma == nil then
    if mb ~= nil then return false, path .. ": unexpected metatable" end
  elseif ma.__jsontype == "array" then
    if mb ~= ARRAY_MT then return false, path .. ": array marker not the shared one" end
  elseif ma.__jsontype == "object" then
    if mb == nil or mb.__jsontype ~= "object" then return false, path .. ": object marker lost" end
  end
  local na, nb = 0, 0
  for _ in next, b do nb = nb + 1 end
  -- table keys last, so that they are matched through the values first
  for pass = 1, 2 do
    for k, v in next, a do
      if (type(k) == "table") == (pass == 2) then
        na = na + 1
        local kb = k
        if pass == 2 then
          kb = a2b[k]
          if kb == nil then return false, path .. ": table key not reached as a value (test limitation)" end
        end
        local ok, why = same(v, rawget(b, kb), path .. describe_key(k), a2b, b2a)
        if not ok then return false, why end
      end
    end
  end
  if na ~= nb then return false, path .. ": " .. na .. " keys vs " .. nb end
  return true
end

-- serialize then deserialize, which must succeed
local function rt(v)
  local s = serialize(v)
  assert.is_string(s)
  local r, err = deserialize(s)
  assert(err == nil, "unexpected deserialize error: " .. tostring(err))
  return r, s
end

local function assert_round_trip(v)
  local r = rt(v)
  local ok, why = same(v, r)
  assert(ok, why)
  return r
end

-- serialize that must fail with every fragment in the message
local function refuses(v, ...)
  local ok, err = pcall(serialize, v)
  assert.is_false(ok, "serialize should have failed")
  assert.is_string(err)
  for _, fragment in ipairs({...}) do
    assert.truthy(err:find(fragment, 1, true), "message was: " .. err)
  end
  return err
end

-- deserialize that must fail with nil and a message
local function corrupt(s)
  local v, err = deserialize(s)
  assert.is_nil(v)
  assert.is_string(err)
  return err
end

describe("core.serialize / core.deserialize", function()
  describe("scalars", function()
    it("keeps nil at the top level", function()
      local s = serialize(nil)
      local n = select("#", deserialize(s))
      local v, err = deserialize(s)
      assert.is_nil(v)
      assert.is_nil(err)
      assert.equal(1, n)
    end)

    it("keeps booleans", function()
      assert.is_true(rt(true))
      assert.is_false(rt(false))
    end)

    it("keeps ebb.null as the same light userdata", function()
      assert.equal(null, rt(null))
      local t = rt({a = null, null, [2] = null})
      assert.equal(null, t.a)
      assert.equal(null, t[1])
      assert.equal(null, t[2])
    end)

    it("keeps integers exact and integers", function()
      local values = {0, 1, 63, 64, 127, 128, 255, 256, -1, -63, -64, -65, -128, 2^31 - 1 | 0, 1 << 31, -(1 << 31),
        1 << 32, (1 << 53) + 1, 1 << 62, math.maxinteger, math.mininteger, math.maxinteger - 1,
        math.mininteger + 1}
      for _ = 1, 200 do values[#values + 1] = math.random(math.mininteger, math.maxinteger) end
      for _, x in ipairs(values) do
        local y = rt(x)
        assert.equal("integer", math.type(y))
        assert.equal(x, y)
      end
    end)

    it("keeps floats bit-exact and floats", function()
      local values = {0.0, 1.0, -1.0, 2^53, 0.1, 1e308, 5e-324, -5e-324, math.pi, 1e15, 3.0, math.huge, -math.huge}
      for _ = 1, 200 do
        values[#values + 1] = string.unpack("<d", string.pack("<i8", math.random(math.mininteger, math.maxinteger)))
      end
      for _, x in ipairs(values) do
        local y = rt(x)
        assert.equal("float", math.type(y))
        assert.equal(bits(x), bits(y))
      end
    end)

    it("keeps NaN a NaN", function()
      local y = rt(0 / 0)
      assert.equal("float", math.type(y))
      assert.is_true(y ~= y)
      local other = string.unpack("<d", "\1\0\0\0\0\0\248\127") -- a NaN with a payload
      assert.equal(bits(other), bits(rt(other)))
      local t = rt({x = 0 / 0})
      assert.is_true(t.x ~= t.x)
    end)

    it("keeps -0.0 negative", function()
      local y = rt(-0.0)
      assert.equal("float", math.type(y))
      assert.equal(-math.huge, 1 / y)
      assert.equal(math.huge, 1 / rt(0.0))
    end)

    it("keeps strings byte for byte", function()
      local all = {}
      for i = 0, 255 do all[#all + 1] = string.char(i) end
      local values = {"", "a", "\0", "a\0b\0", table.concat(all), ("x"):rep(63), ("x"):rep(64), ("y"):rep(127),
        ("z"):rep(128), ("w"):rep(16384), "\255\254 not utf-8"}
      for _, s in ipairs(values) do assert.equal(s, rt(s)) end
    end)

    it("keeps a 1 MiB string", function()
      local parts = {}
      for i = 1, 1024 do parts[i] = string.char(i % 256):rep(1023) .. "\0" end
      local big = table.concat(parts)
      assert.equal(1024 * 1024, #big)
      local t = rt({blob = big, after = 1})
      assert.equal(big, t.blob)
      assert.equal(1, t.after)
    end)

    it("is compact for small values", function()
      assert.equal(2, #serialize(5))
      assert.equal(2, #serialize(true))
      assert.equal(4, #serialize("ab"))
      assert.equal(10, #serialize(1.5))
    end)
  end)

  describe("tables", function()
    it("keeps empty tables", function()
      assert_round_trip({})
      assert_round_trip({{}, {{}}, a = {}})
    end)

    it("keeps arrays with holes", function()
      local r = assert_round_trip({1, nil, 3, [10] = 10})
      assert.equal(1, r[1])
      assert.is_nil(r[2])
      assert.equal(3, r[3])
      assert.equal(10, r[10])
      assert_round_trip({nil, nil, 3})
      local sparse = {}
      for i = 1, 1000 do sparse[i] = i end
      for i = 1, 999, 2 do sparse[i] = nil end
      assert_round_trip(sparse)
    end)

    it("keeps zero, negative, huge, float and boolean keys", function()
      local t = {[0] = 0, [-1] = -1, [1.5] = "f", [true] = 1}
      local r = assert_round_trip(t)
      assert.equal(0, r[0])
      assert.equal(-1, r[-1])
      assert.equal("f", r[1.5])
      assert.equal(1, r[true])
      assert_round_trip({[false] = "no", [math.maxinteger] = 1, [math.mininteger] = 2, [1e300] = 3, [-0.5] = 4,
        [math.huge] = 5, [-math.huge] = 6, [2^53] = 7})
    end)

    it("keeps integer keys integers and float values floats", function()
      local r = rt({[1] = 1.0, [2] = 2, x = 3.0})
      assert.equal("float", math.type(r[1]))
      assert.equal("integer", math.type(r[2]))
      assert.equal("float", math.type(r.x))
      for k in pairs(r) do
        if type(k) == "number" then assert.equal("integer", math.type(k)) end
      end
    end)

    it("keeps string keys of any bytes", function()
      assert_round_trip({["a b"] = 1, [""] = 2, ["\0"] = 3, [("k"):rep(300)] = 4})
    end)

    it("keeps a big array and a big map", function()
      local arr, map = {}, {}
      for i = 1, 50000 do arr[i] = i * 3 end
      for i = 1, 20000 do map["k" .. i] = {i, tostring(i)} end
      assert_round_trip({arr = arr, map = map})
    end)

    it("keeps tables used as keys", function()
      local k = {1, 2}
      local r = assert_round_trip({k = k, [k] = "table key"})
      assert.equal("table key", r[r.k])
    end)

    it("nests up to 200 tables, not more", function()
      local function nest(n)
        local t = {leaf = true}
        for _ = 2, n do t = {t} end
        return t
      end
      assert_round_trip(nest(200))
      refuses(nest(201), "nested deeper than 200")
      -- the same limit on decoding: 201 tables of one element each, by hand
      local s = "\1" .. ("\7\1\0"):rep(201) .. "\128"
      assert.truthy(corrupt(s):find("nested deeper than 200", 1, true))
      assert.is_table(deserialize("\1" .. ("\7\1\0"):rep(200) .. "\128"))
    end)
  end)

  describe("identity", function()
    it("keeps a shared subtable one table", function()
      local shared = {n = 1}
      local r = assert_round_trip({a = shared, b = shared, list = {shared, shared}})
      assert.equal(r.a, r.b)
      assert.equal(r.a, r.list[1])
      assert.equal(r.a, r.list[2])
      r.a.n = 2
      assert.equal(2, r.b.n)
    end)

    it("keeps cycles", function()
      local state = {name = "s"}
      state.self = state
      state.child = {parent = state}
      state.child.me = state.child
      local r = assert_round_trip(state)
      assert.equal(r, r.self)
      assert.equal(r, r.child.parent)
      assert.equal(r.child, r.child.me)
    end)

    it("keeps a cycle through an array and a table key", function()
      local a = core.array()
      a[1] = a
      local t = {a}
      t[t] = t
      local r = assert_round_trip(t)
      assert.equal(r[1], r[1][1])
      assert.equal(r, r[r])
    end)

    it("keeps many shared subtables shared", function()
      local list, again = {}, {}
      for i = 1, 5000 do
        list[i] = {i}
        again[5001 - i] = list[i]
      end
      local r = assert_round_trip({list = list, again = again})
      for i = 1, 5000 do assert.equal(r.list[i], r.again[5001 - i]) end
    end)

    it("keeps two distinct but equal tables distinct", function()
      local r = rt({a = {1}, b = {1}})
      assert.are_not.equal(r.a, r.b)
    end)
  end)

  describe("markers", function()
    it("gives back the shared ebb.array marker", function()
      local r = assert_round_trip({items = core.array({1, 2, 3}), empty = core.array()})
      assert.equal(ARRAY_MT, getmetatable(r.items))
      assert.equal(ARRAY_MT, getmetatable(r.empty))
      assert.equal(ARRAY_MT, getmetatable(rt(core.array())))
      -- and the JSON encoder still sees an array
      assert.equal("[]", core.json_encode(r.empty))
    end)

    it("takes another metatable whose only field is __jsontype = 'array' as the marker", function()
      local r = rt({x = setmetatable({}, {__jsontype = "array"})})
      assert.equal(ARRAY_MT, getmetatable(r.x))
    end)

    it("gives back an object marker, one shared metatable per state", function()
      local r = assert_round_trip({
        a = setmetatable({}, {__jsontype = "object"}),
        b = setmetatable({k = 1}, {__jsontype = "object"}),
      })
      assert.equal("object", getmetatable(r.a).__jsontype)
      assert.equal(getmetatable(r.a), getmetatable(r.b))
      local again = rt(setmetatable({}, {__jsontype = "object"}))
      assert.equal(getmetatable(r.a), getmetatable(again))
      assert.equal("{}", core.json_encode(r.a))
    end)

    it("keeps no metatable on plain tables", function()
      assert.is_nil(getmetatable(rt({})))
      assert.is_nil(getmetatable(rt({x = {}}).x))
    end)
  end)

  describe("refusals", function()
    it("refuses functions, naming the path", function()
      refuses({items = {1, 2, {f = print}}}, "state.items[3].f: cannot serialize a function")
      refuses(print, "state: cannot serialize a function")
      refuses({["a b"] = {function() end}}, 'state["a b"][1]: cannot serialize a function')
    end)

    it("refuses coroutines and full userdata", function()
      refuses({co = coroutine.create(function() end)}, "state.co: cannot serialize a thread")
      refuses({deep = {[7] = {io.stdout}}}, "state.deep[7][1]: cannot serialize a userdata")
    end)

    it("refuses keys it cannot keep, naming the table", function()
      refuses({t = {[print] = 1}}, "state.t: cannot serialize a function key")
      refuses({[coroutine.create(print)] = 1}, "state: cannot serialize a thread")
    end)

    it("refuses foreign metatables", function()
      local msg = "snapshots keep only plain tables and ebb.array/ebb.object markers"
      refuses({x = setmetatable({}, {__index = {}})}, "state.x has a metatable; " .. msg)
      refuses(setmetatable({}, {}), "state has a metatable")
      refuses({a = {b = setmetatable({}, {__jsontype = "object", __index = {}})}}, "state.a.b has a metatable")
      refuses({setmetatable({}, {__jsontype = "other"})}, "state[1] has a metatable")
    end)

    it("leaves the data usable after a refusal", function()
      local t = {ok = {1, 2}, bad = print}
      refuses(t)
      t.bad = nil
      assert_round_trip(t)
    end)

    it("raises on misuse of deserialize", function()
      assert.has_error(function() deserialize() end)
      assert.has_error(function() deserialize({}) end)
    end)
  end)

  describe("corrupt input", function()
    local sample = {
      id = "acc-1", balance = math.maxinteger, rate = 0.25, nan = 0 / 0, neg0 = -0.0, flags = {true, false},
      items = core.array({{sku = "a", qty = 1}, {sku = "b\0", qty = -300}}),
      meta = setmetatable({note = ("n"):rep(100)}, {__jsontype = "object"}), none = null,
      [0] = 0, [-5] = "neg", [1.5] = "f", [true] = "yes",
    }
    sample.self = sample
    sample.again = sample.items

    it("refuses every truncation of a valid encoding", function()
      local s = serialize(sample)
      assert_round_trip(sample)
      for i = 0, #s - 1 do corrupt(s:sub(1, i)) end
    end)

    it("refuses trailing bytes, unknown versions and unknown tags", function()
      local s = serialize({1, 2})
      assert.truthy(corrupt(s .. "\0"):find("trailing", 1, true))
      assert.truthy(corrupt("\2" .. s:sub(2)):find("version", 1, true))
      assert.truthy(corrupt("\1\31"):find("unknown tag", 1, true))
      corrupt("")
      corrupt("\1")
    end)

    it("refuses bad back-references, nil keys and oversized tables", function()
      corrupt("\1\10\1")                   -- a reference with no table yet
      corrupt("\1\7\1\0\10\2")             -- a reference to a table not yet seen
      corrupt("\1\7\0\1\0\128")            -- a nil key
      corrupt("\1\7\0\1\5\0\0\0\0\0\0\248\127\128") -- a NaN key
      corrupt("\1\7\1\0\0")                -- nil in the array part
      corrupt("\1\7\255\255\255\255\15\0") -- declares far more than it holds
      corrupt("\1\4\255\255\255\255\255\255\255\255\255\255\1") -- varint past 64 bits
      corrupt("\1\6\255\255\255\255\255\255\255\255\127") -- a string longer than the input
    end)

    it("never crashes on random byte flips", function()
      local s = serialize(sample)
      for _ = 1, 3000 do
        local b = {s:byte(1, -1)}
        for _ = 1, math.random(1, 4) do
          b[math.random(2, #b)] = math.random(0, 255)
        end
        local flipped = string.char(table.unpack(b))
        local v, err = deserialize(flipped)
        if v == nil and err ~= nil then assert.is_string(err) end
      end
    end)

    it("never crashes on random bytes", function()
      for _ = 1, 3000 do
        local b = {1}
        for i = 2, math.random(1, 40) do b[i] = math.random(0, 255) end
        local v, err = deserialize(string.char(table.unpack(b)))
        if v == nil and err ~= nil then assert.is_string(err) end
      end
    end)
  end)

  describe("random nested tables", function()
    local seed = os.time()
    math.randomseed(seed)

    local function random_scalar()
      local r = math.random(1, 12)
      if r == 1 then return math.random(0, 127)
      elseif r == 2 then return math.random(math.mininteger, math.maxinteger)
      elseif r == 3 then return ({math.mininteger, math.maxinteger, 0, -1, 128})[math.random(1, 5)]
      elseif r == 4 then return (math.random() - 0.5) * 10 ^ math.random(-300, 300)
      elseif r == 5 then return ({0 / 0, -0.0, 0.0, math.huge, -math.huge, 1.0})[math.random(1, 6)]
      elseif r == 6 then
        return string.unpack("<d", string.pack("<i8", math.random(math.mininteger, math.maxinteger)))
      elseif r == 7 then return math.random(0, 1) == 1
      elseif r == 8 then return null
      else
        local n = ({0, 1, 5, 63, 64, 200})[math.random(1, 6)]
        local chars = {}
        for i = 1, n do chars[i] = string.char(math.random(0, 255)) end
        return table.concat(chars)
      end
    end

    local function random_key()
      local r = math.random(1, 7)
      if r == 1 then return math.random(-3, 20)
      elseif r == 2 then return math.random(math.mininteger, math.maxinteger)
      elseif r == 3 then return math.random() * 100 - 50
      elseif r == 4 then return math.random(0, 1) == 1
      else return "k" .. math.random(1, 30) end
    end

    -- A random table; `made` collects every table so far, so that later ones
    -- can point back at earlier ones (shared subtables and cycles).
    local function random_table(depth, made)
      local t = {}
      local m = math.random(1, 10)
      if m == 1 then setmetatable(t, ARRAY_MT)
      elseif m == 2 then setmetatable(t, {__jsontype = "object"}) end
      made[#made + 1] = t
      for i = 1, math.random(0, 8) do
        if math.random(1, 4) > 1 then t[i] = random_scalar() end
      end
      for _ = 1, math.random(0, 6) do
        local k = random_key()
        local r = math.random(1, 10)
        if r <= 2 and depth < 6 then t[k] = random_table(depth + 1, made)
        elseif r == 3 then t[k] = made[math.random(1, #made)]
        else t[k] = random_scalar() end
      end
      return t
    end

    it("round-trip equal, with markers, math.type and identity (seed " .. seed .. ")", function()
      for _ = 1, 500 do
        local made = {}
        local t = random_table(0, made)
        local r = rt(t)
        local ok, why = same(t, r)
        assert(ok, "seed " .. seed .. ": " .. tostring(why))
      end
    end)

    it("re-serializes a decoded value to the same length", function()
      for _ = 1, 100 do
        local t = random_table(0, {})
        local s = serialize(t)
        assert.equal(#s, #serialize(deserialize(s)))
      end
    end)
  end)
end)
