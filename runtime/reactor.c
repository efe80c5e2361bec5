/*
 * reactor.c: the reactor host (see reactor.h).
 *
 * Everything runs on the daemon's loop. A reactor works one event at a time:
 * its follower reads a batch after the checkpoint; for each event the
 * handler runs (one sandboxed call) and returns commands, and may set or
 * cancel schedules; the commands go into the daemon's pipeline all at once
 * (commands for one stream keep their order there). When every command is
 * answered (committed, or rejected and compensated or recorded) the
 * checkpoint moves to the event, with its schedule changes, in one
 * transaction of reactors.db. Events whose handler did nothing move the
 * checkpoint in memory; it is written once per batch.
 *
 * Failures: a rejection goes to rejected[type], whose commands are issued in
 * turn, or is recorded; a script_error, storage failure or shutdown answer is
 * retried with backoff (the same command id, so nothing happens twice); a
 * handler error, a command the pipeline refuses as malformed, or a store that
 * cannot be read faults the reactor at the event until retry or skip.
 *
 * Schedules fire through one libuv timer armed for the earliest; a fired
 * schedule's command carries the id made when it was set, and the row goes
 * once the command is answered, so a crash in between fires it again and the
 * store answers the repeat.
 */
#define _GNU_SOURCE /* asprintf */
#include "reactor.h"

#include <ctype.h>
#include <dirent.h>
#include <lauxlib.h>
#include <lua.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "follower.h"
#include "json.h"
#include "log.h"
#include "sandbox.h"

#define BATCH 100               /* events read at once */
#define EVENTS_PER_TURN 200     /* handler calls per loop turn, so requests interleave */
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 30000
#define MAX_KEY 200

enum { ST_CATCHING_UP = EBB_FOLLOW_CATCHING_UP, ST_LIVE = EBB_FOLLOW_LIVE,
       ST_FAULTED = EBB_FOLLOW_FAULTED, ST_STOPPED = EBB_FOLLOW_STOPPED };

/* ---------------------------------------------------------------- types */

typedef struct reactor reactor;

/* A command to issue, and where it stands. */
typedef struct rcommand {
  reactor *r;
  char *aggregate, *id, *type, *data; /* data: JSON object text */
  char *command_id;
  int state;                  /* C_PENDING, C_FLIGHT, C_DONE */
  int index;                  /* in the event's list (compensations: their parent's) */
  int attempts;
} rcommand;
enum { C_PENDING, C_FLIGHT, C_DONE };

typedef struct schedop {
  char *key;
  int64_t at_ms;              /* < 0: a cancel */
  rcommand cmd;
} schedop;

typedef struct rejection {
  char *command_id, *aggregate, *id, *type, *error;
} rejection;

/* What one event's handlers asked for. */
typedef struct work {
  reactor *r;
  const ebb_event *e;
  rcommand **cmds;
  size_t n_cmds;
  schedop *ops;
  size_t n_ops;
  rejection *rej;
  size_t n_rej;
  int n_made;                 /* commands made so far (their indexes) */
  const char *parent_id;      /* a compensation's: the rejected command's id */
  char *correlation_id;       /* the event's, or NULL: it starts a chain */
} work;

struct reactor {
  struct ebb_reactors *h;
  char *name, *path;
  uint64_t code_hash;
  ebb_sandbox *sb;
  int module_ref;
  ebb_follower f;
  int64_t written;            /* the checkpoint last written */
  int state;
  char *fault;
  int64_t fault_position;
  char *load_error;
  uint64_t load_failures, reloads;
  int loaded_once;
  ebb_follower_batch batch;
  int have_batch;
  size_t at;                  /* the event of the batch in progress */
  work w;                     /* its commands (while busy) */
  int busy;                   /* commands in flight or waiting to retry */
  uv_timer_t retry;
  int64_t backoff_ms;
  char *retry_error;
  uint64_t issued, rejected, events_total, retries;
  char *last_rejection;
  int seen, removed;
  int tainted;                /* its Lua state was killed: load the code again before it runs */
  int64_t written_ms;         /* when the checkpoint was last written */
  struct reactor *link;
};

/* A fired schedule in flight. */
typedef struct firing {
  struct ebb_reactors *h;
  char *name, *key;
  rcommand cmd;
  struct firing *link;
} firing;

struct ebb_reactors {
  ebb_reactors_options o;
  char *reactors_dir, *lua_dir;
  sqlite3 *db;
  reactor *list;
  int64_t head;
  int active, stopping;
  size_t in_flight;           /* commands issued and not answered (all reactors) */
  uv_idle_t pump;
  int pumping;
  uv_timer_t sched_timer, rescan_timer;
  uv_fs_event_t watch;
  int watching;
  int handles;                /* uv handles still open */
  firing *firings;
  uint64_t fired;
};

static char *dupf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *dupf(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char *s = NULL;
  if (vasprintf(&s, fmt, ap) < 0) s = NULL;
  va_end(ap);
  return s;
}

static void schedule_pump(ebb_reactors *h);
static void arm_schedules(ebb_reactors *h);
static void maybe_free(ebb_reactors *h);

/* ---------------------------------------------------------------- reactors.db */

static const char *schema_sql =
    "CREATE TABLE IF NOT EXISTS reactor_checkpoint (name TEXT PRIMARY KEY, position INTEGER NOT "
    "NULL, event_position INTEGER, event_id TEXT, updated_at TEXT NOT NULL);"
    "CREATE TABLE IF NOT EXISTS reactor_skipped (name TEXT NOT NULL, position INTEGER NOT NULL, "
    "error TEXT, skipped_at TEXT NOT NULL, PRIMARY KEY (name, position));"
    "CREATE TABLE IF NOT EXISTS reactor_schedules (name TEXT NOT NULL, key TEXT NOT NULL, "
    "fire_at_ms INTEGER NOT NULL, aggregate TEXT NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL, "
    "data TEXT NOT NULL, command_id TEXT NOT NULL, event_id TEXT, created_at TEXT NOT NULL, "
    "PRIMARY KEY (name, key));"
    "CREATE TABLE IF NOT EXISTS reactor_rejections (name TEXT NOT NULL, position INTEGER, "
    "command_id TEXT NOT NULL, aggregate TEXT, id TEXT, type TEXT, error TEXT, at TEXT NOT NULL);";

static int exec_sql(sqlite3 *db, const char *sql, char **msg) {
  char *e = NULL;
  int rc = sqlite3_exec(db, sql, NULL, NULL, &e);
  if (rc != SQLITE_OK && msg) *msg = dupf("%s", e ? e : sqlite3_errstr(rc));
  sqlite3_free(e);
  return rc == SQLITE_OK ? 0 : -1;
}

/* Runs one statement with text/int64 arguments: "t" text, "i" int64, "n" NULL. */
static int run_sql(sqlite3 *db, const char *sql, const char *types, ...) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) return -1;
  va_list ap;
  va_start(ap, types);
  for (int i = 0; types[i]; i++) {
    if (types[i] == 't') sqlite3_bind_text(st, i + 1, va_arg(ap, const char *), -1, SQLITE_TRANSIENT);
    else if (types[i] == 'i') sqlite3_bind_int64(st, i + 1, va_arg(ap, int64_t));
    else sqlite3_bind_null(st, i + 1);
  }
  va_end(ap);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

