/*
 * lua_core.c: `require "ebb.core"`, the C core as a Lua module, so that the
 * specs (and anyone embedding ebb in Lua) drive the real store and command
 * path.
 *
 * Misuse (wrong argument types) raises; expected failures return
 * `nil, message, code, info` where code is the stable error name
 * ("wrong_expected_version") and info a table with code, message and, where
 * they apply, expected, actual and details.
 */
#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "pattern.h"
#include "projection_db.h"
#include "runtime.h"
#include "serialize.h"
#include "uuid.h"

#define RUNTIME_MT "ebb.Runtime"

typedef struct lruntime {
  ebb_runtime *rt; /* NULL once closed */
} lruntime;

int ebb__lua_json_open(lua_State *L);

static ebb_runtime *check_rt(lua_State *L) {
  lruntime *u = luaL_checkudata(L, 1, RUNTIME_MT);
  if (u->rt == NULL) luaL_error(L, "attempt to use a closed ebb runtime");
  return u->rt;
}

/* Pushes a JSON text as a Lua value; raises if it is not JSON (our own output always is). */
static void push_json(lua_State *L, const char *text, size_t len) {
  char msg[256];
  if (ebb_json_decode(L, text, len, msg, sizeof msg) != 0) luaL_error(L, "internal: %s", msg);
}

/* The info table of an error: code, message and, where they apply,
 * expected, actual and details. */
static void push_error_info(lua_State *L, const ebb_error *err) {
  char buf[24];
  lua_createtable(L, 0, 5);
  lua_pushstring(L, ebb_error_name(err->code));
  lua_setfield(L, -2, "code");
  lua_pushstring(L, err->message);
  lua_setfield(L, -2, "message");
  if (err->code == EBB_EVERSION) {
    if (err->expected >= 0) lua_pushinteger(L, err->expected);
    else lua_pushstring(L, ebb_expected_name(err->expected, buf, sizeof buf));
    lua_setfield(L, -2, "expected");
    lua_pushinteger(L, err->actual);
    lua_setfield(L, -2, "actual");
  }
  if (err->details) {
    push_json(L, err->details, strlen(err->details));
    lua_setfield(L, -2, "details");
  }
}

/* nil, message, code, info; clears err. */
static int push_failure(lua_State *L, ebb_error *err) {
  lua_pushnil(L);
  lua_pushstring(L, err->message);
  lua_pushstring(L, ebb_error_name(err->code));
  push_error_info(L, err);
  ebb_error_clear(err);
  return 4;
}

static const char *opt_string_field(lua_State *L, int t, const char *k, const char *def) {
  int type = lua_getfield(L, t, k);
  const char *v = def;
  size_t len;
  if (type == LUA_TSTRING && strlen(v = lua_tolstring(L, -1, &len)) != len)
    luaL_error(L, "option %s contains a NUL character", k);
  else if (type != LUA_TSTRING && type != LUA_TNIL) luaL_error(L, "option %s must be a string", k);
  lua_pop(L, 1); /* the string stays alive: it is referenced by the options table */
  return v;
}

static lua_Integer opt_int_field(lua_State *L, int t, const char *k, lua_Integer def) {
  int type = lua_getfield(L, t, k);
  lua_Integer v = def;
  if (type != LUA_TNIL) {
    if (!lua_isinteger(L, -1)) luaL_error(L, "option %s must be an integer", k);
    v = lua_tointeger(L, -1);
  }
  lua_pop(L, 1);
  return v;
}

