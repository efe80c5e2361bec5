/*
 * projection.c: the projection host (see projection.h).
 *
 * Everything Lua and SQLite happens on the host's thread. The loop and the
 * thread share only what the mutex guards: the head the loop has seen
 * committed, the queue of jobs (queries, controls) going in and answered
 * jobs coming out, a rescan flag, and the published status of every
 * projection. The thread works in rounds: rescan if asked, answer the queued
 * jobs, give every projection that is behind one batch, publish.
 *
 * A projection is an `instance`: a module loaded into a sandbox of its own,
 * bound to one read-model database. A projection has one active instance
 * (answering queries) and, during a blue/green rebuild, a second one building
 * a fresh database; once that one has caught up it replaces the first, within
 * one round of the thread, so no query ever sees a half-built read model.
 *
 * A batch: read events after the checkpoint, keep those its `from` names,
 * upcast them, BEGIN, run the handlers inside one sandboxed call, write the
 * checkpoint, COMMIT. A handler error, or an event that cannot be upcast,
 * commits the events before the failing one and faults the projection at
 * exactly that event (so `skip` drops that one).
 *
 * The checkpoint also records the id of the last event read at or before it,
 * its fingerprint. A read model whose checkpoint is past the store's head, or
 * whose fingerprint event is no longer in the store (an older events.db
 * restored, or commits lost in an OS crash at durability `normal`), has seen
 * events the store no longer holds: it is rebuilt, never trusted.
 */
#define _GNU_SOURCE /* vasprintf */
#include "projection.h"

#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "clock.h"
#include "follower.h"
#include "json.h"
#include "log.h"
#include "module_dir.h"
#include "paths.h"
#include "projection_db.h"
#include "runtime.h"
#include "sandbox.h"

#define DEFAULT_BATCH 1000
#define LAG_SAMPLES 4096

enum { ST_CATCHING_UP = EBB_FOLLOW_CATCHING_UP, ST_LIVE = EBB_FOLLOW_LIVE,
       ST_REBUILDING = EBB_FOLLOW_REBUILDING, ST_FAULTED = EBB_FOLLOW_FAULTED,
       ST_STOPPED = EBB_FOLLOW_STOPPED };
#define state_names ebb_follow_state_names

/* ---------------------------------------------------------------- types */

typedef struct instance {
  int64_t version;
  ebb_sandbox *sb;
  int module_ref, db_ref;     /* registry of sb: the module table, the db handle userdata */
  ebb_projdb *handle;
  sqlite3 *db;
  char *db_file;              /* its file name in the projection's directory */
  ebb_follower f;             /* the checkpoint, its fingerprint, from and skipped */
  int fresh;                  /* never caught up: a rebuild in progress */
  int tainted;                /* its Lua state was killed: reload before running it again */
  char **queries;             /* the names of its queries, sorted (GET /modules shows them) */
  size_t n_queries;
  sqlite3_stmt *stmt[4];      /* the runner's own statements on db, prepared once (TX_*) */
  int64_t sql_left;           /* SQLite VM steps left to the batch or query in progress */
  int sql_exhausted;          /* ... and they ran out: the interrupt was ours */
} instance;

/* The SQL one event's handler or one query may run, in SQLite VM steps: a
 * handler takes a few hundred, so only a runaway (a recursive CTE without
 * end, a cross join of big tables) comes near. The Lua around it has the
 * sandbox's instruction budget; this is the same bound for SQL. */
#define SQL_STEPS_PER_CALL ((int64_t)100000000)

#define SQL_PROGRESS_EVERY 10000

static int on_sql_progress(void *ud) {
  instance *in = ud;
  in->sql_left -= SQL_PROGRESS_EVERY;
  if (in->sql_left > 0) return 0;
  in->sql_exhausted = 1;
  return 1; /* SQLITE_INTERRUPT for the statement running */
}

static void sql_budget(instance *in) {
  in->sql_left = SQL_STEPS_PER_CALL;
  in->sql_exhausted = 0;
}

/* The message of a failed call, naming the SQL bound when it was the cause. */
static void sql_budget_message(instance *in, char **msg) {
  if (!in->sql_exhausted) return;
  char *m = ebb_strdupf("SQL budget of %lld steps exceeded (a runaway query?): %s",
                 (long long)SQL_STEPS_PER_CALL, *msg ? *msg : "interrupted");
  free(*msg);
  *msg = m;
}

enum { TX_BEGIN, TX_COMMIT, TX_ROLLBACK, TX_CHECKPOINT };
static const char *const tx_sql[4] = {
    "BEGIN IMMEDIATE", "COMMIT", "ROLLBACK",
    "INSERT INTO _ebb_checkpoint (id, name, version, position, updated_at, event_position, "
    "event_id) VALUES (1, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET position = "
    "excluded.position, updated_at = excluded.updated_at, event_position = "
    "excluded.event_position, event_id = excluded.event_id"};

/* The runner's statement `which` on the instance's connection, reset and
 * ready to bind; NULL if it cannot be prepared. A batch runs four of them:
 * parsing them again every batch cost more than a small batch's work. */
static sqlite3_stmt *tx_stmt(instance *in, int which) {
  if (in->stmt[which] == NULL &&
      sqlite3_prepare_v3(in->db, tx_sql[which], -1, SQLITE_PREPARE_PERSISTENT, &in->stmt[which],
                         NULL) != SQLITE_OK)
    return NULL;
  sqlite3_reset(in->stmt[which]);
  sqlite3_clear_bindings(in->stmt[which]);
  return in->stmt[which];
}

static void tx_finalize(instance *in) {
  for (int i = 0; i < 4; i++) {
    sqlite3_finalize(in->stmt[i]);
    in->stmt[i] = NULL;
  }
}

/* Runs BEGIN, COMMIT or ROLLBACK: 0, or -1 with *msg (if msg). */
static int tx(instance *in, int which, char **msg);

typedef struct projection {
  char *name;
  char *path;                 /* the module's file */
  uint64_t code_hash;         /* of the file's bytes, to notice changes */
  instance *active, *next;    /* next: the blue/green rebuild */
  int state;
  int64_t fault_position;
  int fault_in_next;          /* the rebuild faulted, not the active instance */
  char *fault;                /* the error message while faulted */
  char *rebuild_reason;       /* why the read model was last rebuilt on its own, or NULL */
  char *load_error;           /* the last failed load of a changed file, or NULL */
  uint64_t load_failures;
  uint64_t reloads;           /* changed modules loaded */
  int code_hash_loaded;       /* some version of the module loaded once */
  uint64_t events_total;      /* events handled, all instances */
  double eps;                 /* events per second, smoothed */
  int64_t eps_t0_ms, eps_n;
  int64_t behind_since_ms;    /* when it last fell behind the head (0: caught up) */
  int64_t lag[LAG_SAMPLES];   /* live lags in ms, recorded to handled */
  size_t n_lag, lag_i;
  int64_t lag_p50, lag_p99, lag_sorted_ms; /* percentiles, sorted at most every 250 ms */
  int seen;                   /* found in the latest scan */
  struct projection *link;
} projection;

/* The status of one projection as published to the loop. */
typedef struct published {
  char *name;
  char *json;                 /* the status object */
  int64_t position;           /* of the active instance (-1: none answers) */
  int answers;                /* has an active instance */
  int state;
  int64_t lag_events, live_p50, live_p99;
  double lag_s, eps;
  uint64_t events_total, load_failures;
} published;

typedef struct job {
  int is_query;
  char *name, *query, *args, *action;
  ebb_projection_answer cb;
  void *ud;
  int status;
  char *body;
  struct job *next;
} job;

struct ebb_projections {
  ebb_projections_options o;
  char *data_dir, *store, *projections_dir, *aggregates_dir, *lua_dir, *models_dir;
  uv_async_t async;
  pthread_t thread;
  int started;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  /* under mu */
  int64_t head;
  int rescan, stopping;
  job *in_head, *in_tail, *out_head, *out_tail;
  published *pub;
  size_t n_pub;
  int progressed;
  /* the thread's */
  ebb_runtime *rt;
  projection *list;
  int64_t known_head;
  int64_t published_ms;       /* of the last full publish */
};

/* ---------------------------------------------------------------- small helpers */

static int exec_sql(sqlite3 *db, const char *sql, char **msg) {
  char *e = NULL;
  int rc = sqlite3_exec(db, sql, NULL, NULL, &e);
  if (rc != SQLITE_OK && msg) *msg = ebb_strdupf("%s", e ? e : sqlite3_errstr(rc));
  sqlite3_free(e);
  return rc;
}

/* ---------------------------------------------------------------- instances */

