/*
 * valuepath.c: renders the path of the value an encoder failed on, and the
 * error message around it (see valuepath.h). It owns the one spelling of a
 * path that json.c and serialize.c share, so their messages cannot drift
 * apart. Rendering happens only on failure, so it favours staying inside a
 * fixed-size buffer over speed.
 */
#include "valuepath.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>

/* Appends to a bounded path text; once full, marks it cut. A piece that
 * does not fit is dropped whole, so a cut path never ends mid-escape. */
typedef struct {
  char *s;
  size_t len, cap;
  int cut;
} pathbuf;

static void path_add(pathbuf *pb, const char *s, size_t n) {
  if (pb->cut) return;
  if (pb->len + n >= pb->cap) {
    pb->cut = 1;
    return;
  }
  memcpy(pb->s + pb->len, s, n);
  pb->len += n;
  pb->s[pb->len] = '\0';
}

/* A key that could be written as a Lua field name after a dot. ASCII only,
 * not the locale's letters, so the message does not depend on the locale. */
static int is_identifier(const char *s, size_t n) {
  if (n == 0 || (s[0] >= '0' && s[0] <= '9')) return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!(c == '_' || (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z')))
      return 0;
  }
  return 1;
}

/* Appends the key at stack index k. String keys are escaped so that a
 * message stays one printable line whatever bytes the key holds. */
static void path_key(pathbuf *pb, lua_State *L, int k) {
  char tmp[64];
  int n;
  switch (lua_type(L, k)) {
    case LUA_TSTRING: {
      size_t kn;
      const char *s = lua_tolstring(L, k, &kn);
      if (is_identifier(s, kn)) {
        path_add(pb, ".", 1);
        path_add(pb, s, kn);
        return;
      }
      path_add(pb, "[\"", 2);
      for (size_t j = 0; j < kn && !pb->cut; j++) {
        unsigned char c = (unsigned char)s[j];
        if (c == '"' || c == '\\') {
          tmp[0] = '\\';
          tmp[1] = (char)c;
          path_add(pb, tmp, 2);
        } else if (c >= 0x20 && c < 0x7F) {
          path_add(pb, s + j, 1);
        } else {
          snprintf(tmp, sizeof tmp, "\\x%02x", c);
          path_add(pb, tmp, 4);
        }
      }
      path_add(pb, "\"]", 2);
      return;
    }
    case LUA_TNUMBER:
      if (lua_isinteger(L, k)) n = snprintf(tmp, sizeof tmp, "[%lld]", (long long)lua_tointeger(L, k));
      else n = snprintf(tmp, sizeof tmp, "[%.17g]", (double)lua_tonumber(L, k));
      break;
    case LUA_TBOOLEAN: n = snprintf(tmp, sizeof tmp, "[%s]", lua_toboolean(L, k) ? "true" : "false"); break;
    case LUA_TLIGHTUSERDATA: n = snprintf(tmp, sizeof tmp, "[null]"); break;
    default: n = snprintf(tmp, sizeof tmp, "[%s]", luaL_typename(L, k)); break;
  }
  path_add(pb, tmp, (size_t)n);
}

int ebb__path_fail(const ebb__path_style *st, lua_State *L, const ebb__path_step *steps,
                   int nsteps, char *err, size_t errlen, const char *fmt, ...) {
  if (err == NULL || errlen == 0) return -1;
  char reason[160], path[384];
  size_t rcap = st->reason_cap < sizeof reason ? st->reason_cap : sizeof reason;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(reason, rcap, fmt, ap);
  va_end(ap);
  /* The path gets what err has left after the prefix, ": ", the reason and
   * the NUL, but never less than min_room, so a tiny err still names the
   * value's root. */
  size_t room = sizeof path;
  size_t fixed = strlen(st->prefix) + strlen(reason) + 3;
  if (errlen > fixed && errlen - fixed < room) room = errlen - fixed;
  if (room < st->min_room) room = st->min_room;
  pathbuf pb = {path, 0, room - 3, 0}; /* 3: room for "..." */
  path[0] = '\0';
  path_add(&pb, st->root, strlen(st->root));
  for (int i = 0; i < nsteps && !pb.cut; i++) {
    const ebb__path_step *s = &steps[i];
    if (s->kind == EBB__STEP_INDEX) {
      char tmp[32];
      int n = snprintf(tmp, sizeof tmp, "[%lld]", (long long)s->index);
      path_add(&pb, tmp, (size_t)n);
    } else if (s->kind == EBB__STEP_KEY) {
      path_key(&pb, L, s->key);
    } else {
      path_add(&pb, "[<key>]", 7);
    }
  }
  if (pb.cut) memcpy(path + pb.len, "...", 4);
  const char *sep = st->has_verb && strncmp(reason, "has ", 4) == 0 ? " " : ": ";
  snprintf(err, errlen, "%s%s%s%s", st->prefix, path, sep, reason);
  return -1;
}