static int l_open(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  ebb_runtime_options o = {0};
  o.data_dir = opt_string_field(L, 1, "data", NULL);
  if (o.data_dir == NULL) luaL_error(L, "option data (the data directory) is required");
  o.store = opt_string_field(L, 1, "store", NULL);
  o.aggregates_dir = opt_string_field(L, 1, "aggregates", "aggregates");
  o.lua_dir = opt_string_field(L, 1, "lua_dir", NULL);
  const char *durability = opt_string_field(L, 1, "durability", "full");
  if (strcmp(durability, "full") == 0) o.durability = EBB_DURABILITY_FULL;
  else if (strcmp(durability, "normal") == 0) o.durability = EBB_DURABILITY_NORMAL;
  else luaL_error(L, "durability must be \"full\" or \"normal\", not \"%s\"", durability);
  o.memory_limit = (size_t)opt_int_field(L, 1, "memory_limit", 0);
  o.instruction_budget = opt_int_field(L, 1, "instruction_budget", 0);
  o.cache_size = opt_int_field(L, 1, "cache_size", 0);
  lua_getfield(L, 1, "exclusive");
  o.exclusive = lua_toboolean(L, -1);
  lua_getfield(L, 1, "snapshots");
  o.no_snapshots = lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1);
  lua_pop(L, 2);
  lruntime *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->rt = NULL; /* closed until opened, so __gc is safe if opening fails */
  luaL_setmetatable(L, RUNTIME_MT);
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_runtime_open(&u->rt, &o, &err) != 0) return push_failure(L, &err);
  return 1;
}

static int l_close(lua_State *L) {
  lruntime *u = luaL_checkudata(L, 1, RUNTIME_MT);
  ebb_runtime_close(u->rt);
  u->rt = NULL;
  return 0;
}

static int l_tostring(lua_State *L) {
  lruntime *u = luaL_checkudata(L, 1, RUNTIME_MT);
  lua_pushfstring(L, "ebb.Runtime (%s)", u->rt ? "open" : "closed");
  return 1;
}

static int64_t check_expected(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return EBB_EXPECT_ANY;
  if (lua_isinteger(L, idx)) {
    lua_Integer v = lua_tointeger(L, idx);
    luaL_argcheck(L, v >= 0, idx, "an expected version must not be negative");
    return v;
  }
  int64_t v;
  const char *s = luaL_checkstring(L, idx);
  luaL_argcheck(L, ebb_parse_expected(s, &v) == 0, idx,
                "expected version: \"any\", \"no_stream\", \"exists\" or an integer");
  return v;
}

/* Encodes table field k of the table at t as a JSON object (or "{}" when nil) into b. */
static void field_json(lua_State *L, int t, const char *k, ebb_buf *b, int i) {
  char msg[512] = "";
  int type = lua_getfield(L, t, k);
  if (type == LUA_TNIL) ebb_buf_puts(b, "{}");
  else if (type != LUA_TTABLE || ebb_json_encode(L, -1, b, msg, sizeof msg) != 0 || b->data[0] != '{')
    luaL_error(L, "event %d: %s must be a table with string keys%s%s", i, k, msg[0] ? ": " : "",
               msg);
  lua_pop(L, 1);
}

/* Buffers owned by a userdata, so that an error raised while they are being
 * filled (a bad value, a metamethod, out of memory) frees them at collection. */
#define BUFSET_MT "ebb.bufset"
typedef struct bufset {
  size_t n;
  ebb_buf b[];
} bufset;

static int bufset_gc(lua_State *L) {
  bufset *set = lua_touserdata(L, 1);
  for (size_t i = 0; i < set->n; i++) ebb_buf_free(&set->b[i]);
  return 0;
}

static ebb_buf *new_bufs(lua_State *L, size_t n) {
  bufset *set = lua_newuserdatauv(L, sizeof *set + (n ? n : 1) * sizeof(ebb_buf), 0);
  for (size_t i = 0; i < n; i++) ebb_buf_init(&set->b[i]);
  set->n = n;
  luaL_setmetatable(L, BUFSET_MT);
  return set->b;
}

/* A name argument: a string without NUL bytes, which C would cut short. */
static const char *check_name(lua_State *L, int idx) {
  size_t len;
  const char *s = luaL_checklstring(L, idx, &len);
  luaL_argcheck(L, strlen(s) == len, idx, "contains a NUL character");
  return s;
}