static int write_checkpoint(reactor *r) {
  char now[EBB_TIME_LEN + 1];
  ebb_clock_format(ebb_clock_now_ms(), now);
  return run_sql(r->h->db,
                 "INSERT INTO reactor_checkpoint (name, position, event_position, event_id, "
                 "updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET position = "
                 "excluded.position, event_position = excluded.event_position, event_id = "
                 "excluded.event_id, updated_at = excluded.updated_at",
                 "tiitt", r->name, r->f.position, r->f.mark_position, r->f.mark_id, now);
}

/* Reads the reactor's checkpoint and skipped positions (none: from 0). */
static void read_checkpoint(reactor *r) {
  sqlite3_stmt *st;
  r->f.position = r->f.mark_position = 0;
  r->f.mark_id[0] = '\0';
  if (sqlite3_prepare_v2(r->h->db, "SELECT position, event_position, event_id FROM "
                         "reactor_checkpoint WHERE name = ?", -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, r->name, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) {
      r->f.position = sqlite3_column_int64(st, 0);
      r->f.mark_position = sqlite3_column_int64(st, 1);
      const char *id = (const char *)sqlite3_column_text(st, 2);
      snprintf(r->f.mark_id, sizeof r->f.mark_id, "%s", id ? id : "");
      if (r->f.mark_id[0] == '\0') r->f.mark_position = 0;
    }
    sqlite3_finalize(st);
  }
  r->written = r->f.position;
  int64_t *skipped = NULL;
  size_t n = 0;
  if (sqlite3_prepare_v2(r->h->db, "SELECT position FROM reactor_skipped WHERE name = ?", -1, &st,
                         NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, r->name, -1, SQLITE_STATIC);
    while (sqlite3_step(st) == SQLITE_ROW) {
      int64_t *p = realloc(skipped, (n + 1) * sizeof *p);
      if (p == NULL) break;
      skipped = p;
      skipped[n++] = sqlite3_column_int64(st, 0);
    }
    sqlite3_finalize(st);
  }
  ebb_follower_set_skipped(&r->f, skipped, n);
}

static int64_t count_schedules(ebb_reactors *h, const char *name) {
  sqlite3_stmt *st;
  int64_t n = 0;
  if (sqlite3_prepare_v2(h->db, "SELECT count(*) FROM reactor_schedules WHERE name = ?", -1, &st,
                         NULL) != SQLITE_OK)
    return 0;
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  if (sqlite3_step(st) == SQLITE_ROW) n = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return n;
}

/* ---------------------------------------------------------------- commands */

static void rcmd_clear(rcommand *c) {
  free(c->aggregate);
  free(c->id);
  free(c->type);
  free(c->data);
  free(c->command_id);
  memset(c, 0, sizeof *c);
}

