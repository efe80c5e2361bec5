/*
 * reactor_module.c: the Lua side of reactors (see reactor.h): loading and
 * validating a module (name, from, on, rejected, settings with their
 * environment overrides), running on[type] and rejected[type] in the
 * reactor's sandbox with their ctx (schedule, cancel, settings), and reading
 * the commands and schedules they make into C, each with its deterministic
 * command id. Everything here runs inside ebb_sandbox_call.
 */
#define _GNU_SOURCE /* vasprintf */
#include "reactor_internal.h"
#include "paths.h"

#include <ctype.h>
#include <lauxlib.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "json.h"
#include "module_dir.h"

#define MAX_KEY 200

void ebb__rcommand_clear(rcommand *c) {
  free(c->aggregate);
  free(c->id);
  free(c->type);
  free(c->data);
  free(c->command_id);
  memset(c, 0, sizeof *c);
}

void ebb__work_clear(work *w) {
  for (size_t i = 0; i < w->n_cmds; i++) {
    ebb__rcommand_clear(w->cmds[i]);
    free(w->cmds[i]);
  }
  free(w->cmds);
  for (size_t i = 0; i < w->n_ops; i++) {
    free(w->ops[i].key);
    ebb__rcommand_clear(&w->ops[i].cmd);
  }
  free(w->ops);
  for (size_t i = 0; i < w->n_rej; i++) {
    free(w->rej[i].command_id);
    free(w->rej[i].aggregate);
    free(w->rej[i].id);
    free(w->rej[i].type);
    free(w->rej[i].error);
  }
  free(w->rej);
  free(w->correlation_id);
  reactor *r = w->r;
  struct firing *fi = w->fi;
  memset(w, 0, sizeof *w);
  w->r = r;
  w->fi = fi;
}

/* Reads the command table at idx into c (raises on a malformed one). */
static void take_command(lua_State *L, int idx, rcommand *c, const char *what) {
  idx = lua_absindex(L, idx);
  if (!lua_istable(L, idx)) luaL_error(L, "%s must be a table { aggregate, id, type, data }", what);
  static const char *const fields[3] = {"aggregate", "id", "type"};
  char **dst[3] = {&c->aggregate, &c->id, &c->type};
  for (int k = 0; k < 3; k++) {
    if (lua_getfield(L, idx, fields[k]) != LUA_TSTRING || lua_rawlen(L, -1) == 0)
      luaL_error(L, "%s needs %s (a non-empty string)", what, fields[k]);
    if ((*dst[k] = strdup(lua_tostring(L, -1))) == NULL) luaL_error(L, "out of memory");
    lua_pop(L, 1);
  }
  int t = lua_getfield(L, idx, "data");
  if (t == LUA_TNIL) {
    c->data = strdup("{}");
  } else {
    if (t != LUA_TTABLE) luaL_error(L, "%s: data must be a table", what);
    ebb_buf b = EBB_BUF_INIT;
    char msg[256];
    if (ebb_json_encode(L, -1, &b, msg, sizeof msg) != 0 || b.len == 0 || b.data[0] != '{') {
      ebb_buf_free(&b);
      luaL_error(L, "%s: data must be a JSON object (%s)", what, msg);
    }
    c->data = ebb_buf_take(&b, NULL);
  }
  lua_pop(L, 1);
  if (c->data == NULL) luaL_error(L, "out of memory");
}