/* rt:append(stream, expected, events) */
static int l_append(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  const char *stream = check_name(L, 2);
  int64_t expected = check_expected(L, 3);
  luaL_checktype(L, 4, LUA_TTABLE);
  size_t n = (size_t)lua_rawlen(L, 4);
  ebb_event_in *in = lua_newuserdatauv(L, (n ? n : 1) * sizeof *in, 0);
  ebb_buf *bufs = new_bufs(L, 2 * n);
  char(*ids)[EBB_UUID_LEN + 1] = lua_newuserdatauv(L, (n ? n : 1) * sizeof *ids, 0);
  memset(in, 0, (n ? n : 1) * sizeof *in);
  int ok = 0;
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, 4, (lua_Integer)i + 1);
    int t = lua_gettop(L);
    if (!lua_istable(L, t)) goto bad;
    size_t len;
    if (lua_getfield(L, t, "type") != LUA_TSTRING) goto bad;
    in[i].type = lua_tolstring(L, -1, &len);
    if (strlen(in[i].type) != len) goto bad;
    lua_pop(L, 1); /* kept alive by the event table */
    if (lua_getfield(L, t, "id") == LUA_TSTRING) {
      in[i].id = lua_tolstring(L, -1, &len);
      if (strlen(in[i].id) != len) goto bad;
    } else {
      ebb_uuid_new(ids[i]);
      in[i].id = ids[i];
    }
    lua_pop(L, 1);
    in[i].schema = lua_getfield(L, t, "schema") == LUA_TNIL ? 1 : lua_tointeger(L, -1);
    lua_pop(L, 1);
    field_json(L, t, "data", &bufs[2 * i], (int)i + 1);
    field_json(L, t, "metadata", &bufs[2 * i + 1], (int)i + 1);
    in[i].data = bufs[2 * i].data;
    in[i].data_len = bufs[2 * i].len;
    in[i].metadata = bufs[2 * i + 1].data;
    in[i].metadata_len = bufs[2 * i + 1].len;
    lua_pop(L, 1);
  }
  ok = 1;
bad:
  if (!ok)
    return luaL_error(L, "events must be a list of tables {type=, data=, metadata=, id=} "
                         "whose type and id are strings without NUL bytes");
  ebb_append req = {.stream = stream, .expected = expected, .events = in, .n = n};
  ebb_error_init(&req.err);
  for (size_t i = 0; i < n && !req.err.code; i++)
    ebb_runtime_check_schema(rt, in[i].type, in[i].schema, &req.err);
  if (!req.err.code) ebb_store_append(ebb_runtime_store(rt), &req, 1, NULL);
  for (size_t i = 0; i < 2 * n; i++) ebb_buf_free(&bufs[i]);
  if (req.err.code) return push_failure(L, &req.err);
  lua_createtable(L, 0, 6);
  lua_pushstring(L, stream);
  lua_setfield(L, -2, "stream");
  lua_pushinteger(L, req.result.first_version);
  lua_setfield(L, -2, "first_version");
  lua_pushinteger(L, req.result.version);
  lua_setfield(L, -2, "version");
  lua_pushinteger(L, req.result.first_position);
  lua_setfield(L, -2, "first_position");
  lua_pushinteger(L, req.result.position);
  lua_setfield(L, -2, "position");
  lua_pushboolean(L, req.result.idempotent);
  lua_setfield(L, -2, "idempotent");
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    lua_pushstring(L, in[i].id);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  lua_setfield(L, -2, "ids");
  return 1;
}