static void instance_free(instance *in, int remove_file, const char *dir) {
  if (in == NULL) return;
  if (in->handle) ebb_projdb_close(in->handle);
  ebb_sandbox_free(in->sb);
  tx_finalize(in);
  if (in->db) sqlite3_close_v2(in->db);
  if (remove_file && in->db_file) {
    char *p = ebb_strdupf("%s/%s", dir, in->db_file);
    if (p) {
      unlink(p);
      char *w = ebb_strdupf("%s-wal", p), *s = ebb_strdupf("%s-shm", p);
      if (w) unlink(w);
      if (s) unlink(s);
      free(w);
      free(s);
    }
    free(p);
  }
  ebb_follower_clear(&in->f);
  for (size_t i = 0; i < in->n_queries; i++) free(in->queries[i]);
  free(in->queries);
  free(in->db_file);
  free(in);
}

static int cmp_names(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Validates the module on top (argument 1) and copies `from` into the
 * instance (argument 2). Raises with a message naming what is wrong. */
static int l_validate(lua_State *L) {
  instance *in = lua_touserdata(L, 2);
  const char *expected_name = lua_tostring(L, 3);
  if (!lua_istable(L, 1)) luaL_error(L, "the module must return a table, not a %s", luaL_typename(L, 1));
  if (lua_getfield(L, 1, "name") != LUA_TSTRING) luaL_error(L, "missing field: name (a string)");
  if (strcmp(lua_tostring(L, -1), expected_name) != 0)
    luaL_error(L, "name is \"%s\", but the file is %s.lua: they must match", lua_tostring(L, -1),
               expected_name);
  if (lua_getfield(L, 1, "version") != LUA_TNUMBER || !lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1)
    luaL_error(L, "missing field: version (a positive integer)");
  in->version = lua_tointeger(L, -1);
  if (lua_getfield(L, 1, "from") != LUA_TTABLE) luaL_error(L, "missing field: from (a list of categories or event types)");
  lua_Integer n = luaL_len(L, -1);
  if (n < 1 || n > 256) luaL_error(L, "from must list 1 to 256 categories or event types");
  for (lua_Integer i = 1; i <= n; i++) {
    if (lua_rawgeti(L, -1, i) != LUA_TSTRING) luaL_error(L, "from[%d] must be a string", (int)i);
    if (ebb_follower_add_from(&in->f, lua_tostring(L, -1)) != 0) luaL_error(L, "out of memory");
    lua_pop(L, 1);
  }
  if (lua_getfield(L, 1, "on") != LUA_TTABLE) luaL_error(L, "missing field: on (a table of event handlers)");
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TFUNCTION)
      luaL_error(L, "on.%s must be a function", lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?");
    lua_pop(L, 1);
  }
  int qt = lua_getfield(L, 1, "queries");
  if (qt != LUA_TNIL && qt != LUA_TTABLE) luaL_error(L, "queries must be a table of functions");
  if (qt == LUA_TTABLE) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TFUNCTION)
        luaL_error(L, "queries.%s must be a function",
                   lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?");
      lua_pop(L, 1);
      char **q = realloc(in->queries, (in->n_queries + 1) * sizeof *q);
      if (q == NULL) luaL_error(L, "out of memory");
      in->queries = q;
      if ((q[in->n_queries] = strdup(lua_tostring(L, -1))) == NULL) luaL_error(L, "out of memory");
      in->n_queries++;
    }
    qsort(in->queries, in->n_queries, sizeof *in->queries, cmp_names);
  }
  int st = lua_getfield(L, 1, "setup");
  if (st != LUA_TNIL && st != LUA_TFUNCTION) luaL_error(L, "setup must be a function");
  return 0;
}

/* Pushes the db handle for the instance's connection (argument 1: instance). */
static int l_make_handle(lua_State *L) {
  instance *in = lua_touserdata(L, 1);
  ebb_projdb_push(L, in->db, EBB_PROJDB_WRITE, &in->handle);
  return 1;
}

/* Calls module.setup(db) if there is one. Arguments: module, db. */
static int l_setup(lua_State *L) {
  if (lua_getfield(L, 1, "setup") != LUA_TFUNCTION) return 0;
  lua_pushvalue(L, 2);
  lua_call(L, 1, 0);
  return 0;
}

static int call_error(ebb_sandbox *sb, char **msg) {
  lua_State *L = ebb_sandbox_state(sb);
  const char *killed = ebb_sandbox_killed(sb);
  *msg = ebb_strdupf("%s", killed ? killed : lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1)
                                                                       : "a non-string error");
  lua_pop(L, 1);
  return -1;
}

/* Loads the module file into a new sandbox: the instance, or NULL with *msg. */
static instance *load_module(ebb_projections *h, projection *p, char **msg) {
  instance *in = calloc(1, sizeof *in);
  if (in == NULL) {
    *msg = ebb_strdupf("out of memory");
    return NULL;
  }
  in->module_ref = in->db_ref = LUA_NOREF;
  const char *dirs[1] = {h->projections_dir};
  ebb_sandbox_options so = {.module_dirs = dirs, .n_module_dirs = 1, .runtime_dir = h->lua_dir,
                            .memory_limit = h->o.memory_limit,
                            .instruction_budget = h->o.instruction_budget};
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_sandbox_new(&in->sb, &so, &err) != 0) {
    *msg = ebb_strdupf("%s", err.message);
    goto fail;
  }
  lua_State *L = ebb_sandbox_state(in->sb);
  lua_pushcfunction(L, ebb__lua_prepare);
  if (ebb_sandbox_call(in->sb, 0, 0) != LUA_OK) {
    call_error(in->sb, msg);
    goto fail;
  }
  char chunk[300];
  snprintf(chunk, sizeof chunk, "%s.lua", p->name);
  if (ebb_sandbox_load_file(in->sb, p->path, chunk, &err) != 0) {
    *msg = ebb_strdupf("%s", err.message);
    goto fail;
  }
  lua_pushcfunction(L, l_validate);
  lua_insert(L, -2);
  lua_pushvalue(L, -1);
  in->module_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushlightuserdata(L, in);
  lua_pushstring(L, p->name);
  if (ebb_sandbox_call(in->sb, 3, 0) != LUA_OK) {
    char *m;
    call_error(in->sb, &m);
    *msg = ebb_strdupf("%s.lua: %s", p->name, m ? m : "invalid");
    free(m);
    goto fail;
  }
  return in;
fail:
  instance_free(in, 0, NULL);
  return NULL;
}

static char *projection_dir(ebb_projections *h, const projection *p) {
  return ebb_strdupf("%s/%s", h->models_dir, p->name);
}

static const char *checkpoint_sql =
    "CREATE TABLE IF NOT EXISTS _ebb_checkpoint (id INTEGER PRIMARY KEY CHECK (id = 1), "
    "name TEXT NOT NULL, version INTEGER NOT NULL, position INTEGER NOT NULL, "
    "updated_at TEXT NOT NULL, event_position INTEGER, event_id TEXT);"
    "CREATE TABLE IF NOT EXISTS _ebb_skipped (position INTEGER PRIMARY KEY, type TEXT, "
    "stream TEXT, error TEXT, skipped_at TEXT NOT NULL);";

static int tx(instance *in, int which, char **msg) {
  sqlite3_stmt *st = tx_stmt(in, which);
  int rc = st ? sqlite3_step(st) : SQLITE_ERROR;
  if (st) sqlite3_reset(st);
  if (rc == SQLITE_DONE) return 0;
  if (msg && *msg == NULL) *msg = ebb_strdupf("%s: %s", tx_sql[which], sqlite3_errmsg(in->db));
  return -1;
}

static int write_checkpoint(instance *in, const char *name, int64_t position) {
  sqlite3_stmt *st = tx_stmt(in, TX_CHECKPOINT);
  if (st == NULL) return -1;
  char now[EBB_TIME_LEN + 1];
  ebb_clock_format(ebb_clock_now_ms(), now);
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 2, in->version);
  sqlite3_bind_int64(st, 3, position);
  sqlite3_bind_text(st, 4, now, -1, SQLITE_TRANSIENT);
  if (in->f.mark_position > 0) {
    sqlite3_bind_int64(st, 5, in->f.mark_position);
    sqlite3_bind_text(st, 6, in->f.mark_id, -1, SQLITE_STATIC);
  }
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  return rc == SQLITE_DONE ? 0 : -1;
}

static int load_skipped(instance *in) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(in->db, "SELECT position FROM _ebb_skipped ORDER BY position", -1, &st,
                         NULL) != SQLITE_OK)
    return -1;
  int64_t *skipped = NULL;
  size_t n = 0;
  while (sqlite3_step(st) == SQLITE_ROW) {
    int64_t *p = realloc(skipped, (n + 1) * sizeof *p);
    if (p == NULL) break;
    skipped = p;
    p[n++] = sqlite3_column_int64(st, 0);
  }
  sqlite3_finalize(st);
  ebb_follower_set_skipped(&in->f, skipped, n);
  return 0;
}

/* Opens (or creates, running setup) the instance's database file, and makes
 * its db handle. An existing file whose checkpoint is ahead of the store
 * fails with *ahead set (when ahead is not NULL). */