/* Appends the commands of the list at idx (nil or {}: none). */
static void take_commands(lua_State *L, int idx, work *w, const char *handler) {
  idx = lua_absindex(L, idx);
  if (lua_isnil(L, idx)) return;
  if (!lua_istable(L, idx))
    luaL_error(L, "%s must return a list of commands ({} for none), not a %s", handler,
               luaL_typename(L, idx));
  lua_Integer n = luaL_len(L, idx);
  for (lua_Integer i = 1; i <= n; i++) {
    rcommand **p = realloc(w->cmds, (w->n_cmds + 1) * sizeof *p);
    if (p == NULL) luaL_error(L, "out of memory");
    w->cmds = p;
    rcommand *c = calloc(1, sizeof *c);
    if (c == NULL) luaL_error(L, "out of memory");
    w->cmds[w->n_cmds++] = c;
    c->w = w;
    char what[200];
    snprintf(what, sizeof what, "%.100s: command %d", handler, (int)i);
    lua_rawgeti(L, idx, i);
    take_command(L, -1, c, what);
    lua_pop(L, 1);
    c->index = w->n_made++;
    /* Deterministic: the same event and code give the same ids after a crash. */
    c->command_id = w->parent_id
                        ? ebb_strdupf("%s/r%d", w->parent_id, (int)(i - 1))
                        : ebb_strdupf("%s:%s:%d", w->r->name, w->e->id, c->index);
    if (c->command_id == NULL) luaL_error(L, "out of memory");
  }
}

/* ctx.schedule(at_or_delay, command, key?) */
static int l_schedule(lua_State *L) {
  work *w = lua_touserdata(L, lua_upvalueindex(1));
  int64_t at;
  if (lua_type(L, 1) == LUA_TNUMBER) {
    /* A delay counts from the event's recorded time, so that a redelivery
     * sets the same time. */
    int64_t rec = 0;
    ebb_clock_parse(w->e->recorded_at, &rec);
    at = rec + (int64_t)(lua_tonumber(L, 1) * 1000.0);
  } else if (lua_type(L, 1) == LUA_TSTRING) {
    if (ebb_clock_parse(lua_tostring(L, 1), &at) != 0)
      luaL_error(L, "ctx.schedule: %s is not an RFC 3339 time", lua_tostring(L, 1));
  } else {
    return luaL_error(L, "ctx.schedule(at_or_delay, command, key?): at_or_delay must be seconds "
                         "(a number) or an RFC 3339 time (a string)");
  }
  const char *key = luaL_optstring(L, 3, NULL);
  char fallback[EBB_MAX_NAME + 16];
  if (key == NULL) {
    snprintf(fallback, sizeof fallback, "%s:%d", w->e->id, (int)w->n_ops);
    key = fallback;
  }
  if (strlen(key) == 0 || strlen(key) > MAX_KEY)
    luaL_error(L, "ctx.schedule: the key must be 1 to %d bytes", MAX_KEY);
  schedop *p = realloc(w->ops, (w->n_ops + 1) * sizeof *p);
  if (p == NULL) luaL_error(L, "out of memory");
  w->ops = p;
  schedop *op = &w->ops[w->n_ops++];
  memset(op, 0, sizeof *op);
  op->at_ms = at < 0 ? 0 : at;
  if ((op->key = strdup(key)) == NULL) luaL_error(L, "out of memory");
  take_command(L, 2, &op->cmd, "ctx.schedule's command");
  op->cmd.command_id = ebb_strdupf("%s:%s:schedule:%s", w->r->name, w->e->id, key);
  if (op->cmd.command_id == NULL) luaL_error(L, "out of memory");
  return 0;
}

/* ctx.cancel(key) */
static int l_cancel(lua_State *L) {
  work *w = lua_touserdata(L, lua_upvalueindex(1));
  const char *key = luaL_checkstring(L, 1);
  schedop *p = realloc(w->ops, (w->n_ops + 1) * sizeof *p);
  if (p == NULL) luaL_error(L, "out of memory");
  w->ops = p;
  schedop *op = &w->ops[w->n_ops++];
  memset(op, 0, sizeof *op);
  op->at_ms = -1;
  if ((op->key = strdup(key)) == NULL) luaL_error(L, "out of memory");
  return 0;
}