static void work_clear(work *w) {
  for (size_t i = 0; i < w->n_cmds; i++) {
    rcmd_clear(w->cmds[i]);
    free(w->cmds[i]);
  }
  free(w->cmds);
  for (size_t i = 0; i < w->n_ops; i++) {
    free(w->ops[i].key);
    rcmd_clear(&w->ops[i].cmd);
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
  memset(w, 0, sizeof *w);
  w->r = r;
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
    c->r = w->r;
    char what[200];
    snprintf(what, sizeof what, "%.100s: command %d", handler, (int)i);
    lua_rawgeti(L, idx, i);
    take_command(L, -1, c, what);
    lua_pop(L, 1);
    c->index = w->n_made++;
    /* Deterministic: the same event and code give the same ids after a crash. */
    c->command_id = w->parent_id
                        ? dupf("%s/r%d", w->parent_id, (int)(i - 1))
                        : dupf("%s:%s:%d", w->r->name, w->e->id, c->index);
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
  op->cmd.command_id = dupf("%s:%s:schedule:%s", w->r->name, w->e->id, key);
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
static int l_on(lua_State *L) {
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
static int l_rejected(lua_State *L) {
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
  if (w->e) ebb_event_push(L, w->e, 1);
  else lua_pushnil(L);
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

static char *call_error(ebb_sandbox *sb) {
  lua_State *L = ebb_sandbox_state(sb);
  const char *killed = ebb_sandbox_killed(sb);
  char *m = dupf("%s", killed ? killed : lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1)
                                                                         : "a non-string error");
  lua_pop(L, 1);
  return m;
}

/* ---------------------------------------------------------------- faults */

static void set_fault(reactor *r, int64_t position, char *message) {
  free(r->fault);
  r->fault = message ? message : dupf("error");
  r->fault_position = position;
  r->state = ST_FAULTED;
  char pos[32];
  snprintf(pos, sizeof pos, "%lld", (long long)position);
  ebb_log(EBB_LOG_ERROR, "reactor faulted", "reactor", r->name, "#position", pos, "error",
          r->fault, NULL);
}

static void drop_batch(reactor *r) {
  if (r->have_batch) ebb_follower_batch_free(&r->batch);
  r->have_batch = 0;
  r->at = 0;
}

/* ---------------------------------------------------------------- issuing */

static void issue(reactor *r, rcommand *c);

/* Is the error one that goes away by trying again? */
static int retryable(int code) {
  return code == EBB_ESCRIPT || code == EBB_ESTORE || code == EBB_EUNAVAIL || code == EBB_EBUSY ||
         code == EBB_ENOMEM || code == EBB_ETIMEOUT || code == EBB_EVERSION;
}

static void on_retry(uv_timer_t *t) {
  reactor *r = t->data;
  if (r->h->stopping || !r->busy) return;
  for (size_t i = 0; i < r->w.n_cmds; i++)
    if (r->w.cmds[i]->state == C_PENDING) issue(r, r->w.cmds[i]);
}

/* The event's work is done: its checkpoint, schedule changes and recorded
 * rejections in one transaction. */
static int commit_event(reactor *r) {
  ebb_reactors *h = r->h;
  work *w = &r->w;
  char now[EBB_TIME_LEN + 1];
  ebb_clock_format(ebb_clock_now_ms(), now);
  char *msg = NULL;
  int64_t saved_pos = r->f.position, saved_mark = r->f.mark_position;
  char saved_id[sizeof r->f.mark_id];
  memcpy(saved_id, r->f.mark_id, sizeof saved_id);
  if (exec_sql(h->db, "BEGIN IMMEDIATE", &msg) != 0) goto fail;
  for (size_t i = 0; i < w->n_ops; i++) {
    schedop *op = &w->ops[i];
    int rc = op->at_ms < 0
                 ? run_sql(h->db, "DELETE FROM reactor_schedules WHERE name = ? AND key = ?", "tt",
                           r->name, op->key)
                 : run_sql(h->db,
                           "INSERT OR REPLACE INTO reactor_schedules (name, key, fire_at_ms, "
                           "aggregate, id, type, data, command_id, event_id, created_at) VALUES "
                           "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           "ttitttttt" "t", r->name, op->key, op->at_ms, op->cmd.aggregate,
                           op->cmd.id, op->cmd.type, op->cmd.data, op->cmd.command_id, w->e->id,
                           now);
    if (rc != 0) goto fail;
  }
  for (size_t i = 0; i < w->n_rej; i++)
    if (run_sql(h->db,
                "INSERT INTO reactor_rejections (name, position, command_id, aggregate, id, type, "
                "error, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                "titttttt", r->name, w->e->position, w->rej[i].command_id, w->rej[i].aggregate,
                w->rej[i].id, w->rej[i].type, w->rej[i].error, now) != 0)
      goto fail;
  r->f.position = w->e->position;
  ebb_follower_mark(&r->f, w->e);
  if (write_checkpoint(r) != 0 || exec_sql(h->db, "COMMIT", &msg) != 0) goto fail;
  r->written = r->f.position;
  if (w->n_ops) arm_schedules(h);
  return 0;
fail:
  if (msg == NULL) msg = dupf("reactors.db: %s", sqlite3_errmsg(h->db));
  exec_sql(h->db, "ROLLBACK", NULL);
  r->f.position = saved_pos;
  r->f.mark_position = saved_mark;
  memcpy(r->f.mark_id, saved_id, sizeof saved_id);
  set_fault(r, w->e->position, dupf("cannot store the checkpoint: %s", msg));
  free(msg);
  return -1;
}

/* All commands answered? Then the event is done. */
static void maybe_done(reactor *r) {
  if (!r->busy) return; /* finished already (an answer that came at once) */
  for (size_t i = 0; i < r->w.n_cmds; i++)
    if (r->w.cmds[i]->state != C_DONE) return;
  r->busy = 0;
  r->backoff_ms = 0;
  free(r->retry_error);
  r->retry_error = NULL;
  if (r->removed || r->h->stopping) {
    work_clear(&r->w);
    return;
  }
  if (r->state != ST_FAULTED && commit_event(r) == 0) {
    r->events_total++;
    r->at++;
  }
  work_clear(&r->w);
  schedule_pump(r->h);
}

static void free_reactor(reactor *r);

static void on_issued(void *ud, const ebb_error *err) {
  rcommand *c = ud;
  reactor *r = c->r;
  ebb_reactors *h = r->h;
  h->in_flight--;
  c->state = C_DONE;
  if (r->removed || h->stopping) {
    int idle = 1;
    for (size_t i = 0; i < r->w.n_cmds; i++) idle &= r->w.cmds[i]->state != C_FLIGHT;
    if (idle && r->removed) {
      r->busy = 0;
      free_reactor(r);
    }
    maybe_free(h);
    return;
  }
  if (err->code == 0) {
    r->issued++;
  } else if (err->code == EBB_EREJECTED || err->code == EBB_EDELETED) {
    r->rejected++;
    free(r->last_rejection);
    r->last_rejection = dupf("%s %s on %s %s: %s", c->command_id, c->type, c->aggregate, c->id,
                             err->message);
    /* rejected[type] compensates with commands of its own; else recorded. */
    lua_State *L = ebb_sandbox_state(r->sb);
    lua_pushcfunction(L, l_rejected);
    lua_pushlightuserdata(L, &r->w);
    lua_pushlightuserdata(L, c);
    lua_pushlightuserdata(L, (void *)err);
    size_t before = r->w.n_cmds;
    if (ebb_sandbox_call(r->sb, 3, 1) != LUA_OK) {
      r->tainted = ebb_sandbox_killed(r->sb) != NULL;
      char *m = call_error(r->sb);
      set_fault(r, r->w.e->position, dupf("event %lld (%s in %s): rejected.%s: %s",
                                         (long long)r->w.e->position, r->w.e->type,
                                         r->w.e->stream, c->type, m ? m : "error"));
      free(m);
    } else {
      int handled = lua_toboolean(L, -1);
      lua_pop(L, 1);
      if (!handled) {
        rejection *p = realloc(r->w.rej, (r->w.n_rej + 1) * sizeof *p);
        if (p) {
          r->w.rej = p;
          p[r->w.n_rej++] = (rejection){strdup(c->command_id), strdup(c->aggregate),
                                        strdup(c->id), strdup(c->type), strdup(err->message)};
        }
      }
      for (size_t i = before; i < r->w.n_cmds; i++)
        if (r->w.cmds[i]->state == C_PENDING) issue(r, r->w.cmds[i]);
    }
  } else if (retryable(err->code)) {
    c->state = C_PENDING;
    c->attempts++;
    r->retries++;
    free(r->retry_error);
    r->retry_error = dupf("%s %s: %s", c->command_id, ebb_error_name(err->code), err->message);
    r->backoff_ms = r->backoff_ms ? r->backoff_ms * 2 : BACKOFF_MIN_MS;
    if (r->backoff_ms > BACKOFF_MAX_MS) r->backoff_ms = BACKOFF_MAX_MS;
    ebb_log(EBB_LOG_WARN, "reactor command failed; retrying with backoff", "reactor", r->name,
            "command_id", c->command_id, "error", err->message, NULL);
    uv_timer_start(&r->retry, on_retry, (uint64_t)r->backoff_ms, 0);
    return;
  } else {
    /* Malformed, unknown aggregate or command, a command id taken: the
     * handler is wrong, not the moment. */
    set_fault(r, r->w.e->position,
              dupf("event %lld (%s in %s): command %s (%s on %s %s) failed: %s: %s",
                   (long long)r->w.e->position, r->w.e->type, r->w.e->stream, c->command_id,
                   c->type, c->aggregate, c->id, ebb_error_name(err->code), err->message));
  }
  maybe_done(r);
}

static void issue(reactor *r, rcommand *c) {
  ebb_reactors *h = r->h;
  const ebb_event *e = r->w.e;
  /* correlation: the event's (or, at the start of a chain, the event itself);
   * causation: the event. */
  ebb_buf meta = EBB_BUF_INIT;
  ebb_buf_puts(&meta, "{\"correlation_id\":");
  const char *corr = r->w.correlation_id ? r->w.correlation_id : e->id;
  ebb_buf_json_string(&meta, corr, strlen(corr));
  ebb_buf_puts(&meta, ",\"causation_id\":");
  ebb_buf_json_string(&meta, e->id, strlen(e->id));
  ebb_buf_puts(&meta, ",\"reactor\":");
  ebb_buf_json_string(&meta, r->name, strlen(r->name));
  ebb_buf_putc(&meta, '}');
  ebb_command cmd = {.aggregate = c->aggregate, .id = c->id, .type = c->type, .data = c->data,
                     .data_len = strlen(c->data), .metadata = ebb_buf_cstr(&meta),
                     .metadata_len = meta.len, .command_id = c->command_id};
  c->state = C_FLIGHT;
  r->busy = 1;
  h->in_flight++;
  h->o.issue(h->o.issue_ud, &cmd, on_issued, c);
  ebb_buf_free(&meta);
}

/* ---------------------------------------------------------------- following */

/* Runs the handler of the batch's current event. 1: commands are in flight
 * (wait), 0: done with it, -1: faulted. */
static int handle_event(reactor *r) {
  const ebb_event *e = &r->batch.events.items[r->at];
  work_clear(&r->w);
  r->w.r = r;
  r->w.e = e;
  lua_State *L = ebb_sandbox_state(r->sb);
  lua_pushcfunction(L, l_on);
  lua_pushlightuserdata(L, &r->w);
  if (ebb_sandbox_call(r->sb, 1, 0) != LUA_OK) {
    r->tainted = ebb_sandbox_killed(r->sb) != NULL;
    char *m = call_error(r->sb);
    set_fault(r, e->position, dupf("event %lld (%s in %s): %s", (long long)e->position, e->type,
                                   e->stream, m ? m : "error"));
    free(m);
    work_clear(&r->w);
    return -1;
  }
  if (r->w.n_cmds == 0) {
    if (r->w.n_ops == 0) {
      /* Nothing to make durable: the checkpoint moves in memory. */
      r->f.position = e->position;
      ebb_follower_mark(&r->f, e);
      r->events_total++;
      r->at++;
      work_clear(&r->w);
      return 0;
    }
    int rc = commit_event(r);
    if (rc == 0) {
      r->events_total++;
      r->at++;
    }
    work_clear(&r->w);
    return rc;
  }
  /* An answer may come at once (a rejection, a command id the store
   * knows) and add compensations, which that answer issues itself: only
   * the pending ones go out here. */
  for (size_t i = 0; i < r->w.n_cmds; i++)
    if (r->w.cmds[i]->state == C_PENDING) issue(r, r->w.cmds[i]);
  /* Every answer may have come back at once (a command id answered from the store). */
  return r->busy ? 1 : r->state == ST_FAULTED ? -1 : 0;
}

/* Writes a checkpoint that moved past events the reactor did nothing for.
 * Losing it costs only running those handlers again (they issued nothing),
 * so it is written at most once a second while events flow, and when the
 * reactor has caught up. */
static void lazy_checkpoint(reactor *r, int caught_up) {
  int64_t now = ebb_clock_now_ms();
  if (r->written == r->f.position || (!caught_up && now - r->written_ms < 1000)) return;
  if (write_checkpoint(r) == 0) {
    r->written = r->f.position;
    r->written_ms = now;
  }
}

/* Works the reactor until it waits for answers, is done, or used its turn. */
static void advance(reactor *r, int *budget) {
  ebb_reactors *h = r->h;
  while (*budget > 0 && !r->busy && r->sb && r->state != ST_FAULTED && r->state != ST_STOPPED) {
    if (!r->have_batch) {
      if (r->f.position >= h->head) {
        lazy_checkpoint(r, 1);
        r->state = ST_LIVE;
        return;
      }
      ebb_error err;
      ebb_error_init(&err);
      int rc = ebb_follower_read(&r->f, h->o.rt, h->head, BATCH, &r->batch, &err);
      if (rc < 0) {
        set_fault(r, rc == -2 && r->batch.events.n ? r->batch.events.items[0].position
                                                  : r->f.position + 1,
                  rc == -1 ? dupf("cannot read the events after position %lld: %s",
                                  (long long)r->f.position, err.message)
                           : dupf("%s", err.message));
        ebb_follower_batch_free(&r->batch);
        ebb_error_clear(&err);
        return;
      }
      if (rc == 0) {
        ebb_follower_batch_free(&r->batch);
        continue;
      }
      r->have_batch = 1;
      r->at = 0;
      if (h->head - r->f.position > BATCH) r->state = ST_CATCHING_UP;
    }
    if (r->at < r->batch.n) {
      (*budget)--;
      if (handle_event(r) != 0) return; /* in flight, or faulted */
      continue;
    }
    /* The batch is through: the checkpoint goes to where the follower read. */
    const ebb_event *bad = r->batch.bad;
    if (bad) {
      char *why = dupf("event %lld (%s in %s): %s", (long long)bad->position, bad->type,
                       bad->stream, bad->upcast_error);
      r->f.position = r->batch.checkpoint;
      drop_batch(r);
      if (write_checkpoint(r) == 0) r->written = r->f.position;
      set_fault(r, r->f.position + 1, why);
      return;
    }
    r->f.position = r->batch.checkpoint;
    drop_batch(r);
    lazy_checkpoint(r, 0);
  }
}

static void on_pump(uv_idle_t *idle) {
  ebb_reactors *h = idle->data;
  uv_idle_stop(idle);
  h->pumping = 0;
  if (h->stopping || !h->active) return;
  int budget = EVENTS_PER_TURN;
  for (reactor *r = h->list; r; r = r->link) advance(r, &budget);
  if (budget <= 0) schedule_pump(h);
}

static void schedule_pump(ebb_reactors *h) {
  if (h->pumping || h->stopping || !h->active) return;
  h->pumping = 1;
  uv_idle_start(&h->pump, on_pump);
}

/* ---------------------------------------------------------------- schedules */

static void on_fired(void *ud, const ebb_error *err) {
  firing *fi = ud;
  ebb_reactors *h = fi->h;
  h->in_flight--;
  for (firing **pp = &h->firings; *pp; pp = &(*pp)->link)
    if (*pp == fi) {
      *pp = fi->link;
      break;
    }
  if (!h->stopping) {
    reactor *r = h->list;
    while (r && strcmp(r->name, fi->name) != 0) r = r->link;
    if (retryable(err->code)) {
      if (r) {
        r->retries++;
        free(r->retry_error);
        r->retry_error = dupf("schedule %s: %s: %s", fi->key, ebb_error_name(err->code),
                              err->message);
      }
      /* The row stays: the timer fires it again after a pause. */
      run_sql(h->db, "UPDATE reactor_schedules SET fire_at_ms = ? WHERE name = ? AND key = ?",
              "itt", ebb_clock_now_ms() + 1000, fi->name, fi->key);
    } else {
      char now[EBB_TIME_LEN + 1];
      ebb_clock_format(ebb_clock_now_ms(), now);
      exec_sql(h->db, "BEGIN IMMEDIATE", NULL);
      if (err->code != 0)
        run_sql(h->db,
                "INSERT INTO reactor_rejections (name, position, command_id, aggregate, id, "
                "type, error, at) VALUES (?, NULL, ?, ?, ?, ?, ?, ?)",
                "ttttttt", fi->name, fi->cmd.command_id, fi->cmd.aggregate, fi->cmd.id,
                fi->cmd.type, err->message, now);
      run_sql(h->db, "DELETE FROM reactor_schedules WHERE name = ? AND key = ? AND command_id = ?",
              "ttt", fi->name, fi->key, fi->cmd.command_id);
      exec_sql(h->db, "COMMIT", NULL);
      if (r && err->code == 0) r->issued++;
      if (r && err->code != 0) {
        r->rejected++;
        free(r->last_rejection);
        r->last_rejection = dupf("%s %s on %s %s: %s", fi->cmd.command_id, fi->cmd.type,
                                 fi->cmd.aggregate, fi->cmd.id, err->message);
      }
      h->fired++;
    }
    arm_schedules(h);
  }
  free(fi->name);
  free(fi->key);
  rcmd_clear(&fi->cmd);
  free(fi);
  maybe_free(h);
}

static int in_flight(ebb_reactors *h, const char *name, const char *key) {
  for (firing *fi = h->firings; fi; fi = fi->link)
    if (strcmp(fi->name, name) == 0 && strcmp(fi->key, key) == 0) return 1;
  return 0;
}

static void on_sched_timer(uv_timer_t *t) {
  ebb_reactors *h = t->data;
  if (h->stopping || !h->active) return;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(h->db, "SELECT name, key, aggregate, id, type, data, command_id FROM "
                         "reactor_schedules WHERE fire_at_ms <= ? ORDER BY fire_at_ms", -1, &st,
                         NULL) != SQLITE_OK)
    return;
  sqlite3_bind_int64(st, 1, ebb_clock_now_ms());
  firing *due = NULL;
  while (sqlite3_step(st) == SQLITE_ROW) {
    const char *name = (const char *)sqlite3_column_text(st, 0);
    const char *key = (const char *)sqlite3_column_text(st, 1);
    if (in_flight(h, name, key)) continue;
    firing *fi = calloc(1, sizeof *fi);
    if (fi == NULL) break;
    fi->h = h;
    fi->name = strdup(name);
    fi->key = strdup(key);
    fi->cmd.aggregate = strdup((const char *)sqlite3_column_text(st, 2));
    fi->cmd.id = strdup((const char *)sqlite3_column_text(st, 3));
    fi->cmd.type = strdup((const char *)sqlite3_column_text(st, 4));
    fi->cmd.data = strdup((const char *)sqlite3_column_text(st, 5));
    fi->cmd.command_id = strdup((const char *)sqlite3_column_text(st, 6));
    fi->link = due;
    due = fi;
  }
  sqlite3_finalize(st);
  while (due) {
    firing *fi = due;
    due = fi->link;
    fi->link = h->firings;
    h->firings = fi;
    ebb_buf m = EBB_BUF_INIT;
    ebb_buf_puts(&m, "{\"reactor\":");
    ebb_buf_json_string(&m, fi->name, strlen(fi->name));
    ebb_buf_puts(&m, ",\"schedule\":");
    ebb_buf_json_string(&m, fi->key, strlen(fi->key));
    ebb_buf_putc(&m, '}');
    ebb_command cmd = {.aggregate = fi->cmd.aggregate, .id = fi->cmd.id, .type = fi->cmd.type,
                       .data = fi->cmd.data, .data_len = strlen(fi->cmd.data),
                       .metadata = ebb_buf_cstr(&m), .metadata_len = m.len,
                       .command_id = fi->cmd.command_id};
    h->in_flight++;
    h->o.issue(h->o.issue_ud, &cmd, on_fired, fi);
    ebb_buf_free(&m);
  }
  arm_schedules(h);
}

/* Arms the timer for the earliest schedule not in flight (due ones: now). */
static void arm_schedules(ebb_reactors *h) {
  if (h->stopping) return;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(h->db, "SELECT name, key, fire_at_ms FROM reactor_schedules ORDER BY "
                         "fire_at_ms", -1, &st, NULL) != SQLITE_OK)
    return;
  int64_t next = -1;
  while (sqlite3_step(st) == SQLITE_ROW) {
    if (in_flight(h, (const char *)sqlite3_column_text(st, 0),
                  (const char *)sqlite3_column_text(st, 1)))
      continue;
    next = sqlite3_column_int64(st, 2);
    break;
  }
  sqlite3_finalize(st);
  uv_timer_stop(&h->sched_timer);
  if (next < 0) return;
  int64_t wait = next - ebb_clock_now_ms();
  uv_timer_start(&h->sched_timer, on_sched_timer, wait > 0 ? (uint64_t)wait : 0, 0);
}

/* ---------------------------------------------------------------- modules */

/* Validates the module (argument 1) named after its file (argument 3) and
 * fills the follower's from (argument 2). */
static int l_validate(lua_State *L) {
  ebb_follower *f = lua_touserdata(L, 2);
  const char *expected = lua_tostring(L, 3);
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
static ebb_sandbox *load_module(const char *dir, const char *lua_dir, size_t memory_limit,
                                int64_t budget, const char *name, const char *path,
                                ebb_follower *f, int *module_ref, char **msg) {
  const char *dirs[1] = {dir};
  ebb_sandbox_options so = {.module_dirs = dirs, .n_module_dirs = 1, .runtime_dir = lua_dir,
                            .memory_limit = memory_limit, .instruction_budget = budget};
  ebb_error err;
  ebb_error_init(&err);
  ebb_sandbox *sb = NULL;
  if (ebb_sandbox_new(&sb, &so, &err) != 0) {
    *msg = dupf("%s", err.message);
    return NULL;
  }
  lua_State *L = ebb_sandbox_state(sb);
  lua_pushcfunction(L, ebb__lua_prepare);
  if (ebb_sandbox_call(sb, 0, 0) != LUA_OK) {
    *msg = call_error(sb);
    goto fail;
  }
  char chunk[300];
  snprintf(chunk, sizeof chunk, "%s.lua", name);
  if (ebb_sandbox_load_file(sb, path, chunk, &err) != 0) {
    *msg = dupf("%s", err.message);
    goto fail;
  }
  lua_pushvalue(L, -1);
  *module_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushcfunction(L, l_validate);
  lua_insert(L, -2);
  lua_pushlightuserdata(L, f);
  lua_pushstring(L, name);
  if (ebb_sandbox_call(sb, 3, 0) != LUA_OK) {
    char *m = call_error(sb);
    *msg = dupf("%s.lua: %s", name, m ? m : "invalid");
    free(m);
    goto fail;
  }
  return sb;
fail:
  ebb_sandbox_free(sb);
  return NULL;
}

static void load_reactor(ebb_reactors *h, reactor *r) {
  char *msg = NULL;
  ebb_follower nf = {0};
  int ref = LUA_NOREF;
  ebb_sandbox *sb = load_module(h->reactors_dir, h->lua_dir, h->o.memory_limit,
                                h->o.instruction_budget, r->name, r->path, &nf, &ref, &msg);
  if (sb == NULL) {
    ebb_follower_clear(&nf);
    r->load_failures++;
    free(r->load_error);
    r->load_error = msg ? msg : dupf("cannot load %s", r->path);
    ebb_log(EBB_LOG_ERROR, "reactor failed to load; what ran before stays", "reactor", r->name,
            "error", r->load_error, NULL);
    if (r->sb == NULL) r->state = ST_STOPPED;
    return;
  }
  /* The new code takes over where the old one is: checkpoint and skipped stay. */
  ebb_sandbox_free(r->sb);
  r->sb = sb;
  r->module_ref = ref;
  for (size_t i = 0; i < r->f.n_from; i++) free(r->f.from[i]);
  free(r->f.from);
  r->f.from = nf.from;
  r->f.n_from = nf.n_from;
  free(nf.skipped);
  if (!r->busy) drop_batch(r); /* read again with the new `from` */
  free(r->load_error);
  r->load_error = NULL;
  if (r->loaded_once) {
    r->reloads++;
    ebb_log(EBB_LOG_INFO, "reactor reloaded", "reactor", r->name, NULL);
  } else {
    read_checkpoint(r);
    int64_t head = 0;
    ebb_error err;
    ebb_error_init(&err);
    if (ebb_store_head(ebb_runtime_store(h->o.rt), &head, &err) == 0 && r->f.position > head) {
      /* The store lost its last events (restored, or commits lost in an OS
       * crash at durability normal): what it holds up to its head was
       * handled, and what comes at the reused positions is new. */
      char a[32], b[32];
      snprintf(a, sizeof a, "%lld", (long long)r->f.position);
      snprintf(b, sizeof b, "%lld", (long long)head);
      ebb_log(EBB_LOG_WARN, "reactor checkpoint is past the store's head: resuming at the head",
              "reactor", r->name, "#checkpoint", a, "#head", b, NULL);
      r->f.position = head;
      r->f.mark_position = 0;
      r->f.mark_id[0] = '\0';
      if (write_checkpoint(r) == 0) r->written = head;
    }
    ebb_error_clear(&err);
    char *why = ebb_follower_ahead(&r->f, ebb_runtime_store(h->o.rt), "the reactor");
    if (why) {
      /* Other events hold the positions it saw: which of them it handled is
       * unknown, and reacting again from 0 would issue commands for events
       * long handled. An operator decides (skip moves past the event). */
      set_fault(r, r->f.position, why);
    }
  }
  r->loaded_once = 1;
  if (r->state == ST_STOPPED) r->state = ST_CATCHING_UP;
}

static void close_free(uv_handle_t *handle) {
  free(handle->data);
}

static void free_reactor(reactor *r) {
  drop_batch(r);
  work_clear(&r->w);
  ebb_sandbox_free(r->sb);
  ebb_follower_clear(&r->f);
  free(r->name);
  free(r->path);
  free(r->fault);
  free(r->load_error);
  free(r->retry_error);
  free(r->last_rejection);
  uv_timer_stop(&r->retry);
  r->retry.data = r;
  uv_close((uv_handle_t *)&r->retry, close_free);
}

static uint64_t hash_file(const char *path, int *ok) {
  uint64_t x = 1469598103934665603ull;
  FILE *f = fopen(path, "rb");
  *ok = f != NULL;
  if (!f) return 0;
  char buf[8192];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0)
    for (size_t i = 0; i < n; i++) x = (x ^ (unsigned char)buf[i]) * 1099511628211ull;
  fclose(f);
  return x;
}

static void scan(ebb_reactors *h) {
  for (reactor *r = h->list; r; r = r->link) r->seen = 0;
  DIR *dir = opendir(h->reactors_dir);
  if (dir) {
    struct dirent *de;
    while ((de = readdir(dir)) != NULL) {
      size_t n = strlen(de->d_name);
      if (n < 5 || strcmp(de->d_name + n - 4, ".lua") != 0 || de->d_name[0] == '.') continue;
      char *name = dupf("%.*s", (int)(n - 4), de->d_name);
      char *path = dupf("%s/%s", h->reactors_dir, de->d_name);
      int ok;
      uint64_t hash = path ? hash_file(path, &ok) : (ok = 0);
      if (!name || !ok) {
        free(name);
        free(path);
        continue;
      }
      reactor *r = h->list;
      while (r && strcmp(r->name, name) != 0) r = r->link;
      if (r == NULL) {
        if ((r = calloc(1, sizeof *r)) == NULL) {
          free(name);
          free(path);
          continue;
        }
        r->h = h;
        r->name = name;
        r->path = path;
        r->w.r = r;
        r->module_ref = LUA_NOREF;
        r->state = ST_STOPPED;
        uv_timer_init(h->o.loop, &r->retry);
        r->retry.data = r;
        r->link = h->list;
        h->list = r;
        r->code_hash = hash;
        load_reactor(h, r);
      } else {
        free(name);
        free(path);
        if (r->code_hash != hash || r->sb == NULL) {
          r->code_hash = hash;
          load_reactor(h, r);
        }
      }
      r->seen = 1;
    }
    closedir(dir);
  }
  for (reactor **pp = &h->list; *pp;) {
    reactor *r = *pp;
    if (r->seen) {
      pp = &r->link;
      continue;
    }
    /* Removed: its checkpoint and schedules stay, so putting it back resumes. */
    ebb_log(EBB_LOG_INFO, "reactor removed", "reactor", r->name, NULL);
    *pp = r->link;
    int flying = 0;
    for (size_t i = 0; i < r->w.n_cmds; i++) flying |= r->w.cmds[i]->state == C_FLIGHT;
    if (flying) r->removed = 1; /* freed when its last answer comes */
    else free_reactor(r);
  }
  schedule_pump(h);
}

int ebb_reactors_check(const char *reactors_dir, const char *lua_dir, ebb_buf *report,
                       ebb_buf *names) {
  int problems = 0;
  DIR *dir = opendir(reactors_dir);
  if (dir == NULL) return 0;
  struct dirent *de;
  while ((de = readdir(dir)) != NULL) {
    size_t n = strlen(de->d_name);
    if (n < 5 || strcmp(de->d_name + n - 4, ".lua") != 0 || de->d_name[0] == '.') continue;
    char name[256];
    snprintf(name, sizeof name, "%.*s", (int)(n - 4), de->d_name);
    char *path = dupf("%s/%s", reactors_dir, de->d_name);
    char *msg = NULL;
    ebb_follower f = {0};
    int ref;
    ebb_sandbox *sb = path ? load_module(reactors_dir, lua_dir ? lua_dir : EBB_LUA_DIR, 0, 0, name,
                                         path, &f, &ref, &msg)
                           : NULL;
    if (sb == NULL) {
      ebb_buf_printf(report, "%s\n", msg ? msg : "out of memory");
      problems++;
    } else if (names) {
      if (names->len) ebb_buf_putc(names, ',');
      ebb_buf_json_string(names, name, strlen(name));
    }
    free(msg);
    ebb_sandbox_free(sb);
    ebb_follower_clear(&f);
    free(path);
  }
  closedir(dir);
  return problems;
}

/* ---------------------------------------------------------------- life cycle */

static void on_rescan_timer(uv_timer_t *t) {
  ebb_reactors_rescan(t->data);
}

static void on_dir_changed(uv_fs_event_t *w, const char *file, int events, int status) {
  (void)file;
  (void)events;
  (void)status;
  ebb_reactors *h = w->data;
  /* Editors write in several steps: one rescan once the burst is over. */
  uv_timer_start(&h->rescan_timer, on_rescan_timer, 100, 0);
}

int ebb_reactors_start(ebb_reactors **out, const ebb_reactors_options *opt, ebb_error *err) {
  *out = NULL;
  ebb_reactors *h = calloc(1, sizeof *h);
  if (h == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  h->o = *opt;
  h->active = 1;
  h->reactors_dir = strdup(opt->reactors_dir);
  h->lua_dir = strdup(opt->lua_dir ? opt->lua_dir : EBB_LUA_DIR);
  char *path = dupf("%s/reactors.db", opt->data_dir);
  char *msg = NULL;
  if (!h->reactors_dir || !h->lua_dir || !path) {
    ebb_error_set(err, EBB_ENOMEM, "out of memory");
    goto fail;
  }
  if (sqlite3_open_v2(path, &h->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) != SQLITE_OK) {
    ebb_error_set(err, EBB_ESTORE, "cannot open %s: %s", path,
                  h->db ? sqlite3_errmsg(h->db) : "out of memory");
    goto fail;
  }
  sqlite3_busy_timeout(h->db, 5000);
  /* As durable as the store: what it records decides whether a command is
   * issued again (harmless: the store answers) or a schedule is lost (not). */
  if (exec_sql(h->db, opt->durability == EBB_DURABILITY_FULL
                          ? "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                          : "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
               &msg) != 0 ||
      exec_sql(h->db, schema_sql, &msg) != 0) {
    ebb_error_set(err, EBB_ESTORE, "%s: %s", path, msg ? msg : "cannot set up");
    goto fail;
  }
  free(path);
  path = NULL;
  if (ebb_store_head(ebb_runtime_store(opt->rt), &h->head, err) != 0) goto fail;
  uv_idle_init(opt->loop, &h->pump);
  uv_timer_init(opt->loop, &h->sched_timer);
  uv_timer_init(opt->loop, &h->rescan_timer);
  h->pump.data = h->sched_timer.data = h->rescan_timer.data = h;
  h->handles = 3;
  if (uv_fs_event_init(opt->loop, &h->watch) == 0) {
    h->watch.data = h;
    h->watching = 1;
    h->handles++;
    if (uv_fs_event_start(&h->watch, on_dir_changed, h->reactors_dir, 0) != 0)
      ebb_log(EBB_LOG_WARN, "cannot watch the reactors directory: edits need SIGHUP", "dir",
              h->reactors_dir, NULL);
  }
  scan(h);
  arm_schedules(h);
  *out = h;
  return 0;
fail:
  free(msg);
  free(path);
  if (h->db) sqlite3_close(h->db);
  free(h->reactors_dir);
  free(h->lua_dir);
  free(h);
  return err->code;
}

static void on_handle_closed(uv_handle_t *handle) {
  ebb_reactors *h = handle->data;
  if (--h->handles == 0) {
    free(h->reactors_dir);
    free(h->lua_dir);
    free(h);
  }
}

/* Frees the host once it is stopping and no answer is outstanding. */
static void maybe_free(ebb_reactors *h) {
  if (!h->stopping || h->in_flight > 0 || h->db == NULL) return;
  while (h->list) {
    reactor *r = h->list;
    h->list = r->link;
    free_reactor(r);
  }
  sqlite3_close(h->db);
  h->db = NULL;
  uv_close((uv_handle_t *)&h->pump, on_handle_closed);
  uv_close((uv_handle_t *)&h->sched_timer, on_handle_closed);
  uv_close((uv_handle_t *)&h->rescan_timer, on_handle_closed);
  if (h->watching) uv_close((uv_handle_t *)&h->watch, on_handle_closed);
}

void ebb_reactors_stop(ebb_reactors *h) {
  if (h == NULL || h->stopping) return;
  h->stopping = 1;
  uv_idle_stop(&h->pump);
  uv_timer_stop(&h->sched_timer);
  uv_timer_stop(&h->rescan_timer);
  if (h->watching) uv_fs_event_stop(&h->watch);
  for (reactor *r = h->list; r; r = r->link) uv_timer_stop(&r->retry);
  maybe_free(h);
}

void ebb_reactors_set_active(ebb_reactors *h, int active) {
  h->active = active;
  if (active) {
    arm_schedules(h);
    schedule_pump(h);
  } else {
    uv_timer_stop(&h->sched_timer);
  }
}

void ebb_reactors_notify(ebb_reactors *h, int64_t head) {
  if (head <= h->head) return;
  h->head = head;
  schedule_pump(h);
}

void ebb_reactors_rescan(ebb_reactors *h) {
  if (h->stopping) return;
  scan(h);
}

/* ---------------------------------------------------------------- status */

static reactor *find(ebb_reactors *h, const char *name) {
  for (reactor *r = h->list; r; r = r->link)
    if (strcmp(r->name, name) == 0) return r;
  return NULL;
}

static void json_str_or_null(ebb_buf *b, const char *s) {
  if (s) ebb_buf_json_string(b, s, strlen(s));
  else ebb_buf_puts(b, "null");
}

static void status_json(ebb_reactors *h, reactor *r, ebb_buf *b) {
  ebb_buf_puts(b, "{\"name\":");
  ebb_buf_json_string(b, r->name, strlen(r->name));
  int64_t lag = h->head > r->f.position ? h->head - r->f.position : 0;
  const char *state = ebb_follow_state_names[r->state];
  if (!h->active && r->state != ST_FAULTED) state = "standby";
  ebb_buf_printf(b, ",\"state\":\"%s\",\"position\":%lld,\"head\":%lld,\"lag_events\":%lld,"
                    "\"events_total\":%llu,\"commands_issued\":%llu,\"commands_rejected\":%llu,"
                    "\"retries\":%llu,\"schedules_pending\":%lld,\"in_flight\":%d,\"from\":[",
                 state, (long long)r->f.position, (long long)h->head, (long long)lag,
                 (unsigned long long)r->events_total, (unsigned long long)r->issued,
                 (unsigned long long)r->rejected, (unsigned long long)r->retries,
                 (long long)count_schedules(h, r->name), r->busy);
  for (size_t i = 0; i < r->f.n_from; i++) {
    if (i) ebb_buf_putc(b, ',');
    ebb_buf_json_string(b, r->f.from[i], strlen(r->f.from[i]));
  }
  ebb_buf_puts(b, "],\"last_error\":");
  if (r->fault) {
    ebb_buf_printf(b, "{\"position\":%lld,\"message\":", (long long)r->fault_position);
    ebb_buf_json_string(b, r->fault, strlen(r->fault));
    ebb_buf_putc(b, '}');
  } else {
    ebb_buf_puts(b, "null");
  }
  ebb_buf_puts(b, ",\"retrying\":");
  json_str_or_null(b, r->busy ? r->retry_error : NULL);
  ebb_buf_puts(b, ",\"last_rejection\":");
  json_str_or_null(b, r->last_rejection);
  ebb_buf_puts(b, ",\"load_error\":");
  json_str_or_null(b, r->load_error);
  ebb_buf_printf(b, ",\"load_failures\":%llu,\"reloads\":%llu,\"skipped\":[",
                 (unsigned long long)r->load_failures, (unsigned long long)r->reloads);
  for (size_t i = 0; i < r->f.n_skipped; i++)
    ebb_buf_printf(b, "%s%lld", i ? "," : "", (long long)r->f.skipped[i]);
  ebb_buf_puts(b, "]}");
}

int ebb_reactors_status(ebb_reactors *h, const char *name, ebb_buf *out) {
  if (name == NULL) {
    ebb_buf_putc(out, '[');
    for (reactor *r = h->list; r; r = r->link) {
      if (r != h->list) ebb_buf_putc(out, ',');
      status_json(h, r, out);
    }
    ebb_buf_putc(out, ']');
    return 1;
  }
  reactor *r = find(h, name);
  if (r == NULL) return 0;
  status_json(h, r, out);
  return 1;
}

int ebb_reactors_schedules(ebb_reactors *h, const char *name, ebb_buf *out) {
  if (find(h, name) == NULL) return 0;
  sqlite3_stmt *st;
  ebb_buf_putc(out, '[');
  if (sqlite3_prepare_v2(h->db, "SELECT key, fire_at_ms, aggregate, id, type, data, command_id, "
                         "event_id, created_at FROM reactor_schedules WHERE name = ? ORDER BY "
                         "fire_at_ms, key", -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    int first = 1;
    while (sqlite3_step(st) == SQLITE_ROW) {
      char at[EBB_TIME_LEN + 1];
      ebb_clock_format(sqlite3_column_int64(st, 1), at);
      if (!first) ebb_buf_putc(out, ',');
      first = 0;
      ebb_buf_puts(out, "{\"key\":");
      json_str_or_null(out, (const char *)sqlite3_column_text(st, 0));
      ebb_buf_printf(out, ",\"at\":\"%s\",\"command\":{\"aggregate\":", at);
      json_str_or_null(out, (const char *)sqlite3_column_text(st, 2));
      ebb_buf_puts(out, ",\"id\":");
      json_str_or_null(out, (const char *)sqlite3_column_text(st, 3));
      ebb_buf_puts(out, ",\"type\":");
      json_str_or_null(out, (const char *)sqlite3_column_text(st, 4));
      ebb_buf_puts(out, ",\"data\":");
      ebb_buf_puts(out, (const char *)sqlite3_column_text(st, 5)); /* JSON we encoded */
      ebb_buf_puts(out, "},\"command_id\":");
      json_str_or_null(out, (const char *)sqlite3_column_text(st, 6));
      ebb_buf_puts(out, ",\"event_id\":");
      json_str_or_null(out, (const char *)sqlite3_column_text(st, 7));
      ebb_buf_puts(out, ",\"created_at\":");
      json_str_or_null(out, (const char *)sqlite3_column_text(st, 8));
      ebb_buf_putc(out, '}');
    }
    sqlite3_finalize(st);
  }
  ebb_buf_putc(out, ']');
  return 1;
}

static int error_body(ebb_buf *out, int status, const char *code, const char *message) {
  ebb_buf_printf(out, "{\"error\":{\"code\":\"%s\",\"message\":", code);
  ebb_buf_json_string(out, message, strlen(message));
  ebb_buf_puts(out, "}}");
  return status;
}

int ebb_reactors_control(ebb_reactors *h, const char *name, const char *action, ebb_buf *out) {
  reactor *r = find(h, name);
  if (r == NULL) return error_body(out, 404, "not_found", "no such reactor");
  int skip = strcmp(action, "skip") == 0;
  if (!skip && strcmp(action, "retry") != 0)
    return error_body(out, 404, "not_found", "unknown action (retry or skip)");
  if (r->state != ST_FAULTED) return error_body(out, 409, "conflict", "the reactor is not faulted");
  if (r->busy)
    return error_body(out, 409, "conflict",
                      "the reactor still waits for answers to commands it issued: try again");
  if (r->tainted) {
    load_reactor(h, r);
    if (r->load_error) return error_body(out, 500, "script_error", r->load_error);
    r->tainted = 0;
  }
  if (skip) {
    char now[EBB_TIME_LEN + 1];
    ebb_clock_format(ebb_clock_now_ms(), now);
    if (run_sql(h->db, "INSERT OR IGNORE INTO reactor_skipped (name, position, error, skipped_at) "
                       "VALUES (?, ?, ?, ?)",
                "titt", r->name, r->fault_position, r->fault ? r->fault : "", now) != 0)
      return error_body(out, 500, "storage_error", sqlite3_errmsg(h->db));
    int64_t *skipped = malloc((r->f.n_skipped + 1) * sizeof *skipped);
    if (skipped == NULL) return error_body(out, 503, "out_of_memory", "out of memory");
    if (r->f.n_skipped) memcpy(skipped, r->f.skipped, r->f.n_skipped * sizeof *skipped);
    skipped[r->f.n_skipped] = r->fault_position;
    ebb_follower_set_skipped(&r->f, skipped, r->f.n_skipped + 1);
    char pos[32];
    snprintf(pos, sizeof pos, "%lld", (long long)r->fault_position);
    ebb_log(EBB_LOG_WARN, "reactor skipped an event", "reactor", r->name, "#position", pos, NULL);
  }
  free(r->fault);
  r->fault = NULL;
  r->fault_position = 0;
  r->state = ST_CATCHING_UP;
  drop_batch(r); /* read again: the skipped event is filtered out */
  schedule_pump(h);
  status_json(h, r, out);
  return 200;
}

static void family(ebb_buf *b, const char *name, const char *type, const char *help) {
  ebb_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void ebb_reactors_metrics(ebb_reactors *h, ebb_buf *out) {
  family(out, "ebb_reactor_lag_events", "gauge", "Events committed and not yet handled.");
  for (reactor *r = h->list; r; r = r->link)
    ebb_buf_printf(out, "ebb_reactor_lag_events{reactor=\"%s\"} %lld\n", r->name,
                   (long long)(h->head > r->f.position ? h->head - r->f.position : 0));
  family(out, "ebb_reactor_commands_issued_total", "counter", "Commands issued and committed.");
  for (reactor *r = h->list; r; r = r->link)
    ebb_buf_printf(out, "ebb_reactor_commands_issued_total{reactor=\"%s\"} %llu\n", r->name,
                   (unsigned long long)r->issued);
  family(out, "ebb_reactor_commands_rejected_total", "counter", "Commands their aggregate rejected.");
  for (reactor *r = h->list; r; r = r->link)
    ebb_buf_printf(out, "ebb_reactor_commands_rejected_total{reactor=\"%s\"} %llu\n", r->name,
                   (unsigned long long)r->rejected);
  family(out, "ebb_reactor_retries_total", "counter", "Commands tried again after a failure.");
  for (reactor *r = h->list; r; r = r->link)
    ebb_buf_printf(out, "ebb_reactor_retries_total{reactor=\"%s\"} %llu\n", r->name,
                   (unsigned long long)r->retries);
  family(out, "ebb_reactor_schedules_pending", "gauge", "Schedules stored and not yet fired.");
  for (reactor *r = h->list; r; r = r->link)
    ebb_buf_printf(out, "ebb_reactor_schedules_pending{reactor=\"%s\"} %lld\n", r->name,
                   (long long)count_schedules(h, r->name));
  family(out, "ebb_reactor_state", "gauge", "1 for the reactor's state.");
  for (reactor *r = h->list; r; r = r->link)
    for (int st = 0; st < EBB_FOLLOW_N_STATES; st++)
      ebb_buf_printf(out, "ebb_reactor_state{reactor=\"%s\",state=\"%s\"} %d\n", r->name,
                     ebb_follow_state_names[st], r->state == st);
}