/* Upcasts (unless raw) and pushes the events as a list; frees the list. */
static int push_events(lua_State *L, ebb_runtime *rt, ebb_event_list *l, int raw) {
  ebb_error err;
  ebb_error_init(&err);
  if (!raw && ebb_runtime_upcast(rt, l, &err) != 0) {
    ebb_event_list_free(l);
    return push_failure(L, &err);
  }
  ebb_buf b = EBB_BUF_INIT;
  lua_createtable(L, (int)l->n, 0);
  for (size_t i = 0; i < l->n; i++) {
    ebb_buf_reset(&b);
    ebb_event_to_json(&l->items[i], &b);
    char msg[256];
    if (b.oom || ebb_json_decode_document(L, b.data, b.len, msg, sizeof msg) != 0) {
      lua_Integer position = (lua_Integer)l->items[i].position;
      ebb_buf_free(&b);
      ebb_event_list_free(l);
      luaL_error(L, "cannot read event at position %I", position);
    }
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  ebb_buf_free(&b);
  ebb_event_list_free(l);
  return 1;
}

/* rt:read(stream, {from=, limit=, backward=}) */
static int l_read(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  const char *stream = check_name(L, 2);
  int64_t from = 0, limit = 1000;
  int backward = 0, raw = 0;
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    from = opt_int_field(L, 3, "from", 0);
    limit = opt_int_field(L, 3, "limit", 1000);
    lua_getfield(L, 3, "backward");
    backward = lua_toboolean(L, -1);
    lua_getfield(L, 3, "raw");
    raw = lua_toboolean(L, -1);
    lua_pop(L, 2);
  }
  ebb_event_list l;
  ebb_event_list_init(&l);
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_store_read_stream(ebb_runtime_store(rt), stream, from, limit, backward, &l, &err) != 0) {
    ebb_event_list_free(&l);
    return push_failure(L, &err);
  }
  return push_events(L, rt, &l, raw);
}

/* rt:prefetch({{stream=, command_id=}, ...}, limit) -> for each item, in
 * order, {events = {...}, command_known = bool} or {error = {code=,
 * message=}}: ebb_store_prefetch, what the daemon reads for commands on
 * streams it has not cached. */
static int l_prefetch(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  int64_t limit = (int64_t)luaL_optinteger(L, 3, EBB_PRELOAD_EVENTS);
  size_t n = (size_t)lua_rawlen(L, 2);
  /* Freed by Lua, whatever raises; the strings stay in the argument. */
  ebb_prefetch *items = lua_newuserdatauv(L, (n ? n : 1) * sizeof *items, 0);
  ebb_event_list *lists = lua_newuserdatauv(L, (n ? n : 1) * sizeof *lists, 0);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, 2, (lua_Integer)i + 1);
    luaL_argcheck(L, lua_istable(L, -1), 2, "a list of {stream=, command_id=}");
    items[i] = (ebb_prefetch){.stream = opt_string_field(L, -1, "stream", ""),
                              .command_id = opt_string_field(L, -1, "command_id", NULL),
                              .events = &lists[i]};
    ebb_error_init(&items[i].err);
    ebb_event_list_init(&lists[i]);
    lua_pop(L, 1);
  }
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_store_prefetch(ebb_runtime_store(rt), items, n, limit, &err) != 0) {
    for (size_t i = 0; i < n; i++) {
      ebb_event_list_free(&lists[i]);
      ebb_error_clear(&items[i].err);
    }
    return push_failure(L, &err);
  }
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    lua_createtable(L, 0, 2);
    if (items[i].err.code) {
      push_error_info(L, &items[i].err);
      lua_setfield(L, -2, "error");
      ebb_error_clear(&items[i].err);
      ebb_event_list_free(&lists[i]);
    } else {
      lua_pushboolean(L, items[i].command_known);
      lua_setfield(L, -2, "command_known");
      int r = push_events(L, rt, &lists[i], 0);
      if (r != 1) { /* an upcaster failed: nil, message, code, error */
        for (size_t k = i + 1; k < n; k++) {
          ebb_event_list_free(&lists[k]);
          ebb_error_clear(&items[k].err);
        }
        return r;
      }
      lua_setfield(L, -2, "events");
    }
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  return 1;
}