static void push_ctx(lua_State *L, work *w) {
  lua_createtable(L, 0, 3);
  lua_pushlightuserdata(L, w);
  lua_pushcclosure(L, l_schedule, 1);
  lua_setfield(L, -2, "schedule");
  lua_pushlightuserdata(L, w);
  lua_pushcclosure(L, l_cancel, 1);
  lua_setfield(L, -2, "cancel");
  lua_pushstring(L, w->r->name);
  lua_setfield(L, -2, "reactor");
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->r->module_ref);
  lua_getfield(L, -1, "settings");
  lua_setfield(L, -3, "settings");
  lua_pop(L, 1);
}

/* Runs on[e.type](e, ctx). Argument: the work. */
int ebb__reactor_l_on(lua_State *L) {
  work *w = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->r->module_ref);
  lua_getfield(L, -1, "on");
  if (lua_getfield(L, -1, w->e->type) != LUA_TFUNCTION) return 0;
  ebb_event_push(L, w->e, 1);
  if (lua_getfield(L, -1, "metadata") == LUA_TTABLE &&
      lua_getfield(L, -1, "correlation_id") == LUA_TSTRING &&
      (w->correlation_id = strdup(lua_tostring(L, -1))) == NULL)
    luaL_error(L, "out of memory");
  lua_settop(L, 5); /* work, module, on, handler, event */
  push_ctx(L, w);
  lua_call(L, 2, 1);
  char handler[EBB_MAX_NAME + 8];
  snprintf(handler, sizeof handler, "on.%s", w->e->type);
  take_commands(L, -1, w, handler);
  return 0;
}

/* Runs rejected[cmd.type](cmd, err, e, ctx). Arguments: the work, the
 * rejected command, the error. Pushes true when there is such a handler. */
int ebb__reactor_l_rejected(lua_State *L) {
  work *w = lua_touserdata(L, 1);
  rcommand *c = lua_touserdata(L, 2);
  const ebb_error *err = lua_touserdata(L, 3);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->r->module_ref);
  if (lua_getfield(L, -1, "rejected") != LUA_TTABLE || lua_getfield(L, -1, c->type) != LUA_TFUNCTION) {
    lua_pushboolean(L, 0);
    return 1;
  }
  char msg[256];
  lua_createtable(L, 0, 5);
  lua_pushstring(L, c->aggregate);
  lua_setfield(L, -2, "aggregate");
  lua_pushstring(L, c->id);
  lua_setfield(L, -2, "id");
  lua_pushstring(L, c->type);
  lua_setfield(L, -2, "type");
  lua_pushstring(L, c->command_id);
  lua_setfield(L, -2, "command_id");
  if (ebb_json_decode(L, c->data, strlen(c->data), msg, sizeof msg) != 0) lua_newtable(L);
  lua_setfield(L, -2, "data");
  lua_createtable(L, 0, 3);
  lua_pushstring(L, ebb_error_name(err->code));
  lua_setfield(L, -2, "code");
  lua_pushstring(L, err->message);
  lua_setfield(L, -2, "message");
  if (err->details && ebb_json_decode(L, err->details, strlen(err->details), msg, sizeof msg) == 0)
    lua_setfield(L, -2, "details");
  if (w->e) {
    ebb_event_push(L, w->e, 1);
    /* A fired schedule's work starts here: its chain is the event's. */
    if (w->correlation_id == NULL && lua_getfield(L, -1, "metadata") == LUA_TTABLE &&
        lua_getfield(L, -1, "correlation_id") == LUA_TSTRING &&
        (w->correlation_id = strdup(lua_tostring(L, -1))) == NULL)
      luaL_error(L, "out of memory");
    lua_settop(L, 9); /* work, cmd, err, module, rejected, handler, cmd, err, event */
  } else {
    lua_pushnil(L);
  }
  push_ctx(L, w);
  lua_call(L, 4, 1);
  char handler[EBB_MAX_NAME + 16];
  snprintf(handler, sizeof handler, "rejected.%s", c->type);
  w->parent_id = c->command_id;
  take_commands(L, -1, w, handler);
  w->parent_id = NULL;
  lua_pushboolean(L, 1);
  return 1;
}