static int open_model(ebb_projections *h, projection *p, instance *in, int create, int *ahead,
                      char **msg) {
  char *dir = projection_dir(h, p);
  char *path = dir ? ebb_strdupf("%s/%s", dir, in->db_file) : NULL;
  int rc = -1;
  if (path == NULL) {
    *msg = ebb_strdupf("out of memory");
    goto done;
  }
  mkdir(h->models_dir, 0755);
  mkdir(dir, 0755);
  int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | (create ? SQLITE_OPEN_CREATE : 0);
  if (sqlite3_open_v2(path, &in->db, flags, NULL) != SQLITE_OK) {
    *msg = ebb_strdupf("cannot open %s: %s", path, in->db ? sqlite3_errmsg(in->db) : "out of memory");
    goto done;
  }
  sqlite3_busy_timeout(in->db, 5000);
  sql_budget(in);
  sqlite3_progress_handler(in->db, SQL_PROGRESS_EVERY, on_sql_progress, in);
  /* Projection SQL must not corrupt the file or run what a crafted schema names. */
  sqlite3_db_config(in->db, SQLITE_DBCONFIG_DEFENSIVE, 1, (int *)NULL);
  sqlite3_db_config(in->db, SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0, (int *)NULL);
  /* A read model can always be rebuilt, and a lost commit is only processed
   * again (checkpoint and writes go together): WAL without fsyncs. */
  if (exec_sql(in->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;", msg) != SQLITE_OK)
    goto done;
  lua_State *L = ebb_sandbox_state(in->sb);
  lua_pushcfunction(L, l_make_handle);
  lua_pushlightuserdata(L, in);
  if (ebb_sandbox_call(in->sb, 1, 1) != LUA_OK) {
    call_error(in->sb, msg);
    goto done;
  }
  in->db_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (create) {
    if (exec_sql(in->db, "BEGIN IMMEDIATE", msg) != SQLITE_OK) goto done;
    lua_rawgeti(L, LUA_REGISTRYINDEX, in->module_ref);
    lua_pushcfunction(L, l_setup);
    lua_insert(L, -2);
    lua_rawgeti(L, LUA_REGISTRYINDEX, in->db_ref);
    if (ebb_sandbox_call(in->sb, 2, 0) != LUA_OK) {
      char *m;
      call_error(in->sb, &m);
      *msg = ebb_strdupf("%s.lua: setup failed: %s", p->name, m ? m : "");
      free(m);
      exec_sql(in->db, "ROLLBACK", NULL);
      goto done;
    }
    if (exec_sql(in->db, checkpoint_sql, msg) != SQLITE_OK || write_checkpoint(in, p->name, 0) ||
        exec_sql(in->db, "COMMIT", msg) != SQLITE_OK) {
      if (*msg == NULL) *msg = ebb_strdupf("cannot write the checkpoint: %s", sqlite3_errmsg(in->db));
      exec_sql(in->db, "ROLLBACK", NULL);
      goto done;
    }
    in->f.position = 0;
  } else {
    /* A read model from before the fingerprint: add its columns (empty). */
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(in->db, "SELECT event_id FROM _ebb_checkpoint", -1, &st, NULL) !=
        SQLITE_OK)
      exec_sql(in->db, "ALTER TABLE _ebb_checkpoint ADD COLUMN event_position INTEGER;"
                       "ALTER TABLE _ebb_checkpoint ADD COLUMN event_id TEXT;", NULL);
    sqlite3_finalize(st);
    if (sqlite3_prepare_v2(in->db, "SELECT version, position, event_position, event_id "
                           "FROM _ebb_checkpoint WHERE id = 1", -1, &st, NULL) != SQLITE_OK ||
        sqlite3_step(st) != SQLITE_ROW) {
      *msg = ebb_strdupf("%s has no checkpoint: %s", path, sqlite3_errmsg(in->db));
      sqlite3_finalize(st);
      goto done;
    }
    int64_t version = sqlite3_column_int64(st, 0);
    in->f.position = sqlite3_column_int64(st, 1);
    in->f.mark_position = sqlite3_column_int64(st, 2);
    const char *mark = (const char *)sqlite3_column_text(st, 3);
    snprintf(in->f.mark_id, sizeof in->f.mark_id, "%s", mark && in->f.mark_position > 0 ? mark : "");
    if (in->f.mark_id[0] == '\0') in->f.mark_position = 0;
    sqlite3_finalize(st);
    if (version != in->version) {
      *msg = ebb_strdupf("%s was built by version %lld", in->db_file, (long long)version);
      goto done;
    }
    if (ahead && (*msg = ebb_follower_ahead(&in->f, ebb_runtime_store(h->rt), "the read model")) != NULL) {
      *ahead = 1;
      goto done;
    }
    load_skipped(in);
  }
  rc = 0;
done:
  free(dir);
  free(path);
  return rc;
}

/* The file name `current` names, or NULL. */
static char *read_current(ebb_projections *h, projection *p) {
  char *path = ebb_strdupf("%s/%s/current", h->models_dir, p->name);
  if (path == NULL) return NULL;
  FILE *f = fopen(path, "r");
  free(path);
  if (f == NULL) return NULL;
  char line[256];
  char *r = fgets(line, sizeof line, f) ? strdup(strtok(line, "\n") ? line : line) : NULL;
  fclose(f);
  return r;
}

/* Makes file the one that answers, atomically (rename). */
static int write_current(ebb_projections *h, projection *p, const char *file) {
  char *tmp = ebb_strdupf("%s/%s/current.tmp", h->models_dir, p->name);
  char *path = ebb_strdupf("%s/%s/current", h->models_dir, p->name);
  int rc = -1;
  FILE *f = tmp ? fopen(tmp, "w") : NULL;
  if (f) {
    fprintf(f, "%s\n", file);
    if (fflush(f) == 0 && fsync(fileno(f)) == 0) rc = 0;
    fclose(f);
    if (rc == 0 && rename(tmp, path) != 0) rc = -1;
  }
  free(tmp);
  free(path);
  return rc;
}

static char *new_file_name(const instance *in) {
  return ebb_strdupf("v%lld-%lld.db", (long long)in->version, (long long)ebb_clock_now_ms());
}

/* ---------------------------------------------------------------- projections */

static void projection_free(ebb_projections *h, projection *p) {
  char *dir = projection_dir(h, p);
  instance_free(p->active, 0, dir);
  instance_free(p->next, 1, dir); /* a rebuild that never finished */
  free(dir);
  free(p->name);
  free(p->path);
  free(p->fault);
  free(p->rebuild_reason);
  free(p->load_error);
  free(p);
}

static void set_fault(projection *p, instance *in, int64_t position, char *message) {
  free(p->fault);
  p->fault = message;
  p->fault_position = position;
  p->fault_in_next = in == p->next;
  p->state = ST_FAULTED;
}

/* Starts a blue/green rebuild into a new file with the given instance. */
static int start_rebuild(ebb_projections *h, projection *p, instance *in, char **msg) {
  free(in->db_file);
  in->db_file = new_file_name(in);
  in->fresh = 1;
  if (in->db_file == NULL || open_model(h, p, in, 1, NULL, msg) != 0) return -1;
  char *dir = projection_dir(h, p);
  instance_free(p->next, 1, dir);
  free(dir);
  p->next = in;
  return 0;
}

/* (Re)loads a projection's module. A first load opens its current read model
 * or builds one; a reload of the same version swaps the code and keeps the
 * read model; a new version starts a blue/green rebuild. A module that fails
 * to load leaves what runs untouched. */
static void load_projection(ebb_projections *h, projection *p) {
  char *msg = NULL;
  instance *in = load_module(h, p, &msg);
  if (in == NULL) goto failed;
  if (p->active && p->active->version == in->version) {
    /* New code, same read model: the new sandbox takes over the database. */
    in->db_file = strdup(p->active->db_file);
    instance *old = p->active;
    sqlite3 *db = old->db;
    ebb_projdb_close(old->handle);
    old->handle = NULL;
    old->db = NULL;
    tx_finalize(old); /* prepared on db: the new instance prepares its own */
    in->db = db;
    sqlite3_progress_handler(db, SQL_PROGRESS_EVERY, on_sql_progress, in);
    lua_State *L = ebb_sandbox_state(in->sb);
    lua_pushcfunction(L, l_make_handle);
    lua_pushlightuserdata(L, in);
    if (in->db_file == NULL || ebb_sandbox_call(in->sb, 1, 1) != LUA_OK) {
      if (in->db_file) call_error(in->sb, &msg);
      in->db = NULL;
      /* Give the connection back to the old code. */
      old->db = db;
      sqlite3_progress_handler(db, SQL_PROGRESS_EVERY, on_sql_progress, old);
      lua_State *OL = ebb_sandbox_state(old->sb);
      lua_pushcfunction(OL, l_make_handle);
      lua_pushlightuserdata(OL, old);
      if (ebb_sandbox_call(old->sb, 1, 1) == LUA_OK) {
        luaL_unref(OL, LUA_REGISTRYINDEX, old->db_ref);
        old->db_ref = luaL_ref(OL, LUA_REGISTRYINDEX);
      } else {
        lua_pop(OL, 1);
      }
      instance_free(in, 0, NULL);
      goto failed;
    }
    in->db_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    in->f.position = old->f.position;
    in->f.mark_position = old->f.mark_position;
    memcpy(in->f.mark_id, old->f.mark_id, sizeof in->f.mark_id);
    ebb_follower_take(&in->f, &old->f);
    p->active = in;
    instance_free(old, 0, NULL);
    /* A rebuild of the same version goes on with the new code. */
    if (p->next) {
      char *dir = projection_dir(h, p);
      instance_free(p->next, 1, dir);
      free(dir);
      p->next = NULL;
      instance *again = load_module(h, p, &msg);
      if (again == NULL || start_rebuild(h, p, again, &msg) != 0) {
        instance_free(again, 0, NULL);
        goto failed;
      }
    }
    ebb_log(EBB_LOG_INFO, "projection reloaded: same version, read model kept", "projection",
            p->name, NULL);
  } else if (p->active) {
    /* A new version: build a fresh read model beside the one answering. */
    if (start_rebuild(h, p, in, &msg) != 0) {
      instance_free(in, 0, NULL);
      goto failed;
    }
    char v[32];
    snprintf(v, sizeof v, "%lld", (long long)in->version);
    ebb_log(EBB_LOG_INFO, "projection version changed: rebuilding beside the running one",
            "projection", p->name, "#version", v, NULL);
  } else {
    /* First load: the current read model if it was built by this version. */
    char *current = read_current(h, p);
    int opened = 0;
    if (current) {
      in->db_file = current;
      char *why = NULL;
      int ahead = 0;
      if (open_model(h, p, in, 0, &ahead, &why) == 0) {
        opened = 1;
        p->active = in;
      } else if (ahead) {
        ebb_log(EBB_LOG_WARN, "projection read model is ahead of the store: rebuilding",
                "projection", p->name, "reason", why ? why : "", NULL);
        free(p->rebuild_reason);
        p->rebuild_reason = why;
        /* Its data must never answer again, whatever happens before the rebuild ends. */
        char *dir = projection_dir(h, p), *file = dir ? ebb_strdupf("%s/%s", dir, current) : NULL;
        if (file) unlink(file);
        free(file);
        free(dir);
      } else {
        ebb_log(EBB_LOG_INFO, "projection read model not reusable: rebuilding", "projection",
                p->name, "reason", why ? why : "", NULL);
        free(why);
      }
      if (!opened) {
        /* Keep its sandbox; drop what open_model set up. */
        if (in->handle) ebb_projdb_close(in->handle);
        in->handle = NULL;
        tx_finalize(in);
        if (in->db) sqlite3_close_v2(in->db);
        in->db = NULL;
      }
    }
    if (!opened) {
      int had_model = current != NULL;
      free(in->db_file);
      in->db_file = new_file_name(in);
      if (in->db_file == NULL || open_model(h, p, in, 1, NULL, &msg) != 0) {
        instance_free(in, 0, NULL);
        goto failed;
      }
      if (had_model) {
        /* Another version's read model exists but its code is gone: rebuild
         * before answering (queries get 503 until then). */
        in->fresh = 1;
        p->next = in;
      } else {
        write_current(h, p, in->db_file);
        p->active = in;
      }
    }
  }
  free(p->load_error);
  p->load_error = NULL;
  if (p->active && p->code_hash_loaded) p->reloads++;
  p->code_hash_loaded = 1;
  /* A fault stays until retry or skip, whatever the code. */
  if (p->state != ST_FAULTED) p->state = p->next ? ST_REBUILDING : ST_CATCHING_UP;
  return;
failed:
  p->load_failures++;
  free(p->load_error);
  p->load_error = msg ? msg : ebb_strdupf("cannot load %s", p->path);
  ebb_log(EBB_LOG_ERROR, "projection failed to load; what ran before stays", "projection", p->name,
          "error", p->load_error, NULL);
  if (p->active == NULL && p->next == NULL) p->state = ST_STOPPED;
}

/* One NAME.lua of the directory: new or changed code is (re)loaded. */
static void scan_one(void *ud, const char *name, const char *path) {
  ebb_projections *h = ud;
  uint64_t hash = EBB_FNV1A_INIT;
  if (ebb_file_hash(path, &hash)) return; /* gone or unreadable: the next scan sees it */
  projection *p = h->list;
  while (p && strcmp(p->name, name) != 0) p = p->link;
  if (p == NULL) {
    p = calloc(1, sizeof *p);
    if (p == NULL || (p->name = strdup(name)) == NULL || (p->path = strdup(path)) == NULL) {
      if (p) free(p->name);
      free(p);
      return;
    }
    p->link = h->list;
    h->list = p;
    p->code_hash = hash;
    load_projection(h, p);
  } else if (p->code_hash != hash || (p->active == NULL && p->next == NULL)) {
    p->code_hash = hash;
    load_projection(h, p);
  }
  p->seen = 1;
}

/* Finds *.lua files and (re)loads the changed ones; removed ones are dropped. */
static void scan(ebb_projections *h) {
  for (projection *p = h->list; p; p = p->link) p->seen = 0;
  ebb_module_dir_each(h->projections_dir, scan_one, h);
  for (projection **pp = &h->list; *pp;) {
    projection *p = *pp;
    if (p->seen) {
      pp = &p->link;
      continue;
    }
    /* Removed: stop it and forget it. Its read model stays on disk, so
     * putting the file back resumes from the checkpoint. */
    ebb_log(EBB_LOG_INFO, "projection removed", "projection", p->name, NULL);
    *pp = p->link;
    projection_free(h, p);
  }
}

/* Runs setup(db) on a scratch in-memory database. Arguments: instance. */
static int l_check_setup(lua_State *L) {
  instance *in = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, in->module_ref);
  if (lua_getfield(L, -1, "setup") != LUA_TFUNCTION) return 0;
  ebb_projdb_push(L, in->db, EBB_PROJDB_WRITE, &in->handle);
  lua_call(L, 1, 0);
  return 0;
}

