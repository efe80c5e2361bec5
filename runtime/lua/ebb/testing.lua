--[[
ebb.testing: given/when/then scenarios for aggregate modules, in plain Lua and
without a store, for busted specs (or any code that treats an error as a
failed test).

    local t = require "ebb.testing"
    t.scenario(order, "o-1")
      :given { { type = "OrderCreated", data = { customer_id = "c-1", currency = "EUR" } } }
      :when("AddItem", { sku = "A", qty = 2, price = 500 })
      :expect_events { { type = "ItemAdded", data = { sku = "A", qty = 2, price = 500 } } }
      :expect_state { total = 1000, item_count = 2 }

A scenario does what the runtime (runtime.c) does with a command, in the same
order and with the same error messages: refuse a command no handler names,
build the state with `initial` and `apply` over the given events, call the
handler with a fixed clock and numbered ids, check each event it returns,
encode its data and metadata and apply it. The given events and the command
come in as the store and the JSON decoder would hand them over: integers stay
integers and floats floats, arrays carry the ebb.array() metatable, objects
are plain tables, and values JSON cannot hold are refused.

It differs from the runtime where a test needs it to: ids are "id-1",
"id-2"... (ctx.id), "event-<version>" (events) and "command-1" (the command,
when it has no command_id); apply sees no position, as in the runtime; given events older than
the module's schema are upcast (a missing step is a script error, as in the runtime); and
a handler that changes the state it was given fails as a script error, since
that change exists in no event and would be lost on reload.

Expectations raise on the first thing that does not hold, with a message that
shows what was expected and what happened; chained expectations share one run.
]]

local ebb = require "ebb"

local testing = {}

-- The clock every scenario sees unless :at() sets another.
testing.NOW = "2026-01-01T12:00:00.000Z"

local MAX_NAME = 512   -- bytes in an event type (EBB_MAX_NAME)
local MAX_DEPTH = 256  -- JSON nesting (EBB_JSON_MAX_DEPTH)

-- Values -----------------------------------------------------------------------

-- "integer" or "float" for numbers, type() for the rest: the two kinds of
-- number are different values in ebb, as they are in its JSON text.
local function kind(v)
  return math.type(v) or type(v)
end

local function jsontype_mark(t)
  local mt = getmetatable(t)
  local mark = type(mt) == "table" and rawget(mt, "__jsontype")
  return (mark == "array" or mark == "object") and mark or nil
end

-- The JSON type a table encodes as: its mark, else by its first key.
local function jsontype(t)
  local mark = jsontype_mark(t)
  if mark then return mark end
  local k = next(t)
  return math.type(k) == "integer" and "array" or "object"
end

-- Keys in a stable order: numbers, then strings ("type" first, so that events
-- read naturally), then the rest.
local function sorted_keys(t)
  local keys = {}
  for k in next, t do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    if a == "type" or b == "type" then return a == "type" and b ~= "type" end
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "number" or ta == "string" then return a < b end
    return tostring(a) < tostring(b)
  end)
  return keys
end

-- True for a table whose keys are exactly 1..n (n may be 0).
local function is_list(t)
  if type(t) ~= "table" then return false end
  local n = 0
  for k in next, t do
    if math.type(k) ~= "integer" or k < 1 then return false end
    n = n + 1
  end
  return n == rawlen(t)
end

local function quote(s)
  return (string.format("%q", s):gsub("\\\n", "\\n"))
end

local function is_identifier(s)
  return type(s) == "string" and s:match("^[%a_][%w_]*$") ~= nil
end

-- One step of a path, as the runtime's JSON encoder writes it.
local function key_path(k)
  if is_identifier(k) then return "." .. k end
  if type(k) == "string" then
    return '["' .. k:gsub('["\\]', "\\%0"):gsub("[^\32-\126]", function(c)
      return string.format("\\x%02x", c:byte())
    end) .. '"]'
  end
  return "[" .. tostring(k) .. "]"
end