/* rt:events({after=, limit=, category=, type=}) */
static int l_events(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  ebb_read_all q = {.after = 0, .limit = 1000};
  int raw = 0;
  if (!lua_isnoneornil(L, 2)) {
    lua_getfield(L, 2, "raw");
    raw = lua_toboolean(L, -1);
    lua_pop(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    q.after = opt_int_field(L, 2, "after", 0);
    q.limit = opt_int_field(L, 2, "limit", 1000);
    q.category = opt_string_field(L, 2, "category", NULL);
    q.type = opt_string_field(L, 2, "type", NULL);
  }
  ebb_event_list l;
  ebb_event_list_init(&l);
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_store_read_all(ebb_runtime_store(rt), &q, &l, &err) != 0) {
    ebb_event_list_free(&l);
    return push_failure(L, &err);
  }
  return push_events(L, rt, &l, raw);
}

static int l_version(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  int64_t v;
  int deleted;
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_store_stream_version(ebb_runtime_store(rt), check_name(L, 2), &v, &deleted, &err) !=
      0)
    return push_failure(L, &err);
  lua_pushinteger(L, v);
  lua_pushboolean(L, deleted);
  return 2;
}

/* rt:flush() -> true: writes the snapshots taken so far */
static int l_flush(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_runtime_flush(rt, &err) != 0) return push_failure(L, &err);
  lua_pushboolean(L, 1);
  return 1;
}

/* rt:snapshots() -> list of {stream, version, position, recorded_at, fingerprint, bytes,
 * created_at, current} */
static int l_snapshots(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  ebb_buf b = EBB_BUF_INIT;
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_runtime_snapshots(rt, &b, &err) != 0) {
    ebb_buf_free(&b);
    return push_failure(L, &err);
  }
  lua_newtable(L);
  lua_Integer n = 0;
  char msg[256];
  for (size_t i = 0, start = 0; i < b.len; i++) {
    if (b.data[i] != '\n') continue;
    if (ebb_json_decode(L, b.data + start, i - start, msg, sizeof msg) != 0) {
      ebb_buf_free(&b);
      return luaL_error(L, "internal: %s", msg);
    }
    lua_rawseti(L, -2, ++n);
    start = i + 1;
  }
  ebb_buf_free(&b);
  return 1;
}

/* rt:delete_snapshots{stream =, stale =} -> number deleted */
static int l_delete_snapshots(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  const char *stream = NULL;
  int stale = 0;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    stream = opt_string_field(L, 2, "stream", NULL);
    lua_getfield(L, 2, "stale");
    stale = lua_toboolean(L, -1);
    lua_pop(L, 1);
  }
  int64_t n;
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_runtime_delete_snapshots(rt, stream, stale, &n, &err) != 0) return push_failure(L, &err);
  lua_pushinteger(L, n);
  return 1;
}

/* rt:delete(stream[, {expected_version =, reason =}]) -> append result */
static int l_delete(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  const char *stream = check_name(L, 2);
  int64_t expected = EBB_EXPECT_EXISTS;
  const char *reason = NULL;
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_getfield(L, 3, "expected_version");
    if (!lua_isnil(L, -1)) expected = check_expected(L, lua_gettop(L));
    lua_pop(L, 1);
    reason = opt_string_field(L, 3, "reason", NULL);
  }
  ebb_append_result r;
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_store_delete(ebb_runtime_store(rt), stream, expected, reason, &r, &err) != 0)
    return push_failure(L, &err);
  lua_createtable(L, 0, 3);
  lua_pushstring(L, stream);
  lua_setfield(L, -2, "stream");
  lua_pushinteger(L, r.version);
  lua_setfield(L, -2, "version");
  lua_pushinteger(L, r.position);
  lua_setfield(L, -2, "position");
  return 1;
}

