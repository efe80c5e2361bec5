-- pattern_spec.lua: the sandbox's own pattern matcher (runtime/pattern.c,
-- reachable as core.patterns) must behave exactly like Lua 5.4's
-- string.find, match, gmatch and gsub: same results, same captures, same
-- errors. It is compared here with the interpreter's own functions, on a
-- table of hand-picked cases and on many random patterns and subjects.

local core = require "ebb.core"

local P = core.patterns

-- Every result of f(...) (or the error message), as one comparable string.
local function outcome(f, ...)
  local r = table.pack(pcall(f, ...))
  local parts = {}
  for i = 1, r.n do
    local v = r[i]
    -- argument errors name the function by where it is registered: ours are
    -- string.* only inside the sandbox
    if i == 2 and not r[1] then v = tostring(v):gsub("to '[^']*'", "to 'F'") end
    parts[#parts + 1] = math.type(v) or type(v) .. ":" .. tostring(v)
    parts[#parts] = parts[#parts] .. "=" .. tostring(v)
  end
  return table.concat(parts, "|")
end

local function gmatch_all(gm, s, p, init)
  local out = {}
  for a, b, c in gm(s, p, init) do
    out[#out + 1] = tostring(a) .. "," .. tostring(b) .. "," .. tostring(c)
    if #out > 200 then break end
  end
  return table.concat(out, ";")
end

local function same(fname, ...)
  local mine, lua
  if fname == "gmatch" then
    mine = outcome(gmatch_all, P.gmatch, ...)
    lua = outcome(gmatch_all, string.gmatch, ...)
  else
    mine = outcome(P[fname], ...)
    lua = outcome(string[fname], ...)
  end
  if mine ~= lua then
    local args = table.pack(...)
    for i = 1, args.n do args[i] = string.format("%q", tostring(args[i])) end
    error(string.format("%s(%s):\n  ours: %s\n  Lua:  %s", fname, table.concat(args, ", "), mine, lua), 2)
  end
end

describe("the sandbox's pattern matcher", function()
  local cases = {
    { "hello world", "o w" }, { "hello world", "l+" }, { "hello world", "^h" }, { "hello world", "d$" },
    { "hello world", "^(h)(e)" }, { "hello", "()ll()" }, { "hello", "" }, { "", "" }, { "", "a*" },
    { "aaa", "a-b" }, { "aaab", "a-b" }, { "aaab", "a*?" }, { "x = 1, y = 22", "(%w+)%s*=%s*(%d+)" },
    { "THE (quick) fox", "%((%a+)%)" }, { "f(a(b)c)d", "%b()" }, { "f(a(b c)d", "%b()" },
    { "THE (quick) fox", "%f[%a]%a+" }, { "hello", "%f[%l]" }, { "hello", "%f[%z]" }, { "abc", "%f[^%z]" },
    { "abcabc", "(abc)%1" }, { "abab", "(a)(b)%2" }, { "abc", "[]]" }, { "a]c", "[]]" }, { "a-c", "[a-]" },
    { "a^c", "[%^]" }, { "a^c", "[^%a]" }, { "a.c", "%." }, { "a.c", "." }, { "abc", "[a-c]+" },
    { "ABC", "[^%u]" }, { "a\0b", "%z" }, { "a\0b", "\0" }, { "a\0b", "[\0]" }, { "a\0b", "a%zb" },
    { "x", "%" }, { "x", "[a" }, { "x", "[a%" }, { "x", "(x" }, { "x", "x)" }, { "x", "%1" },
    { "x", "%0" }, { "x", "(x)%2" }, { "x", "%b" }, { "x", "%bx" }, { "x", "%fx" }, { "x", "%g" },
    { "a,b,,c", "([^,]*)" }, { "key=val", "(%w+)=(%w*)" }, { "  trim  ", "^%s*(.-)%s*$" },
    { "2024-01-05", "(%d+)-(%d+)-(%d+)" }, { "$x$", "%$" }, { "a$b", "a$b" }, { "ab", "^" },
    { "aaa", "^a-$" }, { "abc", "((a)(b))" }, { "abc", "(a)()(b)" }, { "éa", "[\128-\255]+" },
    { "hello", "l", 4 }, { "hello", "l", -1 }, { "hello", "l", -10 }, { "hello", "", 10 }, { "hello", "", 6 },
    { "hello", "o", 0 }, { "a+b", "+", 1, true }, { "a+b", "a+b", 1, true }, { "a.b", ".", 2, true },
    { string.rep("a", 12), string.rep("a?", 12) .. string.rep("a", 12) },
  }

  it("gives Lua 5.4's answers to find, match and gmatch on chosen cases", function()
    for _, c in ipairs(cases) do
      same("find", table.unpack(c, 1, 4))
      same("match", table.unpack(c, 1, 3))
      same("gmatch", table.unpack(c, 1, 3))
    end
  end)

  it("gives Lua 5.4's answers to gsub with strings, tables, functions and limits", function()
    local repls = {
      "<%0>", "%1-%2", "%%", "%", "%9", "x", 42, "[%1]",
      { hello = "HI", l = false, o = 7 },
      function(a) if a == "l" then return nil end return a:upper() end,
      function() return {} end,
      function(...) return select("#", ...) end,
    }
    for _, c in ipairs(cases) do
      for _, r in ipairs(repls) do
        same("gsub", c[1], c[2], r)
        same("gsub", c[1], c[2], r, 1)
      end
    end
    same("gsub", "abc", "%w", "%1")
    same("gsub", "abc", "", "-")
    same("gsub", "hello world", "(o)", "%1%1", 0)
    same("gsub", "abc", "b", true)
    same("gsub", "abc", "()", "%1")
  end)

  it("gives Lua 5.4's answers on random patterns and subjects", function()
    local atoms = { "a", "b", ".", "%a", "%d", "%s", "[ab]", "[^a]", "[a-c]", "%%", "%.", "[%d_]", "x" }
    local quants = { "", "", "*", "+", "-", "?" }
    local extras = { "", "", "", "(", ")", "()", "%1", "%b()", "%f[%a]", "$", "^" }
    local alphabet = { "a", "b", "c", "1", " ", "_", "(", ")", "%", ".", "x" }
    local seed = 20260101
    local function rnd(n) -- a small deterministic generator: no math.random in specs
      seed = (seed * 1103515245 + 12345) % 2147483648
      return seed % n + 1
    end
    for _ = 1, 4000 do
      local parts = {}
      for _ = 1, rnd(5) do
        parts[#parts + 1] = extras[rnd(#extras)] .. atoms[rnd(#atoms)] .. quants[rnd(#quants)]
      end
      local p = table.concat(parts)
      local s = {}
      for _ = 1, rnd(12) - 1 do s[#s + 1] = alphabet[rnd(#alphabet)] end
      s = table.concat(s)
      local init = rnd(3) == 1 and rnd(10) - 5 or nil
      same("find", s, p, init)
      same("match", s, p, init)
      same("gmatch", s, p, init)
      same("gsub", s, p, "<%0>")
    end
  end)

  it("refuses a pattern nested too deep as Lua does", function()
    same("match", string.rep("a", 300), string.rep("a?", 300))
    same("find", "x", string.rep("(", 40) .. "x" .. string.rep(")", 40))
  end)
end)