typedef struct check_ctx {
  ebb_projections h;
  ebb_module_check out;
} check_ctx;

static void check_one(void *ud, const char *name, const char *path) {
  check_ctx *c = ud;
  projection p = {.name = (char *)name, .path = (char *)path};
  char *msg = NULL;
  instance *in = load_module(&c->h, &p, &msg);
  if (in && sqlite3_open_v2(":memory:", &in->db, SQLITE_OPEN_READWRITE, NULL) == SQLITE_OK) {
    lua_State *L = ebb_sandbox_state(in->sb);
    lua_pushcfunction(L, l_check_setup);
    lua_pushlightuserdata(L, in);
    if (ebb_sandbox_call(in->sb, 1, 0) != LUA_OK) {
      char *m = NULL;
      call_error(in->sb, &m);
      msg = ebb_strdupf("%s.lua: setup failed: %s", name, m ? m : "");
      free(m);
    }
  }
  ebb_module_check_note(&c->out, name, msg == NULL && in != NULL, msg);
  free(msg);
  instance_free(in, 0, NULL);
}

int ebb_projections_check(const char *projections_dir, const char *lua_dir, ebb_buf *report,
                          ebb_buf *names) {
  check_ctx c = {.out = {.report = report, .names = names}};
  c.h.projections_dir = (char *)projections_dir;
  c.h.lua_dir = (char *)(lua_dir ? lua_dir : ebb_paths_lua_dir());
  ebb_module_dir_each(projections_dir, check_one, &c);
  return c.out.problems;
}

/* ---------------------------------------------------------------- running batches */

typedef struct batch {
  projection *p;
  instance *in;
  ebb_event_list *events;
  size_t n;        /* events to run (a prefix of the list) */
  size_t at;       /* the event being handled */
  int64_t handled;
} batch;

/* Runs the handlers of a batch's events in order. Argument: the batch. An
 * error propagates with b->at naming the event. */
static int l_run_batch(lua_State *L) {
  batch *b = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, b->in->module_ref);
  lua_getfield(L, -1, "on");
  int on = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, b->in->db_ref);
  int db = lua_gettop(L);
  for (b->at = 0; b->at < b->n; b->at++) {
    const ebb_event *e = &b->events->items[b->at];
    if (lua_getfield(L, on, e->type) != LUA_TFUNCTION) {
      lua_pop(L, 1);
      continue;
    }
    lua_pushvalue(L, db);
    ebb_event_push(L, e, 1);
    /* The budgets are per event, not per batch: a batch of cheap events must
     * not fail where the same events one by one would pass. */
    ebb_sandbox_recharge(b->in->sb);
    sql_budget(b->in);
    lua_call(L, 2, 0);
    b->handled++;
  }
  return 0;
}

/* Runs events [0, n) of the list through the instance in one transaction
 * with the checkpoint at `checkpoint`. 0, or -1 with b->at at the failing
 * event and *msg (killed: the Lua state must be rebuilt). */
