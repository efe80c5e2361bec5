/*
 * lua_json.c: the Lua face of the JSON codec (json.c) inside `ebb.core`:
 * json_encode, json_decode, null and array. Failures of the data (bad JSON,
 * a value JSON cannot hold) come back as `nil, message`; misuse of the
 * functions themselves (a missing argument, a non-table to array) raises.
 */
#include <lauxlib.h>
#include <lua.h>

#include "json.h"

int ebb__lua_json_open(lua_State *L);

/* json_encode writes into a scratch ebb_buf kept in a full userdata (its
 * upvalue) rather than on the C stack: a memory error raised in the middle
 * of encoding then cannot leak the buffer (the __gc frees it), and repeated
 * calls reuse the memory. `busy` covers re-entry from a finalizer that runs
 * during an allocation and itself calls json_encode; it is cleared by
 * __close, so an error raised while encoding cannot leave it set. */
typedef struct {
  ebb_buf buf;
  int busy;
} scratch;

/* Above this, the scratch memory is returned after the call instead of kept. */
#define SCRATCH_KEEP (64 * 1024)

static int scratch_gc(lua_State *L) {
  scratch *s = lua_touserdata(L, 1);
  ebb_buf_free(&s->buf);
  return 0;
}

static int scratch_close(lua_State *L) {
  scratch *s = lua_touserdata(L, 1);
  s->busy = 0;
  return 0;
}

static scratch *new_scratch(lua_State *L) {
  scratch *s = lua_newuserdatauv(L, sizeof *s, 0);
  ebb_buf_init(&s->buf);
  s->busy = 0;
  if (luaL_newmetatable(L, "ebb.json.scratch")) {
    lua_pushcfunction(L, scratch_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, scratch_close);
    lua_setfield(L, -2, "__close");
  }
  lua_setmetatable(L, -2);
  return s;
}

/* json_encode(v) -> string | nil, message */
static int l_json_encode(lua_State *L) {
  char err[512];
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  scratch *s = lua_touserdata(L, lua_upvalueindex(1));
  if (s->busy) s = new_scratch(L); /* re-entered: a private buffer, freed by the GC */
  else lua_pushvalue(L, lua_upvalueindex(1));
  lua_toclose(L, 2);
  s->busy = 1;
  ebb_buf_reset(&s->buf);
  int rc = ebb_json_encode(L, 1, &s->buf, err, sizeof err);
  if (rc == 0) lua_pushlstring(L, s->buf.data, s->buf.len);
  lua_closeslot(L, 2);
  if (s->buf.cap > SCRATCH_KEEP) ebb_buf_free(&s->buf);
  if (rc != 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  return 1;
}

/* json_decode(s) -> value | nil, message */
static int l_json_decode(lua_State *L) {
  char err[256];
  size_t len;
  const char *text = luaL_checklstring(L, 1, &len);
  if (ebb_json_decode(L, text, len, err, sizeof err) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  return 1;
}

/* array([t]) -> t, marked as a JSON array (a new table when t is absent) */
static int l_json_array(lua_State *L) {
  if (lua_isnoneornil(L, 1)) {
    lua_settop(L, 0);
    lua_newtable(L);
  } else {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
  }
  ebb_json_push_array_mt(L);
  lua_setmetatable(L, 1);
  return 1;
}

/* Adds the functions to the table at the top of the stack; pushes nothing. */
int ebb__lua_json_open(lua_State *L) {
  int t = lua_absindex(L, -1);
  luaL_checktype(L, t, LUA_TTABLE);
  new_scratch(L);
  lua_pushcclosure(L, l_json_encode, 1);
  lua_setfield(L, t, "json_encode");
  lua_pushcfunction(L, l_json_decode);
  lua_setfield(L, t, "json_decode");
  lua_pushcfunction(L, l_json_array);
  lua_setfield(L, t, "array");
  ebb_json_push_null(L);
  lua_setfield(L, t, "null");
  return 0;
}