-- Renders a value as Lua source, keys sorted, long tables over several lines.
local function render(v, indent, seen)
  indent, seen = indent or "", seen or {}
  if type(v) == "string" then return quote(v) end
  if type(v) ~= "table" then return tostring(v) end
  if seen[v] then return "<cycle>" end
  seen[v] = true
  local parts, n = {}, 0
  while rawget(v, n + 1) ~= nil do
    n = n + 1
    parts[n] = render(rawget(v, n), indent .. "  ", seen)
  end
  for _, k in ipairs(sorted_keys(v)) do
    if not (math.type(k) == "integer" and k >= 1 and k <= n) then
      local key = is_identifier(k) and k or "[" .. render(k) .. "]"
      parts[#parts + 1] = key .. " = " .. render(rawget(v, k), indent .. "  ", seen)
    end
  end
  seen[v] = nil
  if #parts == 0 then return jsontype_mark(v) == "array" and "ebb.array()" or "{}" end
  local inline = "{ " .. table.concat(parts, ", ") .. " }"
  if #indent + #inline <= 80 and not inline:find("\n", 1, true) then return inline end
  local inner = indent .. "  "
  return "{\n" .. inner .. table.concat(parts, ",\n" .. inner) .. "\n" .. indent .. "}"
end

local function describe(v)
  if v == nil then return "nothing" end
  if type(v) == "table" then return render(v) end
  return render(v) .. " (" .. kind(v) .. ")"
end

-- "\nexpected:\n  <expected>\ngot:\n  <actual>", for failure messages.
local function versus(expected, actual)
  return "\nexpected:\n  " .. render(expected, "  ") .. "\ngot:\n  " .. render(actual, "  ")
end

-- The first difference between `expected` and `actual` as "at <path>: ..."
-- text, or nil when they are equal. Numbers must agree in kind as well as
-- value. A table in `expected` marked with ebb.array()/ebb.object() must
-- encode to the same JSON type in `actual`. With `subset`, keys of `actual`
-- missing from `expected` are ignored at the top level only.
local function diff(expected, actual, path, subset)
  path = path or ""
  local where = "at " .. (path == "" and "the top" or path) .. ": "
  if kind(expected) ~= kind(actual) then
    return where .. "expected " .. describe(expected) .. ", got " .. describe(actual)
  end
  if type(expected) ~= "table" then
    local both_nan = expected ~= expected and actual ~= actual
    if expected ~= actual and not both_nan then
      return where .. "expected " .. describe(expected) .. ", got " .. describe(actual)
    end
    return nil
  end
  local mark = jsontype_mark(expected)
  if mark and jsontype(actual) ~= mark then
    return where .. "expected a JSON " .. mark .. ", got a JSON " .. jsontype(actual)
           .. " " .. render(actual)
  end
  for _, k in ipairs(sorted_keys(expected)) do
    local d = diff(rawget(expected, k), rawget(actual, k), path .. key_path(k))
    if d then return d end
  end
  if not subset then
    for _, k in ipairs(sorted_keys(actual)) do
      if rawget(expected, k) == nil then
        return "at " .. path .. key_path(k) .. ": unexpected " .. describe(rawget(actual, k))
      end
    end
  end
  return nil
end

-- Deep copy keeping metatables, for comparing a value before and after a call.
local function clone(v, seen)
  if type(v) ~= "table" then return v end
  seen = seen or {}
  if seen[v] then return seen[v] end
  local c = {}
  seen[v] = c
  for k, x in next, v do c[clone(k, seen)] = clone(x, seen) end
  return setmetatable(c, getmetatable(v))
end

-- JSON round trip ----------------------------------------------------------------

-- What the runtime's encoder calls a key that fits neither arrays nor objects.
local function key_kind(k)
  if type(k) == "number" then return math.type(k) .. " key" end
  return type(k) .. " key"
end

local function refuse(path, reason) error("cannot encode " .. path .. ": " .. reason, 0) end

local decoded

local function decoded_array(t, path, depth, marked)
  local n, count = rawlen(t), 0
  for k in next, t do
    if math.type(k) == "integer" then
      if k < 1 or k > n then refuse(path, "sparse array") end
      count = count + 1
    elseif type(k) == "string" then
      refuse(path, marked and "array with a string key" or "mixed integer and string keys")
    else
      refuse(path, key_kind(k))
    end
  end
  if count ~= n then refuse(path, "sparse array") end
  local copy = {}
  for i = 1, n do copy[i] = decoded(rawget(t, i), path .. "[" .. i .. "]", depth + 1) end
  return ebb.array(copy)
end

local function decoded_object(t, path, depth)
  local copy = {}
  for k, x in next, t do
    if type(k) ~= "string" then
      refuse(path, math.type(k) == "integer" and "mixed integer and string keys" or key_kind(k))
    end
    if not utf8.len(k) then refuse(path .. key_path(k), "key is not valid UTF-8") end
    copy[k] = decoded(x, path .. key_path(k), depth + 1)
  end
  return copy
end

-- The value that decoding the JSON text of `v` gives back, as the runtime's
-- codec (json.c) maps them; raises "cannot encode <path>: <reason>" for what
-- it cannot write. `path` names the root ("data" in the runtime's messages).
function decoded(v, path, depth)
  depth = depth or 0
  local tv = type(v)
  if tv == "nil" or tv == "boolean" then return v end
  if tv == "number" then
    if v ~= v then refuse(path, "NaN") end
    if v == math.huge or v == -math.huge then refuse(path, v > 0 and "infinity" or "-infinity") end
    return v
  end
  if tv == "string" then
    if not utf8.len(v) then refuse(path, "string is not valid UTF-8") end
    return v
  end
  if ebb.null ~= nil and v == ebb.null then return v end
  if tv ~= "table" then refuse(path, tv) end
  if depth >= MAX_DEPTH then refuse(path, "nesting deeper than " .. MAX_DEPTH) end
  local mark = jsontype_mark(v)
  if mark == "array" then return decoded_array(v, path, depth, true) end
  local k = next(v)
  if k == nil then return {} end
  if type(k) == "string" then return decoded_object(v, path, depth) end
  if mark == "object" then refuse(path, "object with a non-string key") end
  if math.type(k) ~= "integer" then refuse(path, key_kind(k)) end
  return decoded_array(v, path, depth, false)
end

-- Running ----------------------------------------------------------------------

-- Raised inside a run to end it with an outcome other than "ok".
local stop_mt = {}

local function stop(outcome, message, rejection)
  error(setmetatable({ outcome = outcome, message = message, rejection = rejection }, stop_mt), 0)
end

-- Calls module code outside the handler (initial, apply, upcast): any error
-- is a script error, a message as it is and anything else by its type, as the
-- runtime reports errors that leave its protected call.
local function call(fn, ...)
  local ok, result = pcall(fn, ...)
  if ok then return result end
  if getmetatable(result) == stop_mt then error(result, 0) end
  if type(result) == "string" then stop("script_error", result) end
  stop("script_error", "a " .. type(result) .. " was raised as an error")
end

local function apply(module, state, e)
  local fn = module.apply[e.type]
  if type(fn) ~= "function" then return state end
  local new = call(fn, state, e)
  if new == nil then return state end
  return new
end

-- Brings given data from its schema to the module's current one.
local function upcast(module, e)
  local current = module.schemas and module.schemas[e.type] or 1
  local steps = module.upcast and module.upcast[e.type]
  local data, schema = e.data, e.schema or current
  if schema > current then
    stop("script_error", string.format("given event %s at schema %d is newer than the code: %s declares %d",
      e.type, schema, module.type, current))
  end
  while schema < current do
    local step = steps and steps[schema]
    if not step then
      stop("script_error", string.format("given event %s (schema %d) cannot be read: no upcaster upcast.%s[%d]",
        e.type, schema, e.type, schema))
    end
    data = call(step, data)
    if type(data) ~= "table" then
      stop("script_error", string.format("upcaster upcast.%s[%d] returned %s, expected its data as a table",
        e.type, schema, type(data)))
    end
    schema = schema + 1
  end
  return data, schema
end

-- Checks an event type as the store does (ebb_validate_name).
local function name_problem(what, s)
  if #s > MAX_NAME then
    return string.format("%s is %d bytes long; the limit is %d", what, #s, MAX_NAME)
  end
  local at = s:find("%c")
  if at then return string.format("%s contains a control character at byte %d", what, at - 1) end
  if not utf8.len(s) then
    local _, bad = utf8.len(s)
    return string.format("%s is not valid UTF-8 at byte %d", what, bad - 1)
  end
end

-- The handler's result must be a table whose keys are exactly 1..#list.
local function check_list(handler, list)
  if type(list) ~= "table" then
    stop("script_error", string.format(
      "handle.%s returned %s; it must return a list of events (or {} for none)", handler, type(list)))
  end
  local n = rawlen(list)
  for k in next, list do
    if math.type(k) ~= "integer" or k < 1 or k > n then
      local hint = type(rawget(list, "type")) == "string"
                   and " (a single event? wrap it: { { type = ..., data = ... } })" or ""
      stop("script_error", "handle." .. handler .. " returned a table that is not a list of events" .. hint)
    end
  end
  return n
end

-- Encodes data or metadata of a new event the way the store will keep it.
local function stored(v, what)
  local ok, copy = pcall(decoded, v, "data")
  if not ok then stop("script_error", what .. " cannot be stored: " .. copy) end
  if jsontype(v) ~= "object" then
    stop("script_error", what .. " must be a table with string keys (a JSON object)")
  end
  return copy
end

-- Validates event i of the handler's result and records it: returns the
-- event as stored and the event as apply sees it.
local function take_event(sc, c, i, e)
  local handler, version = c.type, sc.version + i
  if type(e) ~= "table" then
    stop("script_error", string.format("handle.%s returned event %d as %s, expected a table {type=, data=}",
                                       handler, i, type(e)))
  end
  local etype = e.type
  if type(etype) ~= "string" or etype == "" then
    stop("script_error", string.format("handle.%s returned event %d without a string `type`", handler, i))
  end
  local problem = name_problem("event type", etype)
  if problem then stop("script_error", string.format("handle.%s returned event %d: %s", handler, i, problem)) end
  if e.data == nil then e.data = {} end
  if type(e.data) ~= "table" then
    stop("script_error", string.format("handle.%s returned event %d (%s) whose data is %s, expected a table",
                                       handler, i, etype, type(e.data)))
  end
  local what = string.format("event %d (%s) from handle.%s", i, etype, handler)
  local data = stored(e.data, "the data of " .. what)
  if e.metadata ~= nil and type(e.metadata) ~= "table" then
    stop("script_error", string.format("handle.%s returned event %d (%s) whose metadata is %s, expected a table",
                                       handler, i, etype, type(e.metadata)))
  end
  -- The command's metadata, then the event's own, then the causal links.
  local metadata = {}
  for k, v in next, c.metadata do metadata[k] = v end
  for k, v in next, e.metadata or {} do metadata[k] = v end
  local cmd_id = c.command_id or "command-1"
  metadata.causation_id, metadata.command_id = cmd_id, cmd_id
  metadata.correlation_id = c.metadata.correlation_id or cmd_id
  local kept = stored(metadata, "the metadata of " .. what)
  local schema = sc.module.schemas and sc.module.schemas[etype] or 1
  local fields = { stream = sc.stream, version = version, id = "event-" .. version, type = etype,
                   schema = schema, recorded_at = sc.now }
  local record, view = { position = version, data = data, metadata = kept }, { data = e.data, metadata = metadata }
  for k, v in pairs(fields) do record[k], view[k] = v, v end
  return record, view
end

-- Runs the scenario into `result`, filling it as it goes so that when the run
-- stops early the state folded so far is still there.
local function run(sc, result)
  local module, c = sc.module, sc.command
  if c and type(module.handle[c.type]) ~= "function" then
    stop("not_found", module.type .. " has no command " .. c.type)
  end
  local state = call(module.initial)
  if type(state) ~= "table" then
    stop("script_error", string.format("%s.initial() returned %s, expected a table", module.type, type(state)))
  end
  for version, g in ipairs(sc.history) do
    local data, schema = upcast(module, g)
    -- no position: apply never sees one (a command's new events have none yet)
    state = apply(module, state, {
      stream = sc.stream, version = version,
      id = g.id or ("event-" .. version), type = g.type, schema = schema,
      recorded_at = g.recorded_at or sc.now, data = data, metadata = g.metadata,
    })
    result.state = state
  end
  result.state, result.version = state, sc.version
  if not c then return end

  local ids = 0
  local ctx = { now = sc.now, metadata = c.metadata }
  function ctx.id() ids = ids + 1; return "id-" .. ids end
  local command = { type = c.type, id = sc.id, data = c.data, metadata = c.metadata,
                    command_id = c.command_id }
  local before = clone(state)
  local ok, list = pcall(module.handle[c.type], state, command, ctx)
  local changed = diff(before, state, "state")
  if changed then
    stop("script_error", "handle." .. c.type .. " changed the state it was given (" .. changed
                         .. "); only apply functions may change the state")
  end
  if not ok then
    if ebb.is_rejection(list) then
      local message = list.message
      message = (type(message) == "string" or type(message) == "number") and tostring(message) or "rejected"
      local fine, details = pcall(decoded, list.details, "data")
      stop("rejected", message, { message = message, details = fine and details or nil })
    end
    stop("script_error", tostring(list))
  end

  local n = check_list(c.type, list)
  for i = 1, n do
    local record, view = take_event(sc, c, i, rawget(list, i))
    result.events[i] = record
    state = apply(module, state, view)
    result.state, result.version = state, sc.version + i
  end
end

-- Runs the scenario once; later expectations look at the same result.
local function outcome(sc)
  if sc.ran then return sc.ran end
  local result = { outcome = "ok", events = {} }
  local ok, stopped = pcall(run, sc, result)
  if not ok then
    if getmetatable(stopped) ~= stop_mt then error(stopped, 0) end
    result.outcome, result.message, result.rejection = stopped.outcome, stopped.message, stopped.rejection
    result.events = {}
  end
  sc.ran = result
  return result
end

-- Scenarios --------------------------------------------------------------------

-- Raises a mistake in the use of this module, pointing at the spec line:
-- misuse() is called by a method, misuse_in() by a helper of a method.
local function misuse(fmt, ...) error("ebb.testing: " .. string.format(fmt, ...), 3) end
local function misuse_in(fmt, ...) error("ebb.testing: " .. string.format(fmt, ...), 4) end

-- The problem the runtime would find in the module when loading it, or nil.
local function module_problem(m)
  if type(m) ~= "table" then return "the module is a " .. type(m) .. ", expected a table" end
  if type(m.type) ~= "string" or m.type == "" then return "`type` must be a non-empty string" end
  local problem = name_problem("`type`", m.type)
  if problem then return problem end
  if m.type:find("-", 1, true) then return "`type` must not contain '-' (it names the category)" end
  if type(m.initial) ~= "function" then return "`initial` must be a function returning the initial state" end
  for _, field in ipairs { "apply", "handle" } do
    local fns = m[field]
    if type(fns) ~= "table" then
      return string.format("`%s` must be a table of functions keyed by %s type", field,
                           field == "apply" and "event" or "command")
    end
    for k, fn in next, fns do
      if type(k) ~= "string" or type(fn) ~= "function" then
        return string.format("%s[%s] must be a function keyed by a name, not %s", field, tostring(k), type(k))
      end
    end
  end
  local every = m.snapshot_every
  if every ~= nil and (math.type(every) ~= "integer" or every < 1) then
    return "`snapshot_every` must be a positive integer"
  end
  if m.schemas ~= nil then
    if type(m.schemas) ~= "table" then return "`schemas` must be a table of event type -> schema version" end
    for k, v in next, m.schemas do
      if type(k) ~= "string" or math.type(v) ~= "integer" or v < 1 then
        return string.format("schemas[%s] must be a positive integer", tostring(k))
      end
    end
  end
  if m.upcast ~= nil then
    if type(m.upcast) ~= "table" then return "`upcast` must be a table of event type -> {[schema] = function}" end
    for k, steps in next, m.upcast do
      if type(k) ~= "string" or type(steps) ~= "table" then
        return string.format("upcast[%s] must be a table of schema -> function", tostring(k))
      end
      for n, fn in next, steps do
        if math.type(n) ~= "integer" or n < 1 or type(fn) ~= "function" then
          return string.format("upcast[%s] must map schema numbers to functions", k)
        end
      end
    end
  end
end

local Scenario = {}
Scenario.__index = Scenario

-- Creates a scenario for the instance `id` (default "1") of the aggregate
-- `module`, which must pass the checks the runtime makes when loading it.
function testing.scenario(module, id)
  local problem = module_problem(module)
  if problem then misuse("scenario: %s", problem) end
  id = id == nil and "1" or id
  if type(id) ~= "string" or id == "" then misuse("scenario: id must be a non-empty string") end
  return setmetatable({
    module = module, id = id, stream = module.type .. "-" .. id,
    now = testing.NOW, history = {}, version = 0,
  }, Scenario)
end

local function must_not_have_run(sc, method)
  if sc.ran then misuse_in(":%s after an expectation: the scenario already ran", method) end
end

-- A JSON object as the decoder gives it (a plain table), from test input.
local function object(v, what)
  if v == nil then return {} end
  if type(v) ~= "table" then misuse_in("%s must be a table, got %s", what, type(v)) end
  local ok, copy = pcall(decoded, v, "data")
  if not ok then misuse_in("%s: %s", what, copy) end
  if getmetatable(copy) ~= nil then misuse_in("%s must be a JSON object, got an array", what) end
  return copy
end

-- Sets ctx.now and the recorded_at of events that do not give their own.
function Scenario:at(now)
  must_not_have_run(self, "at")
  if type(now) ~= "string" then misuse(":at expects an RFC 3339 string, got %s", type(now)) end
  self.now = now
  return self
end

-- Adds events to the stream before the command: either a list of events
-- { type =, data =, metadata =, schema =, id =, recorded_at =, position = }
-- (all but type optional; schema defaults to the module's current one), or
-- one event as :given(type, data, metadata).
function Scenario:given(events, data, metadata)
  must_not_have_run(self, "given")
  if self.command then misuse(":given after :when") end
  if type(events) == "string" then
    events = { { type = events, data = data, metadata = metadata } }
  end
  if not is_list(events) then
    misuse(":given expects a list of events or (type, data)")
  end
  for i, e in ipairs(events) do
    local what = "given event " .. i
    if type(e) ~= "table" or type(e.type) ~= "string" or e.type == "" then
      misuse("%s must be a table with a string type", what)
    end
    if e.schema ~= nil and (math.type(e.schema) ~= "integer" or e.schema < 1) then
      misuse("%s: schema must be an integer from 1", what)
    end
    self.history[#self.history + 1] = {
      type = e.type, schema = e.schema, id = e.id, recorded_at = e.recorded_at,
      position = e.position,
      data = object(e.data, what .. " data"),
      metadata = object(e.metadata, what .. " metadata"),
    }
  end
  self.version = #self.history
  return self
end

-- Sets the command: :when(type, data, metadata) or
-- :when { type =, data =, metadata =, command_id = }.
function Scenario:when(command, data, metadata)
  must_not_have_run(self, "when")
  if self.command then misuse("a scenario has one :when") end
  if type(command) == "string" then
    command = { type = command, data = data, metadata = metadata }
  end
  if type(command) ~= "table" or type(command.type) ~= "string" then
    misuse(":when expects (type, data, metadata) or a table with a string type")
  end
  if command.command_id ~= nil and type(command.command_id) ~= "string" then
    misuse("command_id must be a string")
  end
  self.command = {
    type = command.type, command_id = command.command_id,
    data = object(command.data, "command data"),
    metadata = object(command.metadata, "command metadata"),
  }
  return self
end

-- Runs the scenario (once) and returns its result: { outcome = "ok" |
-- "rejected" | "script_error" | "not_found", events = the new events as
-- stored (with position), state =, version =, rejection = { message,
-- details }, message = the error text }.
function Scenario:result()
  return outcome(self)
end

local function headline(sc)
  local c = sc.command
  return sc.stream .. (c and (", " .. c.type) or ", given events only")
end

local function brief(events)
  local list = {}
  for i, e in ipairs(events) do list[i] = { type = e.type, data = e.data } end
  return list
end

-- What happened, for a failure message.
local function happened(r)
  if r.outcome == "ok" then
    return "it succeeded with events " .. render(brief(r.events), "  ")
  elseif r.outcome == "rejected" then
    local text = "it was rejected: " .. quote(r.rejection.message)
    if r.rejection.details ~= nil then text = text .. ", details " .. render(r.rejection.details) end
    return text
  elseif r.outcome == "not_found" then
    return "no handler was found: " .. r.message
  end
  return "it failed with a script error:\n  " .. r.message
end

local function fail(sc, message) error(headline(sc) .. ": " .. message, 3) end

local function needs_command(sc, method)
  if not sc.command then misuse_in(":%s needs a :when", method) end
end

-- Expects the command to succeed with exactly these events: same number, same
-- order, equal type and data; `metadata`, where an expected event gives it, is
-- compared on the keys it names.
function Scenario:expect_events(expected)
  needs_command(self, "expect_events")
  if not is_list(expected) then misuse(":expect_events expects a list of events") end
  for i, e in ipairs(expected) do
    if type(e) ~= "table" or type(e.type) ~= "string" then
      misuse(":expect_events: expected event %d must be a table with a string type", i)
    end
  end
  local r = outcome(self)
  if r.outcome ~= "ok" then
    fail(self, "expected events " .. render(expected, "  ") .. "\nbut " .. happened(r))
  end
  local problem
  for i = 1, math.max(#expected, #r.events) do
    local want, got = expected[i], r.events[i]
    local at = "[" .. i .. "]"
    if want == nil then
      problem = at .. ": unexpected event " .. got.type
    elseif got == nil then
      problem = at .. ": missing event " .. want.type
    else
      problem = diff(want.type, got.type, at .. ".type")
             or diff(want.data or {}, got.data, at .. ".data")
             or (want.metadata and diff(want.metadata, got.metadata, at .. ".metadata", true))
      problem = problem and problem:gsub("^at ", "", 1)
    end
    if problem then break end
  end
  if problem then fail(self, "events differ at " .. problem .. versus(expected, brief(r.events))) end
  return self
end

-- Expects the command to be rejected with exactly `message`, and, when
-- `details` is given, with details equal to it.
function Scenario:expect_rejection(message, details)
  needs_command(self, "expect_rejection")
  if type(message) ~= "string" then misuse(":expect_rejection expects a message string") end
  local r = outcome(self)
  if r.outcome ~= "rejected" then
    fail(self, "expected a rejection " .. quote(message) .. "\nbut " .. happened(r))
  end
  if r.rejection.message ~= message then
    fail(self, "expected the rejection " .. quote(message) .. "\nbut " .. happened(r))
  end
  if details ~= nil then
    local problem = diff(details, r.rejection.details, "details")
    if problem then
      fail(self, "rejection details differ " .. problem .. versus(details, r.rejection.details))
    end
  end
  return self
end

-- Expects a script error (any error but a rejection from the handler, or a
-- handler result the runtime would refuse) whose message contains `text`,
-- taken first as plain text and then as a Lua pattern.
function Scenario:expect_error(text)
  if type(text) ~= "string" then misuse(":expect_error expects a string") end
  local r = outcome(self)
  local found = r.outcome == "script_error" and r.message:find(text, 1, true)
  if r.outcome == "script_error" and not found then
    local ok, at = pcall(string.find, r.message, text)
    found = ok and at
  end
  if not found then
    fail(self, "expected a script error matching " .. quote(text) .. "\nbut " .. happened(r))
  end
  return self
end

-- Expects the module to have no handler for the command (the runtime's
-- not_found).
function Scenario:expect_not_found()
  needs_command(self, "expect_not_found")
  local r = outcome(self)
  if r.outcome ~= "not_found" then fail(self, "expected no handler\nbut " .. happened(r)) end
  return self
end

-- Expects the state after the given and the new events (after the given ones
-- alone when the command was rejected) to be JSON-encodable and either to
-- match `expected` (a table: the keys it names, each compared in full) or to
-- pass `expected` (a function of the state that raises or returns false).
function Scenario:expect_state(expected)
  if type(expected) ~= "table" and type(expected) ~= "function" then
    misuse(":expect_state expects a table or a function")
  end
  local r = outcome(self)
  if r.outcome == "script_error" or r.outcome == "not_found" then
    fail(self, "expected a state\nbut " .. happened(r))
  end
  local ok, why = pcall(decoded, r.state, "data")
  if not ok then fail(self, "the state of " .. self.stream .. " cannot be shown as JSON: " .. why) end
  if type(expected) == "function" then
    if expected(r.state) == false then
      fail(self, "the state check returned false for state " .. render(r.state, "  "))
    end
    return self
  end
  local problem = diff(expected, r.state, "state", true)
  if problem then fail(self, "states differ " .. problem .. versus(expected, r.state)) end
  return self
end

-- Projections -------------------------------------------------------------------

--[[
t.projection(module): a projection's read model in a temporary SQLite file,
with the same db handle the daemon gives it (ebb.core's), for specs:

    local p = t.projection(require "order_summary")
      :given { { stream = "Order-o-1", type = "OrderCreated",
                 data = { customer_id = "c-1", currency = "EUR" } } }
    assert.same("created", p:query("get", { id = "o-1" }).status)
    p:close()

setup runs first; given events go through the handlers in order, in one
transaction per :given, filtered by `from` as the runner filters them, and
get what the store would give them: position (counting from 1), version (per
stream), id ("event-<position>"), aggregate_id (the stream's id part), schema
1, empty metadata and recorded_at testing.NOW, unless the event says otherwise. Queries run on a read-only
handle, as in the daemon. A handler error rolls its :given back and raises,
naming the event.
]]
local Projection = {}
Projection.__index = Projection

local function category(stream)
  return (stream:match("^([^-]*)%-") or stream)
end

function testing.projection(module)
  local core = require "ebb.core"
  assert(type(module) == "table" and type(module.name) == "string" and type(module.on) == "table",
         "t.projection: not a projection module (name, on)")
  local path = os.tmpname()
  local db = assert(core.projection_db(path, "write"))
  local self = setmetatable({ module = module, db = db, path = path, position = 0, versions = {} },
                            Projection)
  if module.setup then
    db:begin()
    local ok, err = pcall(module.setup, db)
    if not ok then
      db:rollback()
      self:close()
      error(module.name .. ".setup failed: " .. tostring(err), 2)
    end
    db:commit()
  end
  return self
end

function Projection:matches(e)
  for _, f in ipairs(self.module.from or {}) do
    if f == e.type or f == category(e.stream) then return true end
  end
  return false
end

function Projection:given(events)
  local db = self.db
  db:begin()
  for i, given in ipairs(events) do
    assert(type(given.stream) == "string" and type(given.type) == "string",
           ("given event %d needs a stream and a type"):format(i))
    self.position = given.position or (self.position + 1)
    self.versions[given.stream] = given.version or ((self.versions[given.stream] or 0) + 1)
    local e = {
      position = self.position, stream = given.stream, version = self.versions[given.stream],
      id = given.id or ("event-" .. self.position), type = given.type, schema = given.schema or 1,
      data = given.data or {}, metadata = given.metadata or {},
      recorded_at = given.recorded_at or testing.NOW,
      aggregate_id = given.stream:match("^[^-]*%-(.*)$"),
    }
    local handler = self.module.on[e.type]
    if handler and self:matches(e) then
      local ok, err = pcall(handler, db, e)
      if not ok then
        db:rollback()
        error(("%s: event %d (%s in %s): %s"):format(self.module.name, i, e.type, e.stream,
                                                    tostring(err)), 2)
      end
    end
  end
  db:commit()
  return self
end

function Projection:query(name, args)
  local q = self.module.queries and self.module.queries[name]
  if type(q) ~= "function" then error(("%s has no query %s"):format(self.module.name, name), 2) end
  self.reader = self.reader or assert(require("ebb.core").projection_db(self.path, "read"))
  return q(self.reader, args or {})
end

function Projection:close()
  if self.reader then self.reader:close() end
  if self.db then self.db:close() end
  self.reader, self.db = nil, nil
  for _, suffix in ipairs { "", "-wal", "-shm", "-journal" } do os.remove(self.path .. suffix) end
end

-- Reactors ---------------------------------------------------------------------

--[[
t.reactor(module): a reactor's handlers on given events, for specs, without a
daemon:

    t.reactor(require "order_payment")
      :given { { stream = "Order-o-1", type = "OrderConfirmed",
                 data = { total = 100, account_id = "a-1" } } }
      :expect_commands { { aggregate = "bank_account", id = "a-1", type = "Withdraw",
                           data = { amount = 100 } } }
      :when_rejected("Withdraw", "insufficient funds")
      :expect_commands { { aggregate = "order", id = "o-1", type = "CancelOrder",
                           data = { reason = "payment refused: insufficient funds" } } }

:when_schedule_rejected(key, message, details?) does the same for a pending
schedule whose command was refused when it fell due: the schedule goes, and
rejected[type] gets the event that set it (ids "<schedule's command id>/r<k>").

Given events get what the daemon gives (position, version, id "event-<position>",
aggregate_id, schema 1, recorded_at testing.NOW unless given), filtered by
`from`. Commands carry the command_id the daemon would give them
("<reactor>:<event id>:<index>", compensations "<that id>/r<k>"). Schedules set
with ctx.schedule and removed with ctx.cancel are kept across :given calls, as
the daemon keeps them; :expect_schedules compares the pending ones, by time.
]]
local Reactor = {}
Reactor.__index = Reactor

local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = (y >= 0 and y or y - 399) // 400
  local yoe = y - era * 400
  local doy = (153 * (m + (m > 2 and -3 or 9)) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146097 + doe - 719468
end

local function time_ms(text)
  local y, mo, d, h, mi, sec, frac =
    tostring(text):match("^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d)%.?(%d*)Z$")
  if not y then return nil end
  local ms = tonumber(((frac or "") .. "000"):sub(1, 3))
  return ((days_from_civil(tonumber(y), tonumber(mo), tonumber(d)) * 24 + tonumber(h)) * 60
          + tonumber(mi)) * 60000 + tonumber(sec) * 1000 + ms
end

local function time_text(ms)
  return os.date("!%Y-%m-%dT%H:%M:%S", ms // 1000) .. (".%03dZ"):format(ms % 1000)
end

function testing.reactor(module)
  if type(module) ~= "table" or type(module.name) ~= "string" or type(module.on) ~= "table" then
    misuse("t.reactor: not a reactor module (name, from, on)")
  end
  return setmetatable({ module = module, position = 0, versions = {}, schedules = {},
                        issued = nil, step = "no :given yet" }, Reactor)
end

local function reactor_fail(self, message) error(self.module.name .. ", " .. self.step .. ": " .. message, 3) end

function Reactor:matches(e)
  for _, f in ipairs(self.module.from or {}) do
    if f == e.type or f == category(e.stream) then return true end
  end
  return false
end

local function take_commands(self, list, e, handler, make_id)
  if list == nil then return {} end
  if type(list) ~= "table" then
    reactor_fail(self, handler .. " must return a list of commands ({} for none), not a " .. type(list))
  end
  local out = {}
  for i, c in ipairs(list) do
    if type(c) ~= "table" or type(c.aggregate) ~= "string" or type(c.id) ~= "string"
        or type(c.type) ~= "string" then
      reactor_fail(self, ("%s: command %d must be a table { aggregate, id, type, data }"):format(handler, i))
    end
    out[#out + 1] = { aggregate = c.aggregate, id = c.id, type = c.type, data = c.data or {},
                      command_id = make_id(i), event = e }
  end
  return out
end

function Reactor:ctx(e, ops)
  local name = self.module.name
  return {
    reactor = name,
    settings = self.module.settings,
    schedule = function(at, command, key)
      local when
      if type(at) == "number" then when = time_ms(e.recorded_at) + math.floor(at * 1000)
      elseif type(at) == "string" then
        when = time_ms(at) or error("ctx.schedule: " .. at .. " is not an RFC 3339 time", 2)
      else error("ctx.schedule(at_or_delay, command, key?): at_or_delay must be seconds or an RFC 3339 time", 2) end
      key = key or (e.id .. ":" .. #ops)
      ops[#ops + 1] = { key = key, at = when, command = { aggregate = command.aggregate, id = command.id,
                        type = command.type, data = command.data or {} },
                        command_id = name .. ":" .. e.id .. ":schedule:" .. key, event = e }
    end,
    cancel = function(key) ops[#ops + 1] = { key = key, cancel = true } end,
  }
end

-- Runs the handlers of these events in order; the commands they issue are
-- what :expect_commands checks next.
function Reactor:given(events)
  if not is_list(events) then misuse(":given expects a list of events") end
  self.issued = {}
  self.step = "given " .. #events .. " event" .. (#events == 1 and "" or "s")
  for i, g in ipairs(events) do
    if type(g) ~= "table" or type(g.stream) ~= "string" or type(g.type) ~= "string" then
      misuse(":given: event %d needs a stream and a type", i)
    end
    self.position = g.position or (self.position + 1)
    self.versions[g.stream] = g.version or ((self.versions[g.stream] or 0) + 1)
    local e = {
      position = self.position, stream = g.stream, version = self.versions[g.stream],
      id = g.id or ("event-" .. self.position), type = g.type, schema = g.schema or 1,
      data = g.data or {}, metadata = g.metadata or {}, recorded_at = g.recorded_at or testing.NOW,
      aggregate_id = g.stream:match("^[^-]*%-(.*)$"),
    }
    local handler = self.module.on[e.type]
    if handler and self:matches(e) then
      local ops = {}
      local ok, result = pcall(handler, e, self:ctx(e, ops))
      if not ok then
        reactor_fail(self, ("on.%s failed on event %d (%s in %s): %s"):format(e.type, i, e.type,
                                                                           e.stream, tostring(result)))
      end
      local name = self.module.name
      for _, c in ipairs(take_commands(self, result, e, "on." .. e.type,
                                       function(k) return ("%s:%s:%d"):format(name, e.id, k - 1) end)) do
        self.issued[#self.issued + 1] = c
      end
      for _, op in ipairs(ops) do
        if op.cancel then self.schedules[op.key] = nil else self.schedules[op.key] = op end
      end
    end
  end
  return self
end

-- Runs rejected[cmd.type](cmd, err, e, ctx) for a rejected command `cmd`
-- (with its command_id) made for event e; its commands, with ids
-- "<cmd's id>/r<k>", are what :expect_commands checks next.
local function run_rejected(self, cmd, e, message, details)
  local handler = self.module.rejected and self.module.rejected[cmd.type]
  self.issued = {}
  if not handler then return self end -- recorded by the daemon, nothing issued
  local ops = {}
  local ok, result = pcall(handler, cmd, { code = "rejected", message = message, details = details },
                           e, self:ctx(e, ops))
  if not ok then reactor_fail(self, "rejected." .. cmd.type .. " failed: " .. tostring(result)) end
  self.issued = take_commands(self, result, e, "rejected." .. cmd.type,
                              function(k) return ("%s/r%d"):format(cmd.command_id, k - 1) end)
  for _, op in ipairs(ops) do
    if op.cancel then self.schedules[op.key] = nil else self.schedules[op.key] = op end
  end
  return self
end

-- The command issued last of `command_type` was rejected with this message
-- (and details): runs rejected[command_type]; its commands are what
-- :expect_commands checks next.
function Reactor:when_rejected(command_type, message, details)
  if type(command_type) ~= "string" or type(message) ~= "string" then
    misuse(":when_rejected expects a command type and a message")
  end
  local rejected
  for i = #(self.issued or {}), 1, -1 do
    if self.issued[i].type == command_type then rejected = self.issued[i] break end
  end
  if not rejected then
    reactor_fail(self, "no " .. command_type .. " command was issued to be rejected; issued: "
                 .. render(self:brief(self.issued or {}), "  "))
  end
  self.step = "when " .. command_type .. " was rejected"
  return run_rejected(self, { aggregate = rejected.aggregate, id = rejected.id, type = rejected.type,
                              data = rejected.data, command_id = rejected.command_id },
                      rejected.event, message, details)
end

-- The pending schedule `key` fell due and its command was rejected with this
-- message (and details): the schedule goes, and rejected[type] runs with the
-- event that set it, as the daemon does; its commands are what
-- :expect_commands checks next.
function Reactor:when_schedule_rejected(key, message, details)
  if type(key) ~= "string" or type(message) ~= "string" then
    misuse(":when_schedule_rejected expects a schedule key and a message")
  end
  local op = self.schedules[key]
  if not op then
    local keys = {}
    for k in pairs(self.schedules) do keys[#keys + 1] = k end
    table.sort(keys)
    reactor_fail(self, "no pending schedule " .. key .. "; pending: " .. render(keys, "  "))
  end
  self.schedules[key] = nil
  self.step = "when schedule " .. key .. " was rejected"
  local c = op.command
  return run_rejected(self, { aggregate = c.aggregate, id = c.id, type = c.type, data = c.data,
                              command_id = op.command_id }, op.event, message, details)
end

function Reactor.brief(_, list)
  local out = {}
  for i, c in ipairs(list) do
    out[i] = { aggregate = c.aggregate, id = c.id, type = c.type, data = c.data }
  end
  return out
end

-- Expects exactly these commands, in order: aggregate, id, type and data
-- equal; command_id compared where an expected command gives it.
function Reactor:expect_commands(expected)
  if not is_list(expected) then misuse(":expect_commands expects a list of commands") end
  if self.issued == nil then misuse_in(":expect_commands needs a :given first") end
  local got = self.issued
  local problem
  for i = 1, math.max(#expected, #got) do
    local want, c = expected[i], got[i]
    local at = "[" .. i .. "]"
    if want == nil then
      problem = at .. ": unexpected command " .. c.type .. " on " .. c.aggregate .. " " .. c.id
    elseif c == nil then
      problem = at .. ": missing command " .. tostring(want.type)
    else
      local shown = { aggregate = c.aggregate, id = c.id, type = c.type, data = c.data,
                      command_id = want.command_id and c.command_id or nil }
      local w = { aggregate = want.aggregate, id = want.id, type = want.type, data = want.data or {},
                  command_id = want.command_id }
      problem = diff(w, shown, at)
      problem = problem and problem:gsub("^at ", "", 1)
    end
    if problem then break end
  end
  if problem then
    reactor_fail(self, "commands differ at " .. problem .. versus(expected, self:brief(got)))
  end
  return self
end

-- Expects exactly these pending schedules, ordered by time then key: key, at
-- (RFC 3339, as the daemon lists them) and command, where an expected one
-- gives them.
function Reactor:expect_schedules(expected)
  if not is_list(expected) then misuse(":expect_schedules expects a list of schedules") end
  local pending = {}
  for _, op in pairs(self.schedules) do pending[#pending + 1] = op end
  table.sort(pending, function(a, b) return a.at < b.at or (a.at == b.at and a.key < b.key) end)
  local got = {}
  for i, op in ipairs(pending) do got[i] = { key = op.key, at = time_text(op.at), command = op.command } end
  local problem
  for i = 1, math.max(#expected, #got) do
    local want, g = expected[i], got[i]
    local at = "[" .. i .. "]"
    if want == nil then problem = at .. ": unexpected schedule " .. g.key
    elseif g == nil then problem = at .. ": missing schedule " .. tostring(want.key)
    else
      problem = diff(want, g, at, true)
      problem = problem and problem:gsub("^at ", "", 1)
    end
    if problem then break end
  end
  if problem then reactor_fail(self, "schedules differ at " .. problem .. versus(expected, got)) end
  return self
end

-- Utilities for specs that check values of their own.
testing.diff = diff
testing.render = render

return testing