static int run_events(projection *p, instance *in, ebb_event_list *l, size_t n,
                      int64_t checkpoint, batch *b, char **msg) {
  *b = (batch){.p = p, .in = in, .events = l, .n = n};
  if (tx(in, TX_BEGIN, msg) != 0) return -1;
  lua_State *L = ebb_sandbox_state(in->sb);
  lua_pushcfunction(L, l_run_batch);
  lua_pushlightuserdata(L, b);
  sql_budget(in);
  if (ebb_sandbox_call(in->sb, 1, 0) != LUA_OK) {
    if (ebb_sandbox_killed(in->sb)) in->tainted = 1;
    call_error(in->sb, msg);
    sql_budget_message(in, msg);
    tx(in, TX_ROLLBACK, NULL);
    return -1;
  }
  if (write_checkpoint(in, p->name, checkpoint) != 0 || tx(in, TX_COMMIT, msg) != 0) {
    if (*msg == NULL) *msg = ebb_strdupf("cannot commit: %s", sqlite3_errmsg(in->db));
    tx(in, TX_ROLLBACK, NULL);
    b->at = 0;
    return -1;
  }
  return 0;
}

static void note_lag(projection *p, const ebb_event_list *l, size_t n) {
  int64_t now = ebb_clock_now_ms();
  for (size_t i = 0; i < n; i++) {
    int64_t ms;
    if (ebb_clock_parse(l->items[i].recorded_at, &ms) != 0) continue;
    p->lag[p->lag_i] = now - ms;
    p->lag_i = (p->lag_i + 1) % LAG_SAMPLES;
    if (p->n_lag < LAG_SAMPLES) p->n_lag++;
  }
}

/* One batch for the instance: 1 if it did work. */
static int step(ebb_projections *h, projection *p, instance *in, int64_t head) {
  if (in->f.position >= head || in->tainted) return 0;
  int64_t limit = h->o.batch > 0 ? h->o.batch : DEFAULT_BATCH;
  ebb_follower_batch fb;
  ebb_error err;
  ebb_error_init(&err);
  char *msg = NULL;
  int rc = ebb_follower_read(&in->f, h->rt, head, limit, &fb, &err);
  if (rc == -1) {
    /* Faulted, not retried in a loop: retry resumes once the store reads again. */
    ebb_log(EBB_LOG_ERROR, "projection cannot read events", "projection", p->name, "error",
            err.message, NULL);
    set_fault(p, in, in->f.position + 1,
              ebb_strdupf("cannot read the events after position %lld: %s", (long long)in->f.position,
                   err.message));
    ebb_follower_batch_free(&fb);
    return 0;
  }
  if (rc == -2) {
    set_fault(p, in, fb.events.n ? fb.events.items[0].position : in->f.position + 1,
              ebb_strdupf("%s", err.message));
    ebb_follower_batch_free(&fb);
    return 0;
  }
  if (rc == 0) {
    ebb_follower_batch_free(&fb);
    return 0;
  }
  ebb_event_list *l = &fb.events;
  size_t n = fb.n;
  batch b;
  int64_t checkpoint = fb.checkpoint;
  /* An event that cannot be upcast faults the projection at it, after the
   * events before it are committed. */
  int ran = fb.bad && n == 0 ? 0 : run_events(p, in, l, n, checkpoint, &b, &msg) == 0 ? 1 : -1;
  if (ran == 1) {
    in->f.position = checkpoint;
    p->events_total += (uint64_t)b.handled;
    p->eps_n += b.handled;
    if (p->state == ST_LIVE) note_lag(p, l, n);
  }
  if (ran >= 0 && fb.bad) {
    const ebb_event *bad = fb.bad;
    char pos[32];
    snprintf(pos, sizeof pos, "%lld", (long long)bad->position);
    ebb_log(EBB_LOG_ERROR, "projection faulted: an event cannot be upcast", "projection", p->name,
            "#position", pos, "type", bad->type, "error", bad->upcast_error, NULL);
    set_fault(p, in, bad->position, ebb_strdupf("event %lld (%s in %s): %s", (long long)bad->position,
                                         bad->type, bad->stream, bad->upcast_error));
  } else if (ran < 0) {
    size_t at = b.at < n ? b.at : 0;
    const ebb_event *bad = &l->items[at];
    /* Commit what came before the failing event (the same handlers, run
     * again on the rolled-back model: they are deterministic). */
    char *again = NULL;
    if (at > 0 && !in->tainted) {
      ebb_follower_mark(&in->f, &l->items[at - 1]);
      if (run_events(p, in, l, at, l->items[at - 1].position, &b, &again) == 0) {
        in->f.position = l->items[at - 1].position;
        p->events_total += (uint64_t)b.handled;
      }
    }
    free(again);
    char pos[32];
    snprintf(pos, sizeof pos, "%lld", (long long)bad->position);
    ebb_log(EBB_LOG_ERROR, "projection faulted", "projection", p->name, "#position", pos, "type",
            bad->type, "error", msg ? msg : "", NULL);
    set_fault(p, in, bad->position, ebb_strdupf("event %lld (%s in %s): %s", (long long)bad->position,
                                         bad->type, bad->stream, msg ? msg : "error"));
    free(msg);
  }
  ebb_follower_batch_free(&fb);
  return 1;
}

/* Swaps a finished rebuild in: from now on it answers; the old one goes. */
static void maybe_swap(ebb_projections *h, projection *p, int64_t head) {
  instance *n = p->next;
  if (n == NULL || n->f.position < head) return;
  if (write_current(h, p, n->db_file) != 0) {
    ebb_log(EBB_LOG_ERROR, "projection rebuilt but cannot switch to it", "projection", p->name,
            "error", strerror(errno), NULL);
    /* Faulted rather than tried again every round; retry tries again. */
    set_fault(p, n, n->f.position,
              ebb_strdupf("rebuilt, but cannot make %s current: %s", n->db_file, strerror(errno)));
    return;
  }
  char *dir = projection_dir(h, p);
  instance_free(p->active, 1, dir);
  free(dir);
  n->fresh = 0;
  p->active = n;
  p->next = NULL;
  if (p->state == ST_REBUILDING) p->state = ST_LIVE;
  char v[32];
  snprintf(v, sizeof v, "%lld", (long long)n->version);
  ebb_log(EBB_LOG_INFO, "projection rebuilt and swapped in", "projection", p->name, "#version", v,
          NULL);
}

/* One batch for each projection that is behind: 1 if any did work. */
static int run_round(ebb_projections *h, int64_t head) {
  int worked = 0;
  int64_t now = ebb_clock_now_ms();
  int64_t per_batch = h->o.batch > 0 ? h->o.batch : DEFAULT_BATCH;
  for (projection *p = h->list; p; p = p->link) {
    if (p->state == ST_FAULTED || p->state == ST_STOPPED) continue;
    /* A Lua state killed by a query is rebuilt before it runs again. */
    if (p->active && p->active->tainted) load_projection(h, p);
    if (p->active) worked |= step(h, p, p->active, head);
    if (p->next && p->state != ST_FAULTED) worked |= step(h, p, p->next, head);
    maybe_swap(h, p, head);
    int behind = (p->active && p->active->f.position < head) || p->next;
    if (behind && p->behind_since_ms == 0) p->behind_since_ms = now;
    if (!behind) p->behind_since_ms = 0;
    if (p->state == ST_FAULTED || p->state == ST_STOPPED) continue;
    if (p->next) p->state = ST_REBUILDING;
    else if (!behind) p->state = ST_LIVE;
    /* Live stays live through a burst of commits; far behind is catching up. */
    else if (!(p->state == ST_LIVE && head - p->active->f.position <= 10 * per_batch))
      p->state = ST_CATCHING_UP;
    if (now - p->eps_t0_ms >= 1000) {
      double rate = (double)p->eps_n * 1000.0 / (double)(now - p->eps_t0_ms);
      p->eps = p->eps_t0_ms ? 0.5 * p->eps + 0.5 * rate : rate;
      p->eps_t0_ms = now;
      p->eps_n = 0;
    }
  }
  return worked;
}

/* ---------------------------------------------------------------- queries and controls */