static int l_head(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  int64_t p;
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_store_head(ebb_runtime_store(rt), &p, &err) != 0) return push_failure(L, &err);
  lua_pushinteger(L, p);
  return 1;
}

/* Pushes the result JSON as a table and frees it. */
static int push_result(lua_State *L, char *json) {
  size_t len = strlen(json);
  char msg[256];
  int rc = ebb_json_decode(L, json, len, msg, sizeof msg);
  free(json);
  if (rc != 0) return luaL_error(L, "internal: %s", msg);
  return 1;
}

/* rt:send{aggregate=, id=, type=, data=, metadata=, expected_version=, command_id=} */
static int l_send(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  ebb_command c = {0};
  c.aggregate = opt_string_field(L, 2, "aggregate", NULL);
  c.id = opt_string_field(L, 2, "id", NULL);
  c.type = opt_string_field(L, 2, "type", NULL);
  c.command_id = opt_string_field(L, 2, "command_id", NULL);
  if (!c.aggregate || !c.id || !c.type) luaL_error(L, "a command needs aggregate, id and type");
  lua_getfield(L, 2, "expected_version");
  if (!lua_isnil(L, -1)) {
    c.has_expected = 1;
    c.expected = check_expected(L, lua_gettop(L));
  }
  lua_pop(L, 1);
  ebb_buf data = EBB_BUF_INIT, meta = EBB_BUF_INIT;
  char msg[512];
  for (int k = 0; k < 2; k++) {
    ebb_buf *b = k ? &meta : &data;
    const char *name = k ? "metadata" : "data";
    int t = lua_getfield(L, 2, name);
    if (t == LUA_TSTRING) {
      /* JSON text, passed through as a client would send it */
      size_t len;
      const char *s = lua_tolstring(L, -1, &len);
      ebb_buf_append(b, s, len);
    } else if (t != LUA_TNIL && ebb_json_encode(L, -1, b, msg, sizeof msg) != 0) {
      ebb_buf_free(&data);
      ebb_buf_free(&meta);
      return luaL_error(L, "command %s: %s", name, msg);
    }
    lua_pop(L, 1);
  }
  c.data = data.len ? data.data : NULL;
  c.data_len = data.len;
  c.metadata = meta.len ? meta.data : NULL;
  c.metadata_len = meta.len;
  char *result;
  ebb_error err;
  ebb_error_init(&err);
  int rc = ebb_runtime_send(rt, &c, &result, &err);
  ebb_buf_free(&data);
  ebb_buf_free(&meta);
  if (rc != 0) return push_failure(L, &err);
  return push_result(L, result);
}

/* rt:state(aggregate, id[, {version = N} | {at = "RFC 3339"}]) */
static int l_state(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  int64_t version = -1;
  const char *at = NULL;
  if (!lua_isnoneornil(L, 4)) {
    luaL_checktype(L, 4, LUA_TTABLE);
    version = opt_int_field(L, 4, "version", -1);
    luaL_argcheck(L, version >= -1, 4, "version must not be negative");
    at = opt_string_field(L, 4, "at", NULL);
  }
  char *result;
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_runtime_state_at(rt, check_name(L, 2), check_name(L, 3), version, at,
                           &result, &err) != 0)
    return push_failure(L, &err);
  return push_result(L, result);
}

/* rt:check() -> list of problems ("file:line: message") */
static int l_check(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  ebb_buf b = EBB_BUF_INIT;
  ebb_runtime_check(rt, &b);
  lua_newtable(L);
  lua_Integer n = 0;
  const char *p = b.data;
  for (size_t i = 0, start = 0; i < b.len; i++) {
    if (b.data[i] != '\n') continue;
    lua_pushlstring(L, p + start, i - start);
    lua_rawseti(L, -2, ++n);
    start = i + 1;
  }
  ebb_buf_free(&b);
  return 1;
}

