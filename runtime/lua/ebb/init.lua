--[[
ebb: the library aggregate and projection modules load with `require "ebb"`.

It owns the few values a module hands back to the runtime that plain Lua
cannot express: a rejection (a command refused for a domain reason, as opposed
to a bug), and the JSON shape of a table (array or object) where the contents
alone leave it open, as with an empty list. The C runtime recognises both by
metatable fields, `__ebb = "rejection"` and `__jsontype`, so the tables made
here and the ones its JSON decoder makes are interchangeable.

This file runs inside the sandbox: it may use only the base library, string,
table, math and utf8. The given/when/then helper for specs lives apart, in
`require "ebb.testing"`.
]]

local ebb = {}

-- Rejections -----------------------------------------------------------------

local rejection_mt = {
  __ebb = "rejection",
  __tostring = function(r) return "rejected: " .. r.message end,
}

-- Refuses the command being handled: the runtime answers `rejected` (422) with
-- `message` and `details` (any JSON-able value) and records nothing. It raises
-- with level 0 so the message stays free of a file position: it is meant for
-- the user, not the developer.
function ebb.reject(message, details)
  if type(message) ~= "string" then
    error("ebb.reject: message must be a string, got " .. type(message), 2)
  end
  error(setmetatable({ message = message, details = details }, rejection_mt), 0)
end

-- True when `v` is a value raised by ebb.reject (or built by the runtime the
-- same way).
function ebb.is_rejection(v)
  local mt = getmetatable(v)
  return type(mt) == "table" and rawget(mt, "__ebb") == "rejection"
end

-- JSON shapes ----------------------------------------------------------------

local array_mt = { __jsontype = "array" }
local object_mt = { __jsontype = "object" }

local function shaped(t, mt, fname)
  if t == nil then t = {} end
  if type(t) ~= "table" then
    error("ebb." .. fname .. ": expected a table or nothing, got " .. type(t), 3)
  end
  return setmetatable(t, mt)
end

-- Marks `t` (or a new table) as a JSON array, so that it encodes as `[]` even
-- when empty. Returns the table.
function ebb.array(t) return shaped(t, array_mt, "array") end

-- Marks `t` (or a new table) as a JSON object, so that it encodes as `{}` when
-- empty. Returns the table.
function ebb.object(t) return shaped(t, object_mt, "object") end

-- Query arguments -------------------------------------------------------------

-- A whole-number argument of a projection query, args[name], from `min` up
-- (capped at `max`), or `default` when absent; anything else is refused with
-- a 400 (a negative LIMIT would mean "no limit" to SQLite).
function ebb.count_arg(args, name, default, min, max)
  local v = args[name]
  if v == nil then return default end
  local n = math.tointeger(tonumber(v))
  if n == nil or n < min then
    ebb.reject(("%s must be a whole number from %d, not %s"):format(name, min, tostring(v)))
  end
  return math.min(n, max or math.maxinteger)
end

-- JSON null -------------------------------------------------------------------

-- ebb.null is the value JSON `null` decodes to, and the value to store where a
-- JSON null must be written. The C runtime sets this field to its own sentinel
-- when it loads the library; in plain Lua (specs with ebb.testing) there is
-- no sentinel and the field is nil, so a null and an absent key look alike.
ebb.null = nil

return ebb