/* Runs queries[name](db, args). Arguments: instance, query name, args JSON. Pushes the result. */
static int l_query(lua_State *L) {
  instance *in = lua_touserdata(L, 1);
  const char *qname = lua_tostring(L, 2);
  size_t len;
  const char *args = lua_tolstring(L, 3, &len);
  lua_rawgeti(L, LUA_REGISTRYINDEX, in->module_ref);
  if (lua_getfield(L, -1, "queries") != LUA_TTABLE || lua_getfield(L, -1, qname) != LUA_TFUNCTION) {
    lua_pushnil(L);
    return 1;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, in->db_ref);
  char msg[256];
  if (ebb_json_decode(L, args, len, msg, sizeof msg) != 0) luaL_error(L, "arguments: %s", msg);
  if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
    /* ebb.reject(message): the arguments are wrong, a 400 with its message. */
    if (lua_istable(L, -1) && luaL_getmetafield(L, -1, "__ebb") != LUA_TNIL) {
      int rejection = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "rejection") == 0;
      lua_pop(L, 1);
      if (rejection && lua_getfield(L, -1, "message") == LUA_TSTRING) {
        lua_pushboolean(L, 0);
        lua_insert(L, -2);
        return 2;
      }
      if (rejection) lua_pop(L, 1);
    }
    return lua_error(L); /* anything else, a kill included, fails the query as before */
  }
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    ebb_json_push_null(L);
  }
  ebb_buf b = EBB_BUF_INIT;
  if (ebb_json_encode(L, -1, &b, msg, sizeof msg) != 0) {
    ebb_buf_free(&b);
    luaL_error(L, "the result of %s cannot be shown as JSON: %s", qname, msg);
  }
  lua_pushboolean(L, 1);
  lua_pushlstring(L, b.data ? b.data : "null", b.data ? b.len : 4);
  ebb_buf_free(&b);
  return 2;
}

static char *error_body(const char *code, const char *message) {
  ebb_buf b = EBB_BUF_INIT;
  ebb_buf_printf(&b, "{\"error\":{\"code\":\"%s\",\"message\":", code);
  ebb_buf_json_string(&b, message, strlen(message));
  ebb_buf_puts(&b, "}}");
  return ebb_buf_take(&b, NULL);
}

static projection *find(ebb_projections *h, const char *name) {
  for (projection *p = h->list; p; p = p->link)
    if (strcmp(p->name, name) == 0) return p;
  return NULL;
}

static void run_query(ebb_projections *h, job *j) {
  projection *p = find(h, j->name);
  if (p == NULL) {
    char m[400];
    snprintf(m, sizeof m, "no projection %.300s", j->name);
    j->status = 404, j->body = error_body("not_found", m);
    return;
  }
  instance *in = p->active;
  if (in == NULL || in->tainted) {
    char m[400];
    snprintf(m, sizeof m, "projection %.300s has no read model to answer from yet (%s)", p->name,
             p->next ? "rebuilding" : p->load_error ? p->load_error : "not loaded");
    j->status = 503, j->body = error_body("unavailable", m);
    return;
  }
  lua_State *L = ebb_sandbox_state(in->sb);
  ebb_projdb_set_mode(in->handle, EBB_PROJDB_READ);
  lua_pushcfunction(L, l_query);
  lua_pushlightuserdata(L, in);
  lua_pushstring(L, j->query);
  lua_pushstring(L, j->args ? j->args : "{}");
  sql_budget(in);
  int rc = ebb_sandbox_call(in->sb, 3, 2);
  ebb_projdb_set_mode(in->handle, EBB_PROJDB_WRITE);
  if (rc != LUA_OK) {
    if (ebb_sandbox_killed(in->sb)) in->tainted = 1;
    char *m = NULL;
    call_error(in->sb, &m);
    sql_budget_message(in, &m);
    j->status = 500, j->body = error_body("script_error", m ? m : "query failed");
    free(m);
    return;
  }
  if (lua_isnil(L, -2)) {
    char m[400];
    snprintf(m, sizeof m, "projection %.100s has no query %.200s", p->name, j->query);
    j->status = 404, j->body = error_body("not_found", m);
  } else if (!lua_toboolean(L, -2)) {
    j->status = 400, j->body = error_body("bad_request", lua_tostring(L, -1));
  } else {
    j->status = 200, j->body = strdup(lua_tostring(L, -1));
  }
  lua_pop(L, 2);
}

static void status_json(ebb_projections *h, projection *p, int64_t head, ebb_buf *b);

static void run_control(ebb_projections *h, job *j) {
  projection *p = find(h, j->name);
  if (p == NULL) {
    j->status = 404, j->body = error_body("not_found", "no such projection");
    return;
  }
  const char *a = j->action;
  if (strcmp(a, "retry") == 0 || strcmp(a, "skip") == 0) {
    if (p->state != ST_FAULTED) {
      j->status = 409, j->body = error_body("conflict", "the projection is not faulted");
      return;
    }
    instance *in = p->fault_in_next ? p->next : p->active;
    if (strcmp(a, "skip") == 0 && in) {
      sqlite3_stmt *st;
      char now[EBB_TIME_LEN + 1];
      ebb_clock_format(ebb_clock_now_ms(), now);
      int ok = sqlite3_prepare_v2(in->db,
                                  "INSERT OR IGNORE INTO _ebb_skipped (position, error, skipped_at) "
                                  "VALUES (?, ?, ?)",
                                  -1, &st, NULL) == SQLITE_OK;
      if (ok) {
        sqlite3_bind_int64(st, 1, p->fault_position);
        sqlite3_bind_text(st, 2, p->fault ? p->fault : "", -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 3, now, -1, SQLITE_TRANSIENT);
        ok = sqlite3_step(st) == SQLITE_DONE;
        sqlite3_finalize(st);
      }
      if (!ok) {
        j->status = 500, j->body = error_body("storage_error", sqlite3_errmsg(in->db));
        return;
      }
      load_skipped(in);
      char pos[32];
      snprintf(pos, sizeof pos, "%lld", (long long)p->fault_position);
      ebb_log(EBB_LOG_WARN, "projection skipped an event", "projection", p->name, "#position", pos,
              NULL);
    }
    /* A killed Lua state is rebuilt: the code loads again. */
    if ((p->active && p->active->tainted) || (p->next && p->next->tainted)) load_projection(h, p);
    free(p->fault);
    p->fault = NULL;
    p->fault_position = 0;
    p->state = p->next ? ST_REBUILDING : ST_CATCHING_UP;
  } else if (strcmp(a, "rebuild") == 0) {
    char *msg = NULL;
    instance *in = load_module(h, p, &msg);
    if (in == NULL || start_rebuild(h, p, in, &msg) != 0) {
      instance_free(in, 0, NULL);
      j->status = 500, j->body = error_body("script_error", msg ? msg : "cannot rebuild");
      free(msg);
      return;
    }
    if (p->state != ST_FAULTED) p->state = ST_REBUILDING;
    ebb_log(EBB_LOG_INFO, "projection rebuild started", "projection", p->name, NULL);
  } else {
    j->status = 404, j->body = error_body("not_found", "unknown action");
    return;
  }
  ebb_buf b = EBB_BUF_INIT;
  status_json(h, p, h->known_head, &b);
  j->status = 200;
  j->body = ebb_buf_take(&b, NULL);
}

/* ---------------------------------------------------------------- status */

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

static void lag_percentiles(projection *p, int64_t *p50, int64_t *p99) {
  int64_t now = ebb_clock_now_ms();
  if (now - p->lag_sorted_ms < 250) {
    *p50 = p->lag_p50;
    *p99 = p->lag_p99;
    return;
  }
  p->lag_sorted_ms = now;
  *p50 = *p99 = 0;
  if (p->n_lag == 0) return;
  int64_t *s = malloc(p->n_lag * sizeof *s);
  if (s == NULL) return;
  memcpy(s, p->lag, p->n_lag * sizeof *s);
  qsort(s, p->n_lag, sizeof *s, cmp_i64);
  *p50 = p->lag_p50 = s[p->n_lag / 2];
  *p99 = p->lag_p99 = s[(p->n_lag * 99) / 100 < p->n_lag ? (p->n_lag * 99) / 100 : p->n_lag - 1];
  free(s);
}