/* rt:cache_stats() -> {size, max, hits, misses, evictions} */
static int l_cache_stats(lua_State *L) {
  ebb_runtime *rt = check_rt(L);
  size_t size, max;
  uint64_t hits, misses, evictions;
  ebb_runtime_cache_stats(rt, &size, &max, &hits, &misses, &evictions);
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, (lua_Integer)size);
  lua_setfield(L, -2, "size");
  lua_pushinteger(L, (lua_Integer)max);
  lua_setfield(L, -2, "max");
  lua_pushinteger(L, (lua_Integer)hits);
  lua_setfield(L, -2, "hits");
  lua_pushinteger(L, (lua_Integer)misses);
  lua_setfield(L, -2, "misses");
  lua_pushinteger(L, (lua_Integer)evictions);
  lua_setfield(L, -2, "evictions");
  return 1;
}

static int l_uuid(lua_State *L) {
  char id[EBB_UUID_LEN + 1];
  ebb_uuid_new(id);
  lua_pushstring(L, id);
  return 1;
}

/* core.projection_db(path[, "write" | "read"[, {runner_sql = SQL}]]) -> a db
 * handle that owns its connection (and has begin/commit/rollback/close), or
 * nil, message, code. runner_sql runs on the connection directly, as the
 * runner's own statements do (unrestricted), for specs that need what only
 * the runner may make, such as _ebb_ tables. */
static int l_projection_db(lua_State *L) {
  const char *path = check_name(L, 1);
  static const char *const modes[] = {"write", "read", NULL};
  int mode = luaL_checkoption(L, 2, "write", modes) == 0 ? EBB_PROJDB_WRITE : EBB_PROJDB_READ;
  const char *runner_sql = NULL;
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    runner_sql = opt_string_field(L, 3, "runner_sql", NULL);
  }
  ebb_projdb *h;
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_projdb_open(L, path, mode, &h, &err) != 0) return push_failure(L, &err);
  char *msg = NULL;
  if (runner_sql &&
      sqlite3_exec(ebb_projdb_connection(h), runner_sql, NULL, NULL, &msg) != SQLITE_OK) {
    ebb_error_set(&err, EBB_ESTORE, "runner_sql: %s", msg ? msg : "failed");
    sqlite3_free(msg);
    ebb_projdb_close(h);
    return push_failure(L, &err);
  }
  return 1;
}

static const luaL_Reg runtime_methods[] = {
    {"append", l_append}, {"read", l_read},   {"events", l_events}, {"version", l_version},
    {"head", l_head},     {"send", l_send},   {"state", l_state},   {"check", l_check},
    {"prefetch", l_prefetch},
    {"cache_stats", l_cache_stats}, {"delete", l_delete},
    {"flush", l_flush}, {"snapshots", l_snapshots}, {"delete_snapshots", l_delete_snapshots}, {"close", l_close}, {NULL, NULL},
};

int luaopen_ebb_core(lua_State *L) {
  if (luaL_newmetatable(L, BUFSET_MT)) {
    lua_pushcfunction(L, bufset_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, RUNTIME_MT)) {
    luaL_newlib(L, runtime_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, l_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  lua_newtable(L);
  lua_pushcfunction(L, l_open);
  lua_setfield(L, -2, "open");
  lua_pushcfunction(L, l_uuid);
  lua_setfield(L, -2, "uuid");
  lua_pushcfunction(L, l_projection_db);
  lua_setfield(L, -2, "projection_db");
  lua_pushcfunction(L, ebb_serialize_lua);
  lua_setfield(L, -2, "serialize");
  lua_pushcfunction(L, ebb_deserialize_lua);
  lua_setfield(L, -2, "deserialize");
  ebb__lua_json_open(L);
  lua_newtable(L); /* the sandbox's pattern functions, for specs that compare them with Lua's */
  ebb__pattern_install(L, -1);
  lua_setfield(L, -2, "patterns");
  return 1;
}
