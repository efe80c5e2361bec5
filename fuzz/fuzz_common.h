/*
 * fuzz_common.h: what the fuzz targets share: one Lua state per process,
 * a protected call that tells a clean failure from a bug, and a deep
 * comparison of Lua values (for round trips).
 */
#ifndef EBB_FUZZ_COMMON_H
#define EBB_FUZZ_COMMON_H

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A finding: print it and abort, so libFuzzer saves the input. */
#define FUZZ_CHECK(cond, ...)                                           \
  do {                                                                  \
    if (!(cond)) {                                                      \
      fprintf(stderr, "fuzz check failed: %s: ", #cond);                \
      fprintf(stderr, __VA_ARGS__);                                     \
      fputc('\n', stderr);                                              \
      abort();                                                          \
    }                                                                   \
  } while (0)

static inline lua_State *fuzz_lua(void) {
  static lua_State *L;
  if (L == NULL) {
    L = luaL_newstate();
    if (L == NULL) abort();
  }
  return L;
}

/* Calls fn(data) protected. An error raised by fn is a finding unless it
 * is out of memory; fn reports clean failures through its return value. */
static inline void fuzz_pcall(lua_State *L, lua_CFunction fn, const unsigned char *data, size_t size) {
  lua_settop(L, 0);
  lua_pushcfunction(L, fn);
  lua_pushlightuserdata(L, (void *)data);
  lua_pushinteger(L, (lua_Integer)size);
  int rc = lua_pcall(L, 2, 0, 0);
  FUZZ_CHECK(rc == LUA_OK || rc == LUA_ERRMEM, "%s", lua_isstring(L, -1) ? lua_tostring(L, -1) : "?");
  lua_settop(L, 0);
  lua_gc(L, LUA_GCSTEP, 0); /* a full collection per input costs more than the input */
}

/* Deep equality of the values at a and b (absolute indices): same types,
 * integers and floats kept apart, floats bit for bit, tables with equal
 * metatables (by identity) and equal contents, keys compared raw (fine
 * for JSON's string and integer keys). No cycles: JSON has none. */
static inline int fuzz_equal(lua_State *L, int a, int b, int depth) {
  int t = lua_type(L, a);
  if (t != lua_type(L, b)) return 0;
  switch (t) {
    case LUA_TNUMBER:
      if (lua_isinteger(L, a) != lua_isinteger(L, b)) return 0;
      if (lua_isinteger(L, a)) return lua_tointeger(L, a) == lua_tointeger(L, b);
      {
        lua_Number x = lua_tonumber(L, a), y = lua_tonumber(L, b);
        return memcmp(&x, &y, sizeof x) == 0;
      }
    case LUA_TSTRING: {
      size_t la, lb;
      const char *sa = lua_tolstring(L, a, &la), *sb = lua_tolstring(L, b, &lb);
      return la == lb && memcmp(sa, sb, la) == 0;
    }
    case LUA_TTABLE: {
      if (depth > 300) return 1;
      luaL_checkstack(L, 8, "fuzz_equal");
      int ma = lua_getmetatable(L, a), mb = lua_getmetatable(L, b);
      int same_mt = ma == mb && (!ma || lua_rawequal(L, -1, -2));
      lua_pop(L, ma + mb);
      if (!same_mt) return 0;
      /* every key of a is in b with an equal value, and b has no more keys */
      size_t na = 0, nb = 0;
      lua_pushnil(L);
      while (lua_next(L, a)) {
        na++;
        lua_pushvalue(L, -2);
        lua_rawget(L, b);
        int eq = fuzz_equal(L, lua_gettop(L) - 1, lua_gettop(L), depth + 1);
        lua_pop(L, 2);
        if (!eq) {
          lua_pop(L, 1);
          return 0;
        }
      }
      lua_pushnil(L);
      while (lua_next(L, b)) {
        nb++;
        lua_pop(L, 1);
      }
      return na == nb;
    }
    default: return lua_rawequal(L, a, b);
  }
}

#endif