char *ebb__reactor_call_error(ebb_sandbox *sb) {
  lua_State *L = ebb_sandbox_state(sb);
  const char *killed = ebb_sandbox_killed(sb);
  char *m = ebb_strdupf("%s", killed ? killed : lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1)
                                                                         : "a non-string error");
  lua_pop(L, 1);
  return m;
}


/* Validates the module (argument 1) named after its file (argument 3) and
 * fills the follower's from (argument 2). */
static int l_validate(lua_State *L) {
  ebb_follower *f = lua_touserdata(L, 2);
  const char *expected = lua_tostring(L, 3);
  int *start_now = lua_touserdata(L, 4);
  if (!lua_istable(L, 1)) luaL_error(L, "the module must return a table, not a %s", luaL_typename(L, 1));
  if (lua_getfield(L, 1, "name") != LUA_TSTRING) luaL_error(L, "missing field: name (a string)");
  if (strcmp(lua_tostring(L, -1), expected) != 0)
    luaL_error(L, "name is \"%s\", but the file is %s.lua: they must match", lua_tostring(L, -1),
               expected);
  if (lua_getfield(L, 1, "from") != LUA_TTABLE)
    luaL_error(L, "missing field: from (a list of categories or event types)");
  lua_Integer n = luaL_len(L, -1);
  if (n < 1 || n > 256) luaL_error(L, "from must list 1 to 256 categories or event types");
  for (lua_Integer i = 1; i <= n; i++) {
    if (lua_rawgeti(L, -1, i) != LUA_TSTRING) luaL_error(L, "from[%d] must be a string", (int)i);
    if (ebb_follower_add_from(f, lua_tostring(L, -1)) != 0) luaL_error(L, "out of memory");
    lua_pop(L, 1);
  }
  /* start: where a reactor without a checkpoint begins. "beginning" (the
   * default, as projections) reacts to the whole history; "now" only to
   * events committed after it first runs (a new reactor on a store with
   * history it must not act on again). */
  int ty = lua_getfield(L, 1, "start");
  if (ty != LUA_TNIL && (ty != LUA_TSTRING || (strcmp(lua_tostring(L, -1), "beginning") != 0 &&
                                               strcmp(lua_tostring(L, -1), "now") != 0)))
    luaL_error(L, "start must be \"beginning\" or \"now\"");
  *start_now = ty == LUA_TSTRING && strcmp(lua_tostring(L, -1), "now") == 0;
  lua_pop(L, 1);
  /* settings: defaults in the module, each overridden by the environment
   * variable EBB_REACTOR_<NAME>_<KEY> (upper case, other characters '_'). */
  int st = lua_getfield(L, 1, "settings");
  if (st != LUA_TNIL && st != LUA_TTABLE) luaL_error(L, "settings must be a table of defaults");
  if (st == LUA_TTABLE) {
    int t = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, t)) {
      int vt = lua_type(L, -1);
      if (lua_type(L, -2) != LUA_TSTRING ||
          (vt != LUA_TNUMBER && vt != LUA_TSTRING && vt != LUA_TBOOLEAN))
        luaL_error(L, "settings.%s must be a number, string or boolean default",
                   lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?");
      char var[300];
      int k = snprintf(var, sizeof var, "EBB_REACTOR_%s_%s", expected, lua_tostring(L, -2));
      for (int i = 12; i < k && i < (int)sizeof var; i++)
        var[i] = isalnum((unsigned char)var[i]) ? (char)toupper((unsigned char)var[i]) : '_';
      const char *v = getenv(var);
      if (v) {
        lua_pushvalue(L, -2);
        if (vt == LUA_TSTRING) {
          lua_pushstring(L, v);
        } else if (vt == LUA_TBOOLEAN) {
          if (strcmp(v, "true") && strcmp(v, "false") && strcmp(v, "1") && strcmp(v, "0"))
            luaL_error(L, "%s must be true or false, not %s", var, v);
          lua_pushboolean(L, strcmp(v, "true") == 0 || strcmp(v, "1") == 0);
        } else if (lua_stringtonumber(L, v) == 0) {
          luaL_error(L, "%s must be a number, not %s", var, v);
        }
        lua_rawset(L, t);
      }
      lua_pop(L, 1);
    }
  }
  static const char *const tables[2] = {"on", "rejected"};
  for (int k = 0; k < 2; k++) {
    int t = lua_getfield(L, 1, tables[k]);
    if (t == LUA_TNIL && k == 1) continue;
    if (t != LUA_TTABLE)
      luaL_error(L, k == 0 ? "missing field: on (a table of event handlers)"
                           : "rejected must be a table of functions by command type");
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TFUNCTION)
        luaL_error(L, "%s.%s must be a function", tables[k],
                   lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?");
      lua_pop(L, 1);
    }
  }
  return 0;
}

