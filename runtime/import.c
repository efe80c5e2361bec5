/*
 * import.c: one line of `ebb import` (see import.h): an exported event as
 * JSON, checked and turned into owned C strings.
 */
#include "import.h"

#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "json.h"

void ebb_import_event_free(ebb_import_event *e) {
  free(e->stream);
  free(e->id);
  free(e->type);
  free(e->data);
  free(e->metadata);
  free(e->recorded_at);
  memset(e, 0, sizeof *e);
}

static char *take_string_field(lua_State *L, int t, const char *k) {
  if (lua_getfield(L, t, k) != LUA_TSTRING) luaL_error(L, "field \"%s\" must be a string", k);
  size_t len;
  const char *v = lua_tolstring(L, -1, &len);
  if (strlen(v) != len) luaL_error(L, "field \"%s\" contains a NUL character", k);
  char *s = strdup(v);
  lua_pop(L, 1);
  if (s == NULL) luaL_error(L, "out of memory");
  return s;
}

int ebb_import_parse_line(lua_State *L) {
  size_t len;
  const char *text = lua_tolstring(L, 1, &len);
  ebb_import_event *e = lua_touserdata(L, 2);
  char msg[512];
  if (ebb_json_decode_document(L, text, len, msg, sizeof msg) != 0) luaL_error(L, "%s", msg);
  if (!lua_istable(L, -1)) luaL_error(L, "an event must be a JSON object");
  int t = lua_gettop(L);
  e->stream = take_string_field(L, t, "stream");
  e->id = take_string_field(L, t, "id");
  e->type = take_string_field(L, t, "type");
  e->recorded_at = take_string_field(L, t, "recorded_at");
  /* Stored in one canonical form (UTC, milliseconds), so times compare as text. */
  int64_t ms;
  if (ebb_clock_parse(e->recorded_at, &ms) != 0)
    luaL_error(L, "field \"recorded_at\" is not an RFC 3339 time: %s", e->recorded_at);
  char *canonical = realloc(e->recorded_at, EBB_TIME_LEN + 1);
  if (canonical == NULL) luaL_error(L, "out of memory");
  e->recorded_at = canonical;
  ebb_clock_format(ms, e->recorded_at);
  if (lua_getfield(L, t, "version") != LUA_TNUMBER || !lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1)
    luaL_error(L, "field \"version\" must be a positive integer");
  e->version = lua_tointeger(L, -1);
  int st = lua_getfield(L, t, "schema");
  if (st != LUA_TNIL && (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1))
    luaL_error(L, "field \"schema\" must be a positive integer");
  e->schema = st == LUA_TNIL ? 1 : lua_tointeger(L, -1);
  lua_pop(L, 2);
  static const char *const parts[2] = {"data", "metadata"};
  for (int k = 0; k < 2; k++) {
    char **dst = k ? &e->metadata : &e->data;
    size_t *dst_len = k ? &e->metadata_len : &e->data_len;
    int ft = lua_getfield(L, t, parts[k]);
    if (ft != LUA_TNIL && (ft != LUA_TTABLE || lua_getmetatable(L, -1)))
      luaL_error(L, "field \"%s\" must be a JSON object", parts[k]);
    /* The value's own text, byte for byte, so export -> import -> export is exact. */
    const char *v;
    size_t vlen;
    if (ft == LUA_TNIL) v = "{}", vlen = 2;
    else if (ebb_json_member(text, len, parts[k], &v, &vlen) != 1)
      luaL_error(L, "field \"%s\" must be spelled without escapes", parts[k]);
    if ((*dst = malloc(vlen + 1)) == NULL) luaL_error(L, "out of memory");
    memcpy(*dst, v, vlen);
    (*dst)[vlen] = '\0';
    *dst_len = vlen;
    lua_pop(L, 1);
  }
  return 0;
}