static void status_json(ebb_projections *h, projection *p, int64_t head, ebb_buf *b) {
  (void)h;
  instance *in = p->active;
  int64_t pos = in ? in->f.position : -1;
  int64_t p50, p99;
  lag_percentiles(p, &p50, &p99);
  ebb_buf_puts(b, "{\"name\":");
  ebb_buf_json_string(b, p->name, strlen(p->name));
  ebb_buf_printf(b, ",\"version\":%lld,\"state\":\"%s\",\"position\":%lld,\"head\":%lld,"
                    "\"lag_events\":%lld,\"lag_ms\":%lld,\"events_per_second\":%.1f,"
                    "\"events_total\":%llu,\"live_lag_ms\":{\"p50\":%lld,\"p99\":%lld},",
                 (long long)(in ? in->version : p->next ? p->next->version : 0),
                 state_names[p->state], (long long)pos, (long long)head,
                 (long long)(in && head > in->f.position ? head - in->f.position : 0),
                 (long long)(p->behind_since_ms ? ebb_clock_now_ms() - p->behind_since_ms : 0),
                 p->eps, (unsigned long long)p->events_total, (long long)p50, (long long)p99);
  ebb_buf_puts(b, "\"from\":[");
  instance *any = in ? in : p->next;
  for (size_t i = 0; any && i < any->f.n_from; i++) {
    if (i) ebb_buf_putc(b, ',');
    ebb_buf_json_string(b, any->f.from[i], strlen(any->f.from[i]));
  }
  ebb_buf_puts(b, "],\"queries\":[");
  for (size_t i = 0; any && i < any->n_queries; i++) {
    if (i) ebb_buf_putc(b, ',');
    ebb_buf_json_string(b, any->queries[i], strlen(any->queries[i]));
  }
  ebb_buf_puts(b, "],\"rebuilding\":");
  if (p->next) ebb_buf_printf(b, "{\"version\":%lld,\"position\":%lld}", (long long)p->next->version,
                              (long long)p->next->f.position);
  else ebb_buf_puts(b, "null");
  ebb_buf_puts(b, ",\"last_error\":");
  if (p->fault) {
    ebb_buf_printf(b, "{\"position\":%lld,\"message\":", (long long)p->fault_position);
    ebb_buf_json_string(b, p->fault, strlen(p->fault));
    ebb_buf_putc(b, '}');
  } else {
    ebb_buf_puts(b, "null");
  }
  ebb_buf_puts(b, ",\"rebuild_reason\":");
  if (p->rebuild_reason) ebb_buf_json_string(b, p->rebuild_reason, strlen(p->rebuild_reason));
  else ebb_buf_puts(b, "null");
  ebb_buf_puts(b, ",\"load_error\":");
  if (p->load_error) ebb_buf_json_string(b, p->load_error, strlen(p->load_error));
  else ebb_buf_puts(b, "null");
  ebb_buf_printf(b, ",\"load_failures\":%llu,\"reloads\":%llu,\"skipped\":[",
                 (unsigned long long)p->load_failures, (unsigned long long)p->reloads);
  for (size_t i = 0; in && i < in->f.n_skipped; i++)
    ebb_buf_printf(b, "%s%lld", i ? "," : "", (long long)in->f.skipped[i]);
  ebb_buf_puts(b, "]}");
}

#define PUBLISH_EVERY_MS 100

/* Copies every projection's status where the loop can read it: the whole of
 * it when `full` (something changed that a reader must see at once) or every
 * PUBLISH_EVERY_MS, else only the positions, which after= waits need now. */
static void publish(ebb_projections *h, int full) {
  int64_t now = ebb_clock_now_ms();
  if (!full && now - h->published_ms < PUBLISH_EVERY_MS) {
    size_t i = 0;
    pthread_mutex_lock(&h->mu);
    for (projection *p = h->list; p && i < h->n_pub; p = p->link, i++)
      if (strcmp(h->pub[i].name, p->name) == 0 && h->pub[i].answers)
        h->pub[i].position = p->active->f.position;
    h->progressed = 1;
    pthread_mutex_unlock(&h->mu);
    uv_async_send(&h->async);
    return;
  }
  h->published_ms = now;
  size_t n = 0;
  for (projection *p = h->list; p; p = p->link) n++;
  published *pub = calloc(n ? n : 1, sizeof *pub);
  if (pub == NULL) return;
  size_t i = 0;
  for (projection *p = h->list; p; p = p->link, i++) {
    ebb_buf b = EBB_BUF_INIT;
    status_json(h, p, h->known_head, &b);
    pub[i].name = strdup(p->name);
    pub[i].json = ebb_buf_take(&b, NULL);
    pub[i].answers = p->active != NULL && !p->active->tainted;
    pub[i].position = pub[i].answers ? p->active->f.position : -1;
    pub[i].state = p->state;
    pub[i].lag_events =
        p->active && h->known_head > p->active->f.position ? h->known_head - p->active->f.position : 0;
    pub[i].lag_s =
        p->behind_since_ms ? (double)(ebb_clock_now_ms() - p->behind_since_ms) / 1000 : 0.0;
    lag_percentiles(p, &pub[i].live_p50, &pub[i].live_p99);
    pub[i].eps = p->eps;
    pub[i].events_total = p->events_total;
    pub[i].load_failures = p->load_failures;
  }
  pthread_mutex_lock(&h->mu);
  published *old = h->pub;
  size_t n_old = h->n_pub;
  h->pub = pub;
  h->n_pub = n;
  h->progressed = 1;
  pthread_mutex_unlock(&h->mu);
  for (size_t k = 0; k < n_old; k++) {
    free(old[k].name);
    free(old[k].json);
  }
  free(old);
  uv_async_send(&h->async);
}

/* ---------------------------------------------------------------- the thread */

/* Changes when any projection changes state (or one is added or removed). */
static unsigned state_signature(ebb_projections *h) {
  unsigned sig = 0, k = 1;
  for (projection *p = h->list; p; p = p->link, k++)
    sig = sig * 31u + k * (unsigned)(p->state + 1) + (p->next != NULL) * 7u +
          (p->load_error != NULL) * 11u;
  return sig;
}

static int behind(ebb_projections *h, int64_t head) {
  for (projection *p = h->list; p; p = p->link) {
    if (p->state == ST_FAULTED || p->state == ST_STOPPED) continue;
    if ((p->active && !p->active->tainted && p->active->f.position < head) ||
        (p->next && !p->next->tainted))
      return 1;
  }
  return 0;
}

static void *host_main(void *arg) {
  ebb_projections *h = arg;
  ebb_error err;
  ebb_error_init(&err);
  pthread_mutex_lock(&h->mu);
  int64_t head = h->head;
  pthread_mutex_unlock(&h->mu);
  h->known_head = head;
  scan(h);
  run_round(h, head); /* also settles the states of projections with nothing to do */
  publish(h, 1);
  for (;;) {
    pthread_mutex_lock(&h->mu);
    while (!h->stopping && !h->rescan && h->in_head == NULL && !behind(h, h->head))
      pthread_cond_wait(&h->cv, &h->mu);
    if (h->stopping) {
      pthread_mutex_unlock(&h->mu);
      break;
    }
    int rescan = h->rescan;
    h->rescan = 0;
    job *jobs = h->in_head;
    h->in_head = h->in_tail = NULL;
    head = h->head;
    pthread_mutex_unlock(&h->mu);
    h->known_head = head;
    if (rescan) {
      /* The aggregates' upcasters may have changed too (SIGHUP rescans). */
      ebb_buf report = EBB_BUF_INIT;
      ebb_error rerr;
      ebb_error_init(&rerr);
      if (ebb_runtime_reload(h->rt, &report, &rerr) != 0)
        ebb_log(EBB_LOG_WARN, "projections keep the upcasters they had", "error", rerr.message,
                NULL);
      ebb_error_clear(&rerr);
      ebb_buf_free(&report);
      scan(h);
    }
    job *done = NULL, **tail = &done;
    for (job *j = jobs, *next; j; j = next) {
      next = j->next;
      if (j->is_query) run_query(h, j);
      else run_control(h, j);
      j->next = NULL;
      *tail = j;
      tail = &j->next;
    }
    unsigned states = state_signature(h);
    run_round(h, head);
    /* Caught up, a state changed, a rescan, or answers: a reader must see it now. */
    publish(h, rescan || done || state_signature(h) != states || !behind(h, head));
    if (done) {
      pthread_mutex_lock(&h->mu);
      if (h->out_tail) h->out_tail->next = done;
      else h->out_head = done;
      while (done->next) done = done->next;
      h->out_tail = done;
      pthread_mutex_unlock(&h->mu);
      uv_async_send(&h->async);
    }
  }
  return NULL;
}

/* ---------------------------------------------------------------- the loop's side */

static void job_free(job *j) {
  free(j->name);
  free(j->query);
  free(j->args);
  free(j->action);
  free(j->body);
  free(j);
}

static void on_async(uv_async_t *a) {
  ebb_projections *h = a->data;
  pthread_mutex_lock(&h->mu);
  job *j = h->out_head;
  h->out_head = h->out_tail = NULL;
  int progressed = h->progressed;
  h->progressed = 0;
  pthread_mutex_unlock(&h->mu);
  while (j) {
    job *next = j->next;
    char *body = j->body;
    j->body = NULL;
    j->cb(j->ud, j->status, body);
    job_free(j);
    j = next;
  }
  if (progressed && h->o.on_progress) h->o.on_progress(h->o.ud);
}

/* Frees what the host owns on the loop's side (the thread has ended). */
static void host_free(ebb_projections *h) {
  for (size_t k = 0; k < h->n_pub; k++) {
    free(h->pub[k].name);
    free(h->pub[k].json);
  }
  free(h->pub);
  free(h->data_dir);
  free(h->store);
  free(h->projections_dir);
  free(h->aggregates_dir);
  free(h->lua_dir);
  free(h->models_dir);
  free(h);
}