/* A new sandbox with the module loaded and validated; from goes into f. */
ebb_sandbox *ebb__reactor_load_module(const char *dir, const char *lua_dir, size_t memory_limit,
                                      int64_t budget, const char *name, const char *path,
                                      ebb_follower *f, int *module_ref, int *start_now,
                                      char **msg) {
  const char *dirs[1] = {dir};
  ebb_sandbox_options so = {.module_dirs = dirs, .n_module_dirs = 1, .runtime_dir = lua_dir,
                            .memory_limit = memory_limit, .instruction_budget = budget};
  ebb_error err;
  ebb_error_init(&err);
  ebb_sandbox *sb = NULL;
  if (ebb_sandbox_new(&sb, &so, &err) != 0) {
    *msg = ebb_strdupf("%s", err.message);
    return NULL;
  }
  lua_State *L = ebb_sandbox_state(sb);
  lua_pushcfunction(L, ebb__lua_prepare);
  if (ebb_sandbox_call(sb, 0, 0) != LUA_OK) {
    *msg = ebb__reactor_call_error(sb);
    goto fail;
  }
  char chunk[300];
  snprintf(chunk, sizeof chunk, "%s.lua", name);
  if (ebb_sandbox_load_file(sb, path, chunk, &err) != 0) {
    *msg = ebb_strdupf("%s", err.message);
    goto fail;
  }
  lua_pushvalue(L, -1);
  *module_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushcfunction(L, l_validate);
  lua_insert(L, -2);
  lua_pushlightuserdata(L, f);
  lua_pushstring(L, name);
  lua_pushlightuserdata(L, start_now);
  if (ebb_sandbox_call(sb, 4, 0) != LUA_OK) {
    char *m = ebb__reactor_call_error(sb);
    *msg = ebb_strdupf("%s.lua: %s", name, m ? m : "invalid");
    free(m);
    goto fail;
  }
  return sb;
fail:
  ebb_sandbox_free(sb);
  return NULL;
}

typedef struct check_ctx {
  const char *reactors_dir, *lua_dir;
  ebb_module_check out;
} check_ctx;

static void check_one(void *ud, const char *name, const char *path) {
  check_ctx *c = ud;
  char *msg = NULL;
  ebb_follower f = {0};
  int ref, start_now;
  ebb_sandbox *sb = ebb__reactor_load_module(c->reactors_dir, c->lua_dir, 0, 0, name, path, &f,
                                             &ref, &start_now, &msg);
  ebb_module_check_note(&c->out, name, sb != NULL, msg);
  free(msg);
  ebb_sandbox_free(sb);
  ebb_follower_clear(&f);
}

int ebb_reactors_check(const char *reactors_dir, const char *lua_dir, ebb_buf *report,
                       ebb_buf *names) {
  check_ctx c = {.reactors_dir = reactors_dir,
                 .lua_dir = lua_dir ? lua_dir : ebb_paths_lua_dir(),
                 .out = {.report = report, .names = names}};
  ebb_module_dir_each(reactors_dir, check_one, &c);
  return c.out.problems;
}