int ebb_projections_start(ebb_projections **out, const ebb_projections_options *opt,
                          ebb_error *err) {
  *out = NULL;
  ebb_projections *h = calloc(1, sizeof *h);
  if (h == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  h->o = *opt;
  h->data_dir = strdup(opt->data_dir);
  h->store = opt->store ? strdup(opt->store) : NULL;
  h->projections_dir = strdup(opt->projections_dir);
  h->aggregates_dir = strdup(opt->aggregates_dir);
  h->lua_dir = strdup(opt->lua_dir ? opt->lua_dir : ebb_paths_lua_dir());
  h->models_dir = ebb_strdupf("%s/projections", opt->data_dir);
  if (!h->data_dir || (opt->store && !h->store) || !h->projections_dir || !h->aggregates_dir || !h->lua_dir || !h->models_dir) {
    ebb_error_set(err, EBB_ENOMEM, "out of memory");
    goto fail;
  }
  ebb_runtime_options ro = {.data_dir = h->data_dir, .store = h->store, .aggregates_dir = h->aggregates_dir,
                            .lua_dir = h->lua_dir, .durability = EBB_DURABILITY_NORMAL,
                            .memory_limit = opt->memory_limit,
                            .instruction_budget = opt->instruction_budget, .cache_size = -1,
                            .no_snapshots = 1};
  if (ebb_runtime_open(&h->rt, &ro, err) != 0) goto fail;
  if (ebb_store_head(ebb_runtime_store(h->rt), &h->head, err) != 0) goto fail;
  pthread_mutex_init(&h->mu, NULL);
  pthread_cond_init(&h->cv, NULL);
  uv_async_init(opt->loop, &h->async, on_async);
  h->async.data = h;
  if (pthread_create(&h->thread, NULL, host_main, h) != 0) {
    ebb_error_set(err, EBB_ENOMEM, "cannot start the projection thread");
    h->started = 0;
    ebb_projections_stop(h);
    return err->code;
  }
  h->started = 1;
  *out = h;
  return 0;
fail:
  ebb_runtime_close(h->rt);
  host_free(h);
  return err->code;
}

static void on_closed(uv_handle_t *handle) {
  host_free(handle->data);
}

void ebb_projections_stop(ebb_projections *h) {
  if (h == NULL) return;
  if (h->started) {
    pthread_mutex_lock(&h->mu);
    h->stopping = 1;
    pthread_cond_signal(&h->cv);
    pthread_mutex_unlock(&h->mu);
    pthread_join(h->thread, NULL);
  }
  /* Answer what is still queued, then what was answered but not delivered. */
  for (job *j = h->in_head; j; j = j->next) {
    j->status = 503;
    j->body = error_body("unavailable", "ebb is shutting down");
  }
  pthread_mutex_lock(&h->mu);
  if (h->in_head) {
    if (h->out_tail) h->out_tail->next = h->in_head;
    else h->out_head = h->in_head;
    h->out_tail = h->in_tail;
  }
  h->in_head = h->in_tail = NULL;
  h->o.on_progress = NULL;
  pthread_mutex_unlock(&h->mu);
  on_async(&h->async);
  while (h->list) {
    projection *p = h->list;
    h->list = p->link;
    projection_free(h, p);
  }
  ebb_runtime_close(h->rt);
  h->rt = NULL;
  pthread_cond_destroy(&h->cv);
  pthread_mutex_destroy(&h->mu);
  uv_close((uv_handle_t *)&h->async, on_closed);
}

void ebb_projections_notify(ebb_projections *h, int64_t head) {
  pthread_mutex_lock(&h->mu);
  if (head > h->head) {
    h->head = head;
    pthread_cond_signal(&h->cv);
  }
  pthread_mutex_unlock(&h->mu);
}

void ebb_projections_rescan(ebb_projections *h) {
  pthread_mutex_lock(&h->mu);
  h->rescan = 1;
  pthread_cond_signal(&h->cv);
  pthread_mutex_unlock(&h->mu);
}

static void submit(ebb_projections *h, job *j) {
  pthread_mutex_lock(&h->mu);
  if (h->in_tail) h->in_tail->next = j;
  else h->in_head = j;
  h->in_tail = j;
  pthread_cond_signal(&h->cv);
  pthread_mutex_unlock(&h->mu);
}

void ebb_projections_query(ebb_projections *h, const char *name, const char *query,
                           const char *args_json, ebb_projection_answer cb, void *ud) {
  job *j = calloc(1, sizeof *j);
  if (j == NULL || !(j->name = strdup(name)) || !(j->query = strdup(query)) ||
      !(j->args = strdup(args_json ? args_json : "{}"))) {
    if (j) job_free(j);
    cb(ud, 503, error_body("out_of_memory", "out of memory"));
    return;
  }
  j->is_query = 1;
  j->cb = cb;
  j->ud = ud;
  submit(h, j);
}

void ebb_projections_control(ebb_projections *h, const char *name, const char *action,
                             ebb_projection_answer cb, void *ud) {
  job *j = calloc(1, sizeof *j);
  if (j == NULL || !(j->name = strdup(name)) || !(j->action = strdup(action))) {
    if (j) job_free(j);
    cb(ud, 503, error_body("out_of_memory", "out of memory"));
    return;
  }
  j->cb = cb;
  j->ud = ud;
  submit(h, j);
}

int ebb_projections_status(ebb_projections *h, const char *name, ebb_buf *out) {
  int found = 0;
  pthread_mutex_lock(&h->mu);
  if (name == NULL) ebb_buf_putc(out, '[');
  for (size_t i = 0; i < h->n_pub; i++) {
    if (name && strcmp(h->pub[i].name, name) != 0) continue;
    if (found && name == NULL) ebb_buf_putc(out, ',');
    ebb_buf_puts(out, h->pub[i].json ? h->pub[i].json : "{}");
    found++;
  }
  if (name == NULL) ebb_buf_putc(out, ']');
  pthread_mutex_unlock(&h->mu);
  return name == NULL ? 1 : found;
}

int64_t ebb_projections_position(ebb_projections *h, const char *name) {
  int64_t pos = -1;
  pthread_mutex_lock(&h->mu);
  for (size_t i = 0; i < h->n_pub; i++)
    if (strcmp(h->pub[i].name, name) == 0) pos = h->pub[i].position;
  pthread_mutex_unlock(&h->mu);
  return pos;
}

static void family(ebb_buf *b, const char *name, const char *type, const char *help) {
  ebb_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void ebb_projections_metrics(ebb_projections *h, ebb_buf *out) {
  pthread_mutex_lock(&h->mu);
  published *p = h->pub;
  size_t n = h->n_pub;
  family(out, "ebb_projection_position", "gauge", "Last event position in the active read model.");
  for (size_t i = 0; i < n; i++)
    ebb_buf_printf(out, "ebb_projection_position{projection=\"%s\"} %lld\n", p[i].name,
                   (long long)p[i].position);
  family(out, "ebb_projection_lag_events", "gauge", "Events committed and not yet processed.");
  for (size_t i = 0; i < n; i++)
    ebb_buf_printf(out, "ebb_projection_lag_events{projection=\"%s\"} %lld\n", p[i].name,
                   (long long)p[i].lag_events);
  family(out, "ebb_projection_lag_seconds", "gauge", "How long the projection has been behind.");
  for (size_t i = 0; i < n; i++)
    ebb_buf_printf(out, "ebb_projection_lag_seconds{projection=\"%s\"} %.3f\n", p[i].name,
                   p[i].lag_s);
  family(out, "ebb_projection_live_lag_seconds", "summary",
         "Recorded (command decided) to handled, over the last 4096 events handled live.");
  for (size_t i = 0; i < n; i++)
    ebb_buf_printf(out,
                   "ebb_projection_live_lag_seconds{projection=\"%s\",quantile=\"0.5\"} %.3f\n"
                   "ebb_projection_live_lag_seconds{projection=\"%s\",quantile=\"0.99\"} %.3f\n",
                   p[i].name, (double)p[i].live_p50 / 1000, p[i].name,
                   (double)p[i].live_p99 / 1000);
  family(out, "ebb_projection_events_total", "counter", "Events handled.");
  for (size_t i = 0; i < n; i++)
    ebb_buf_printf(out, "ebb_projection_events_total{projection=\"%s\"} %llu\n", p[i].name,
                   (unsigned long long)p[i].events_total);
  family(out, "ebb_projection_events_per_second", "gauge", "Events handled per second, smoothed.");
  for (size_t i = 0; i < n; i++)
    ebb_buf_printf(out, "ebb_projection_events_per_second{projection=\"%s\"} %.1f\n", p[i].name,
                   p[i].eps);
  family(out, "ebb_projection_load_failures_total", "counter",
         "Changed modules that failed to load (the old code stayed).");
  for (size_t i = 0; i < n; i++)
    ebb_buf_printf(out, "ebb_projection_load_failures_total{projection=\"%s\"} %llu\n",
                   p[i].name, (unsigned long long)p[i].load_failures);
  family(out, "ebb_projection_state", "gauge", "1 for the projection's state.");
  for (size_t i = 0; i < n; i++)
    for (int st = 0; st < 5; st++)
      ebb_buf_printf(out, "ebb_projection_state{projection=\"%s\",state=\"%s\"} %d\n",
                     p[i].name, state_names[st], p[i].state == st);
  pthread_mutex_unlock(&h->mu);
}
