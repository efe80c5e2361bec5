/*
 * daemon.c: `ebb serve` (see daemon.h): start-up, routes, the command
 * pipeline, and the graceful shutdown.
 *
 * A command goes: parse (read off the body's text; a private Lua state
 * decodes any other spelling, and gives the errors) -> the queue
 * of its stream -> decided on the loop when it reaches the head -> its append
 * handed to the writer -> reported back -> finished (state cached, answer
 * made) -> answered, and the next command of the stream starts. Nothing is
 * answered before its events are committed at the configured durability.
 */
#include "daemon.h"

#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "clock.h"
#include "json.h"
#include "log.h"
#include "request.h"
#include "uuid.h"
#include "version.h"

#define DEFAULT_LIMIT 1000
#define MAX_LIMIT 10000

const char *const ebb__route_names[N_ROUTES] = {
    "commands", "append",  "stream",      "events",     "subscribe",          "aggregate",
    "health",   "metrics", "projections", "projection_query", "projection_control", "reactors",
    "streams_list", "modules", "console", "other"};

/* ---------------------------------------------------------------- errors */

int ebb__status_of(int code) {
  switch (code) {
    case EBB_EBADREQ: return 400;
    case EBB_ENOTFOUND: return 404;
    case EBB_EVERSION:
    case EBB_ECONFLICT: return 409;
    case EBB_EDELETED: return 410;
    case EBB_ETOOLARGE: return 413;
    case EBB_EREJECTED: return 422;
    case EBB_EBUSY:
    case EBB_EUNAVAIL: return 503;
    case EBB_ETIMEOUT: return 504;
    default: return 500;
  }
}

void ebb__error_json(const ebb_error *err, ebb_buf *out) {
  ebb_buf_puts(out, "{\"error\":{\"code\":\"");
  ebb_buf_puts(out, ebb_error_name(err->code));
  ebb_buf_puts(out, "\",\"message\":");
  ebb_buf_json_string(out, err->message, strlen(err->message));
  if (err->code == EBB_EVERSION) {
    char buf[24];
    const char *e = ebb_expected_name(err->expected, buf, sizeof buf);
    ebb_buf_puts(out, ",\"expected\":");
    if (err->expected >= 0) ebb_buf_puts(out, e);
    else ebb_buf_json_string(out, e, strlen(e));
    ebb_buf_printf(out, ",\"actual\":%lld", (long long)err->actual);
  }
  if (err->details) {
    ebb_buf_puts(out, ",\"details\":");
    ebb_buf_puts(out, err->details);
  }
  ebb_buf_puts(out, "}}");
}

/* ---------------------------------------------------------------- answering */

/* What a request needs to be logged and counted when it is answered. */
typedef struct reqinfo {
  int route;
  uint64_t t0;
  char method[8];
  char path[256];
} reqinfo;

/* dst = src cut to fit, as snprintf "%s" would, without its cost. */
static void copy_cut(char *dst, size_t size, const char *src) {
  size_t n = strnlen(src, size - 1);
  memcpy(dst, src, n);
  dst[n] = '\0';
}

static void reqinfo_init(reqinfo *ri, const ebb_http_request *req) {
  ri->route = ROUTE_OTHER;
  ri->t0 = ebb_clock_mono_ns();
  copy_cut(ri->method, sizeof ri->method, req->method);
  copy_cut(ri->path, sizeof ri->path, req->path);
}

static void log_request(ebb_daemon *d, const reqinfo *ri, int status, const char *error) {
  ebb_metrics *m = &d->m;
  ebb__metrics_count_request(m, ri->route, status);
  ebb_log_level level = status >= 500 ? EBB_LOG_ERROR : EBB_LOG_DEBUG;
  if (!ebb_log_enabled(level)) return;
  char st[8], ms[32];
  snprintf(st, sizeof st, "%d", status);
  snprintf(ms, sizeof ms, "%.3f", (double)(ebb_clock_mono_ns() - ri->t0) / 1e6);
  ebb_log(level, "request", "method", ri->method, "path", ri->path, "#status", st, "#ms", ms,
          error ? "error" : NULL, error, NULL);
}

static void answer(ebb_daemon *d, ebb_http_conn *c, const reqinfo *ri, int status,
                   const char *body, size_t len) {
  if (c) ebb_http_respond(c, status, "application/json", NULL, body, len);
  log_request(d, ri, status, NULL);
}

static void answer_error(ebb_daemon *d, ebb_http_conn *c, const reqinfo *ri, ebb_error *err) {
  int status = ebb__status_of(err->code);
  ebb_buf b = EBB_BUF_INIT;
  ebb__error_json(err, &b);
  if (c) ebb_http_respond(c, status, "application/json", NULL, b.data, b.len);
  log_request(d, ri, status, err->message);
  ebb_buf_free(&b);
  ebb_error_clear(err);
}

static void answer_fail(ebb_daemon *d, ebb_http_conn *c, const reqinfo *ri, int code,
                        const char *fmt, const char *arg) {
  ebb_error err;
  ebb_error_init(&err);
  ebb_error_set(&err, code, fmt, arg);
  answer_error(d, c, ri, &err);
}

/* ---------------------------------------------------------------- body parsing */

/* A command or an append, from its arrival to its answer. */
typedef struct job {
  ebb_daemon *d;
  ebb_http_conn *conn;       /* NULL once the client is gone */
  reqinfo ri;
  struct stream_queue *queue;
  struct job *next;          /* in the queue */
  char stream[EBB_MAX_NAME + 1];
  char now[EBB_TIME_LEN + 1];  /* recorded_at of an append's events */
  int is_append;
  /* a command: strings owned */
  ebb_command cmd;
  ebb_decided *dc;
  /* an append */
  ebb_append req;
  ebb_event_in *in;
  size_t n_in;
  char **owned;
  size_t n_owned, cap_owned;
  ebb_write write;
  ebb_reactor_issued done;   /* a command a reactor issued: told instead of a client */
  void *done_ud;
  /* a command's stream read off the loop (see prefetch) */
  int prefetched, pre_ready, pre_final;
  struct job *pre_next;      /* waiting for a batch */
  ebb_event_list pre;
  int pre_complete, pre_unknown_id;
  ebb_error pre_err;
} job;

typedef struct stream_queue {
  job *head, *tail;
} stream_queue;

static char *own(job *j, char *s) {
  if (s == NULL) return NULL;
  if (j->n_owned == j->cap_owned) {
    size_t cap = j->cap_owned ? j->cap_owned * 2 : 16;
    char **p = realloc(j->owned, cap * sizeof *p);
    if (p == NULL) {
      free(s);
      return NULL;
    }
    j->owned = p;
    j->cap_owned = cap;
  }
  j->owned[j->n_owned++] = s;
  return s;
}

#define MAX_SPARE_JOBS 256

static void job_free(job *j) {
  if (j == NULL) return;
  ebb_daemon *d = j->d;
  if (j->dc) ebb_decided_free(d->rt, j->dc);
  for (size_t i = 0; i < j->n_owned; i++) free(j->owned[i]);
  free(j->owned);
  free(j->in);
  ebb_error_clear(&j->req.err);
  ebb_error_clear(&j->pre_err);
  ebb_event_list_free(&j->pre);
  /* Kept for the next request: see MAX_SPARE in runtime.c. */
  if (d->n_spare_jobs < MAX_SPARE_JOBS) {
    j->next = d->spare_jobs;
    d->spare_jobs = j;
    d->n_spare_jobs++;
    return;
  }
  free(j);
}

/* Raises unless the value at idx is a JSON object (a table without the array mark). */
static void check_object(lua_State *L, int idx, const char *what) {
  if (!lua_istable(L, idx) || lua_getmetatable(L, idx))
    luaL_error(L, "%s must be a JSON object", what);
}

static const char *take_string(lua_State *L, job *j, int t, const char *k, int required) {
  int type = lua_getfield(L, t, k);
  if (type == LUA_TNIL && !required) {
    lua_pop(L, 1);
    return NULL;
  }
  if (type != LUA_TSTRING) luaL_error(L, "\"%s\" must be a string", k);
  size_t len;
  const char *v = lua_tolstring(L, -1, &len);
  if (strlen(v) != len) luaL_error(L, "\"%s\" contains a NUL character", k);
  char *s = own(j, strdup(v));
  lua_pop(L, 1);
  if (s == NULL) luaL_error(L, "out of memory");
  return s;
}

/* An object member as JSON text ("{}" when absent): its own bytes in the
 * body (text, len) when they can be found, else encoded again. */
static const char *take_object(lua_State *L, job *j, int t, const char *k, size_t *len,
                               const char *text, size_t text_len) {
  if (lua_getfield(L, t, k) == LUA_TNIL) {
    lua_pop(L, 1);
    *len = 2;
    return "{}";
  }
  check_object(L, -1, k);
  const char *v;
  size_t vlen;
  if (text && ebb_json_member(text, text_len, k, &v, &vlen) == 1) {
    char *copy = own(j, malloc(vlen + 1));
    if (copy == NULL) luaL_error(L, "out of memory");
    memcpy(copy, v, vlen);
    copy[vlen] = '\0';
    *len = vlen;
    lua_pop(L, 1);
    return copy;
  }
  ebb_buf b = EBB_BUF_INIT;
  char msg[256];
  if (ebb_json_encode(L, -1, &b, msg, sizeof msg) != 0) {
    ebb_buf_free(&b);
    luaL_error(L, "\"%s\": %s", k, msg);
  }
  char *s = own(j, ebb_buf_take(&b, len));
  if (s == NULL) luaL_error(L, "out of memory");
  lua_pop(L, 1);
  return s;
}

static int64_t take_expected(lua_State *L, int t, int *has) {
  int type = lua_getfield(L, t, "expected_version");
  int64_t v = EBB_EXPECT_ANY;
  *has = type != LUA_TNIL;
  if (type == LUA_TNUMBER && lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 0) {
    v = lua_tointeger(L, -1);
  } else if (type == LUA_TSTRING) {
    if (ebb_parse_expected(lua_tostring(L, -1), &v) != 0) type = LUA_TNONE;
  } else if (type != LUA_TNIL) {
    type = LUA_TNONE;
  }
  if (type == LUA_TNONE)
    luaL_error(L, "\"expected_version\" must be a version (0 or more) or \"any\", \"no_stream\" "
                  "or \"exists\"");
  lua_pop(L, 1);
  return v;
}

static void only_fields(lua_State *L, int t, const char *const *allowed, const char *what) {
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    const char *k = lua_tostring(L, -1);
    int ok = 0;
    for (const char *const *a = allowed; *a; a++) ok |= strcmp(*a, k) == 0;
    if (!ok) luaL_error(L, "unknown field \"%s\" in %s", k, what);
  }
}

/* Arguments: body text, the job. Fills the job's command; raises with a message. */
static int l_parse_command(lua_State *L) {
  size_t len;
  const char *text = lua_tolstring(L, 1, &len);
  job *j = lua_touserdata(L, 2);
  char msg[256];
  if (ebb_json_decode_document(L, text, len, msg, sizeof msg) != 0)
    luaL_error(L, "malformed JSON: %s", msg);
  check_object(L, -1, "a command");
  int t = lua_gettop(L);
  static const char *const fields[] = {"aggregate",  "id",       "type", "data", "expected_version",
                                       "command_id", "metadata", NULL};
  only_fields(L, t, fields, "a command");
  ebb_command *c = &j->cmd;
  c->aggregate = take_string(L, j, t, "aggregate", 1);
  c->id = take_string(L, j, t, "id", 1);
  c->type = take_string(L, j, t, "type", 1);
  c->command_id = take_string(L, j, t, "command_id", 0);
  c->data = take_object(L, j, t, "data", &c->data_len, text, len);
  c->metadata = take_object(L, j, t, "metadata", &c->metadata_len, text, len);
  c->expected = take_expected(L, t, &c->has_expected);
  return 0;
}

/* Arguments: body text, the job (stream set). Fills the job's append request. */
static int l_parse_append(lua_State *L) {
  size_t len;
  const char *text = lua_tolstring(L, 1, &len);
  job *j = lua_touserdata(L, 2);
  char msg[256];
  if (ebb_json_decode_document(L, text, len, msg, sizeof msg) != 0)
    luaL_error(L, "malformed JSON: %s", msg);
  check_object(L, -1, "an append");
  int t = lua_gettop(L);
  static const char *const fields[] = {"expected_version", "events", NULL};
  only_fields(L, t, fields, "an append");
  int has;
  j->req.expected = take_expected(L, t, &has);
  if (lua_getfield(L, t, "events") != LUA_TTABLE || !lua_getmetatable(L, -1))
    luaL_error(L, "\"events\" must be a JSON array of events");
  lua_pop(L, 1);
  int ev = lua_gettop(L);
  lua_Integer n = luaL_len(L, ev);
  ebb_clock_format(ebb_clock_now_ms(), j->now);
  if (n < 1 || n > 100000) luaL_error(L, "\"events\" must hold from 1 to 100000 events");
  j->in = calloc(n < 1 ? 1 : (size_t)n, sizeof *j->in);
  if (j->in == NULL) luaL_error(L, "out of memory");
  j->n_in = (size_t)n;
  static const char *const efields[] = {"id", "type", "data", "metadata", "schema", NULL};
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, ev, i);
    int e = lua_gettop(L);
    char what[32];
    snprintf(what, sizeof what, "event %lld", (long long)i);
    check_object(L, e, what);
    only_fields(L, e, efields, what);
    ebb_event_in *in = &j->in[i - 1];
    in->id = take_string(L, j, e, "id", 0);
    if (in->id == NULL) {
      char *id = own(j, malloc(EBB_UUID_LEN + 1));
      if (id == NULL) luaL_error(L, "out of memory");
      ebb_uuid_new(id);
      in->id = id;
    }
    in->type = take_string(L, j, e, "type", 1);
    in->recorded_at = j->now;
    in->data = take_object(L, j, e, "data", &in->data_len, NULL, 0);
    in->metadata = take_object(L, j, e, "metadata", &in->metadata_len, NULL, 0);
    int st = lua_getfield(L, e, "schema");
    if (st != LUA_TNIL && (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1))
      luaL_error(L, "%s: \"schema\" must be a positive integer", what);
    in->schema = st == LUA_TNIL ? ebb_runtime_schema_of(j->d->rt, in->type) : lua_tointeger(L, -1);
    ebb_error serr;
    ebb_error_init(&serr);
    if (ebb_runtime_check_schema(j->d->rt, in->type, in->schema, &serr) != 0) {
      lua_pushfstring(L, "%s: %s", what, serr.message);
      ebb_error_clear(&serr);
      lua_error(L);
    }
    lua_pop(L, 2);
  }
  j->req.stream = j->stream;
  j->req.events = j->in;
  j->req.n = j->n_in;
  return 0;
}

/* ---- POST /commands without a Lua state: the common case of a well-formed
 * command is read straight off the body's text (ebb_json_members checks it
 * with the decoder's own parser). Anything else -- an error, a key spelled
 * with escapes, a string with escapes, a repeated member -- goes to
 * l_parse_command, which gives the one answer (and error message) there is;
 * so this path only ever takes what that one would take, the same way. */

enum { CF_AGGREGATE, CF_ID, CF_TYPE, CF_DATA, CF_EXPECTED, CF_COMMAND_ID, CF_METADATA, CF_N };

typedef struct command_fields {
  const char *v[CF_N];
  size_t len[CF_N];
  unsigned seen;
} command_fields;

static int command_field(void *ud, const char *k, size_t klen, int escaped, const char *v,
                         size_t vlen) {
  static const char *const names[CF_N] = {"aggregate",        "id",         "type",    "data",
                                          "expected_version", "command_id", "metadata"};
  command_fields *f = ud;
  if (escaped) return 1;
  for (int i = 0; i < CF_N; i++) {
    if (strlen(names[i]) != klen || memcmp(names[i], k, klen) != 0) continue;
    if (f->seen & (1u << i)) return 1;
    f->seen |= 1u << i;
    f->v[i] = v;
    f->len[i] = vlen;
    return 0;
  }
  return 1;
}

/* A JSON string value (as written, quotes included) with no escapes: its
 * bytes are the string's (the parser refused raw control characters, NUL
 * among them). */
static int plain_string(const char *v, size_t len) {
  return len >= 2 && v[0] == '"' && memchr(v + 1, '\\', len - 2) == NULL;
}

/* expected_version as take_expected reads it: 1 when v is one it takes. */
static int plain_expected(const char *v, size_t len, int64_t *out) {
  if (v[0] == '"') {
    char s[24];
    if (!plain_string(v, len) || len - 2 >= sizeof s) return 0;
    memcpy(s, v + 1, len - 2);
    s[len - 2] = '\0';
    return ebb_parse_expected(s, out) == 0;
  }
  uint64_t u = 0;
  for (size_t i = 0; i < len; i++) { /* a JSON integer literal (checked), 0 or more */
    if (v[i] < '0' || v[i] > '9' || u > ((uint64_t)INT64_MAX - (uint64_t)(v[i] - '0')) / 10) return 0;
    u = u * 10 + (uint64_t)(v[i] - '0');
  }
  *out = (int64_t)u;
  return 1;
}

/* 1: the command is in j->cmd; 0: l_parse_command must read the body. */
static int parse_command_plain(job *j, const char *text, size_t len) {
  command_fields f = {{NULL}, {0}, 0};
  if (len == 0 || ebb_json_members(text, len, command_field, &f) != 0) return 0;
  int64_t expected = EBB_EXPECT_ANY;
  for (int i = CF_AGGREGATE; i <= CF_TYPE; i++)
    if (!f.v[i] || !plain_string(f.v[i], f.len[i])) return 0;
  if ((f.v[CF_COMMAND_ID] && !plain_string(f.v[CF_COMMAND_ID], f.len[CF_COMMAND_ID])) ||
      (f.v[CF_DATA] && f.v[CF_DATA][0] != '{') ||
      (f.v[CF_METADATA] && f.v[CF_METADATA][0] != '{') ||
      (f.v[CF_EXPECTED] && !plain_expected(f.v[CF_EXPECTED], f.len[CF_EXPECTED], &expected)))
    return 0;
  /* One block for the command's strings, each NUL-terminated. */
  size_t total = 0;
  for (int i = 0; i < CF_N; i++) total += f.len[i] + 1;
  char *p = own(j, malloc(total));
  if (p == NULL) return 0;
  const char *out[CF_N] = {NULL};
  for (int i = 0; i < CF_N; i++) {
    if (f.v[i] == NULL || i == CF_EXPECTED) continue;
    int quoted = f.v[i][0] == '"';
    size_t n = f.len[i] - (quoted ? 2 : 0);
    memcpy(p, f.v[i] + quoted, n);
    p[n] = '\0';
    out[i] = p;
    f.len[i] = n;
    p += n + 1;
  }
  ebb_command *c = &j->cmd;
  c->aggregate = out[CF_AGGREGATE];
  c->id = out[CF_ID];
  c->type = out[CF_TYPE];
  c->command_id = out[CF_COMMAND_ID];
  c->data = out[CF_DATA] ? out[CF_DATA] : "{}";
  c->data_len = out[CF_DATA] ? f.len[CF_DATA] : 2;
  c->metadata = out[CF_METADATA] ? out[CF_METADATA] : "{}";
  c->metadata_len = out[CF_METADATA] ? f.len[CF_METADATA] : 2;
  c->expected = expected;
  c->has_expected = f.v[CF_EXPECTED] != NULL;
  return 1;
}

/* Runs a parser in the daemon's private Lua state. */
static int parse_body(ebb_daemon *d, lua_CFunction fn, const ebb_http_request *req, job *j,
                      ebb_error *err) {
  lua_State *L = d->parser;
  lua_settop(L, 0);
  lua_pushcfunction(L, fn);
  lua_pushlstring(L, req->body, req->body_len);
  lua_pushlightuserdata(L, j);
  int rc = lua_pcall(L, 2, 0, 0);
  if (rc != LUA_OK) {
    ebb_error_set(err, rc == LUA_ERRMEM ? EBB_ENOMEM : EBB_EBADREQ, "%s",
                  lua_isstring(L, -1) ? lua_tostring(L, -1) : "cannot parse the body");
  }
  lua_settop(L, 0);
  lua_gc(L, LUA_GCSTEP, 0);
  return err->code;
}

/* ---------------------------------------------------------------- the command pipeline */

static void check_drained(ebb_daemon *d);
static void schedule_pump(ebb_daemon *d);

static void on_conn_close(ebb_http_conn *c, void *data) {
  (void)c;
  job *j = data;
  j->conn = NULL;
}

/* Answers the job, takes it off its queue and frees it. */
static void job_end(job *j, int status, char *body, size_t len, ebb_error *err) {
  ebb_daemon *d = j->d;
  if (j->conn) ebb_http_conn_set_data(j->conn, NULL, NULL);
  if (j->done) {
    ebb_error ok;
    ebb_error_init(&ok);
    j->done(j->done_ud, err ? err : &ok);
    j->done = NULL;
  }
  if (err) {
    if (!j->is_append) d->m.commands[-err->code < 16 ? -err->code : 15]++;
    answer_error(d, j->conn, &j->ri, err);
  } else {
    if (!j->is_append) d->m.commands[0]++;
    answer(d, j->conn, &j->ri, status, body, len);
  }
  free(body);
  stream_queue *q = j->queue;
  q->head = j->next;
  if (q->head == NULL) q->tail = NULL;
  job_free(j);
  d->jobs--;
}

static void submit(ebb_daemon *d, job *j, ebb_append *req) {
  j->write = (ebb_write){.req = req, .ud = j, .snapshots = ebb_runtime_take_snapshots(d->rt)};
  ebb_writer_submit(d->writer, &j->write);
}

/* Completes a decided command whose append is done (or needed none).
 * 1 when the job ended, 0 when it was decided again and is in flight. */
static int job_finish(job *j) {
  ebb_daemon *d = j->d;
  char *result = NULL;
  ebb_error err;
  ebb_error_init(&err);
  ebb_decided *dc = j->dc;
  j->dc = NULL;
  int rc = ebb_runtime_finish(d->rt, dc, &result, &err);
  if (rc == EBB_RETRY) { /* decided on stale state: read again (off the loop on PostgreSQL) */
    j->prefetched = 0;
    return 0;
  }
  if (rc != 0) {
    job_end(j, 0, NULL, 0, &err);
    return 1;
  }
  job_end(j, 200, result, strlen(result), NULL);
  return 1;
}

static void run_queue(ebb_daemon *d, stream_queue *q, const char *stream);

/* Runs the queue j heads. The job may end (and be freed) at once: the queue
 * is keyed by a copy of its stream. */
static void run_queue_of(job *j) {
  char stream[EBB_MAX_NAME + 1];
  memcpy(stream, j->stream, sizeof stream);
  run_queue(j->d, j->queue, stream);
}

/* A command on a stream the runtime has not cached must read it before
 * deciding. On SQLite that read is a local page-cache read, cheaper than a
 * hand-over; on PostgreSQL it is a round trip, and one to a server that has
 * stopped answering would stop the loop and every request with it. There,
 * a reader's store handle reads the stream (and looks up the command id) on
 * libuv's thread pool, and the loop decides once it is back. The commands
 * that arrive while EBB_PREFETCH_BATCHES such reads are out wait, and go
 * together in the next (ebb_store_prefetch: one round trip for them all):
 * one per command cost the server two statements, more than the command's
 * share of its commit (bench postgres, opens). */
#define EBB_PREFETCH_BATCHES 2
#define EBB_PREFETCH_MAX 128

typedef struct prefetch_batch {
  uv_work_t work;
  ebb_daemon *d;
  size_t n; /* 0: idle */
  ebb_error err;
  job *jobs[EBB_PREFETCH_MAX];
  ebb_prefetch items[EBB_PREFETCH_MAX];
} prefetch_batch;

static void prefetch_work(uv_work_t *w) {
  prefetch_batch *b = w->data;
  ebb_runtime *rt = ebb_readers_take(b->d->readers, &b->err);
  if (rt == NULL) return;
  ebb_store_prefetch(ebb_runtime_store(rt), b->items, b->n, EBB_PRELOAD_EVENTS, &b->err);
  ebb_readers_give(b->d->readers, rt);
}

static void prefetch_kick(ebb_daemon *d);

static void prefetch_done(uv_work_t *w, int status) {
  prefetch_batch *b = w->data;
  ebb_daemon *d = b->d;
  if (status == UV_ECANCELED && b->err.code == 0)
    ebb_error_set(&b->err, EBB_EUNAVAIL, "ebb is shutting down");
  job *jobs[EBB_PREFETCH_MAX];
  size_t n = b->n;
  for (size_t i = 0; i < n; i++) {
    job *j = jobs[i] = b->jobs[i];
    ebb_prefetch *it = &b->items[i];
    if (b->err.code) ebb_error_set(&j->pre_err, b->err.code, "%s", b->err.message);
    else if (it->err.code) ebb_error_move(&j->pre_err, &it->err);
    j->pre_complete = j->pre.n < EBB_PRELOAD_EVENTS;
    j->pre_unknown_id = j->cmd.command_id && !it->command_known;
    j->pre_ready = 1;
    ebb_error_clear(&it->err);
  }
  ebb_error_clear(&b->err);
  b->n = 0;
  /* Stopped: nothing more is read, the waiting are answered 503 as they start. */
  job *waiting = d->stopped ? d->pre_head : NULL;
  if (waiting) d->pre_head = d->pre_tail = NULL;
  else prefetch_kick(d); /* the next batch goes out before these are decided */
  for (size_t i = 0; i < n; i++) run_queue_of(jobs[i]);
  while (waiting) {
    job *j = waiting;
    waiting = j->pre_next;
    run_queue_of(j);
  }
}

/* Sends the waiting commands' reads, in batches, while one is idle. */
static void prefetch_kick(ebb_daemon *d) {
  for (int k = 0; k < EBB_PREFETCH_BATCHES && d->pre_head; k++) {
    prefetch_batch *b = &d->pre_batches[k];
    if (b->n) continue;
    b->d = d;
    while (d->pre_head && b->n < EBB_PREFETCH_MAX) {
      job *j = d->pre_head;
      d->pre_head = j->pre_next;
      b->jobs[b->n] = j;
      b->items[b->n] = (ebb_prefetch){.stream = j->stream, .command_id = j->cmd.command_id,
                                      .events = &j->pre};
      ebb_error_init(&b->items[b->n].err);
      b->n++;
    }
    if (d->pre_head == NULL) d->pre_tail = NULL;
    ebb_error_init(&b->err);
    b->work.data = b;
    uv_queue_work(&d->loop, &b->work, prefetch_work, prefetch_done);
  }
}

static int prefetch(job *j) {
  ebb_daemon *d = j->d;
  if (j->is_append || j->prefetched || !d->remote_store ||
      !ebb_runtime_wants_preload(d->rt, j->stream))
    return 0;
  j->prefetched = 1;
  ebb_event_list_clear(&j->pre); /* the list the runtime gave back, or an empty one */
  ebb_error_clear(&j->pre_err);
  j->pre_unknown_id = 0;
  j->pre_next = NULL;
  if (d->pre_tail) d->pre_tail->pre_next = j;
  else d->pre_head = j;
  d->pre_tail = j;
  prefetch_kick(d);
  return 1;
}

/* Hands what prefetch read to the runtime: 1 when the job ended (the read failed). */
static int preloaded(job *j) {
  if (j->pre_err.code) {
    ebb_error err;
    ebb_error_init(&err);
    ebb_error_move(&err, &j->pre_err);
    job_end(j, 0, NULL, 0, &err);
    return 1;
  }
  if (ebb_runtime_preload(j->d->rt, j->stream, &j->pre, j->pre_complete, j->pre_final,
                          j->pre_unknown_id ? j->cmd.command_id : NULL) != 0)
    ebb_event_list_clear(&j->pre); /* out of memory: deciding reads the stream itself */
  return 0;
}

/* Starts the job at the head of its queue: 1 when it ended right away. */
static int job_start(job *j) {
  ebb_daemon *d = j->d;
  ebb_error err;
  ebb_error_init(&err);
  if (d->stopped) {
    ebb_error_set(&err, EBB_EUNAVAIL, "ebb is shutting down");
    job_end(j, 0, NULL, 0, &err);
    return 1;
  }
  if (j->is_append) {
    ebb_error_init(&j->req.err);
    submit(d, j, &j->req);
    return 0;
  }
  if (prefetch(j)) return 0;
  if (j->pre_ready) {
    j->pre_ready = 0;
    if (preloaded(j)) return 1;
  }
  for (;;) {
    char *result = NULL;
    int rc = ebb_runtime_decide(d->rt, &j->cmd, &j->dc, &result, &err);
    if (rc == EBB_RETRY) { /* what prefetch read was behind: read again, once */
      j->prefetched = 0;
      j->pre_final = 1;
      if (prefetch(j)) return 0;
      continue;
    }
    if (rc != 0) {
      job_end(j, 0, NULL, 0, &err);
      return 1;
    }
    if (j->dc == NULL) { /* a command id handled before: its original answer */
      job_end(j, 200, result, strlen(result), NULL);
      return 1;
    }
    ebb_append *req = ebb_decided_append(j->dc);
    if (req) {
      submit(d, j, req);
      return 0;
    }
    if (job_finish(j)) return 1;
    if (prefetch(j)) return 0;
  }
}

/* Runs the queue's jobs until one is in flight or the queue is empty. */
static void run_queue(ebb_daemon *d, stream_queue *q, const char *stream) {
  while (q->head)
    if (!job_start(q->head)) return;
  ebb_strmap_del(d->queues, stream);
  free(q);
  check_drained(d);
}

static void on_written(void *ud, ebb_write *w) {
  job *j = w->ud;
  ebb_daemon *d = j->d;
  stream_queue *q = j->queue;
  char stream[EBB_MAX_NAME + 1];
  memcpy(stream, j->stream, sizeof stream);
  if (w->req->err.code == 0) {
    d->m.events_appended += w->req->n;
    if (w->req->result.position > d->head) d->head = w->req->result.position;
  }
  int ended;
  if (j->is_append) {
    if (j->req.err.code) {
      ebb_error err;
      ebb_error_init(&err);
      ebb_error_move(&err, &j->req.err);
      job_end(j, 0, NULL, 0, &err);
    } else if (j->req.result.idempotent) {
      /* Stored before: answer with what was stored then. */
      const ebb_append_result *r = &j->req.result;
      char *body = NULL;
      ebb_error err;
      ebb_error_init(&err);
      if (ebb_runtime_answer_stored(d->rt, j->stream, r->version, r->first_position, r->position,
                                    &body, &err) != 0)
        job_end(j, 0, NULL, 0, &err);
      else job_end(j, 200, body, strlen(body), NULL);
    } else {
      ebb_buf b = EBB_BUF_INIT;
      ebb_append_answer(&b, j->stream, &j->req.result, j->in, j->n_in);
      if (b.oom) {
        ebb_buf_free(&b);
        ebb_error err;
        ebb_error_init(&err);
        ebb_error_set(&err, EBB_ENOMEM, "out of memory (the events are stored)");
        job_end(j, 0, NULL, 0, &err);
      } else {
        size_t len;
        char *body = ebb_buf_take(&b, &len);
        job_end(j, 200, body, len, NULL);
      }
    }
    ended = 1;
  } else {
    ended = job_finish(j);
    if (!ended) ended = job_start(j);
  }
  if (ended) run_queue(d, q, stream);
}

/* Events appeared in the store up to `head`: the one path by which
 * subscribers and the projection thread learn of new events, whoever
 * committed them (this daemon's writer, or another process on a shared
 * store). They read from their own last position, so a head learned twice
 * or late costs nothing. */
static void head_advanced(ebb_daemon *d, int64_t head) {
  if (head > d->head) d->head = head;
  if (d->head <= d->notified_head) return;
  d->notified_head = d->head;
  schedule_pump(d);
  if (d->projections) ebb_projections_notify(d->projections, d->head);
  if (d->reactors) ebb_reactors_notify(d->reactors, d->head);
  if (d->publisher) ebb_publisher_notify(d->publisher, d->head);
}

/* Once per wake-up of the loop by the writer, however many appends it
 * reported: once per commit, not once per append (each notify is a futex
 * wake-up of the projection thread). */
static void on_reported(void *ud) {
  ebb_daemon *d = ud;
  head_advanced(d, d->head);
}

/* A commit of any process on a shared store (store_live.h). */
static void on_store_head(void *ud, int64_t head) {
  head_advanced(ud, head);
}

/* Singleton work runs on the holder of the store's leader lock only. A
 * reactor's state lives in the daemon's own data directory, so one that
 * takes over reads the history from its own checkpoint: the commands it
 * issues again carry the command ids the first leader's did, and the store
 * answers them without applying them twice. The NATS publisher resumes after
 * the stream's last Ebb-Position, whoever published it. */
static void on_leader(void *ud, int leader) {
  ebb_daemon *d = ud;
  if (d->reactors) ebb_reactors_set_active(d->reactors, leader);
  if (d->publisher) ebb_publisher_set_active(d->publisher, leader);
}

/* Puts the job in its stream's queue, and starts it if it is first. */
static void enqueue(ebb_daemon *d, job *j) {
  stream_queue *q = ebb_strmap_get(d->queues, j->stream);
  if (q == NULL) {
    q = calloc(1, sizeof *q);
    if (q == NULL || ebb_strmap_put(d->queues, j->stream, q) != 0) {
      free(q);
      ebb_error err;
      ebb_error_init(&err);
      ebb_error_set(&err, EBB_ENOMEM, "out of memory");
      if (j->done) j->done(j->done_ud, &err);
      answer_error(d, j->conn, &j->ri, &err);
      job_free(j);
      return;
    }
  }
  j->queue = q;
  d->jobs++;
  if (j->conn) ebb_http_conn_set_data(j->conn, j, on_conn_close);
  if (q->tail) q->tail->next = j;
  else q->head = j;
  q->tail = j;
  if (q->head == j) run_queue_of(j);
}

static job *job_new(ebb_daemon *d, ebb_http_conn *c, const reqinfo *ri) {
  job *j = d->spare_jobs;
  if (j) {
    d->spare_jobs = j->next;
    d->n_spare_jobs--;
    memset(j, 0, sizeof *j);
  } else if ((j = calloc(1, sizeof *j)) == NULL) {
    return NULL;
  }
  j->d = d;
  j->conn = c;
  j->ri = *ri;
  ebb_error_init(&j->req.err);
  return j;
}

/* ---------------------------------------------------------------- routes */

static int require_json(ebb_daemon *d, ebb_http_conn *c, const reqinfo *ri) {
  size_t len;
  const char *ct = ebb_http_header(c, "content-type", &len);
  if (ct && len >= 16 && strncasecmp(ct, "application/json", 16) == 0 &&
      (len == 16 || ct[16] == ';' || ct[16] == ' '))
    return 0;
  ebb_error err;
  ebb_error_init(&err);
  ebb_error_set(&err, EBB_EBADREQ, "the body must be JSON, sent with Content-Type: application/json");
  ebb_buf b = EBB_BUF_INIT;
  ebb__error_json(&err, &b);
  ebb_http_respond(c, 415, "application/json", NULL, b.data, b.len);
  log_request(d, ri, 415, err.message);
  ebb_buf_free(&b);
  return -1;
}

/* POST routes take everything in the body: a query string would be ignored,
 * and a client could believe it had, say, a version check it has not. */
static int no_query(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                    const reqinfo *ri) {
  ebb_params q;
  ebb_error err;
  ebb_error_init(&err);
  int rc = ebb__parse_query(req->query, "", &q, &err);
  ebb__params_free(&q);
  if (rc) answer_error(d, c, ri, &err);
  return rc;
}

static void route_command(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                          const reqinfo *ri) {
  if (no_query(d, c, req, ri) || require_json(d, c, ri)) return;
  job *j = job_new(d, c, ri);
  ebb_error err;
  ebb_error_init(&err);
  if (j == NULL) ebb_error_set(&err, EBB_ENOMEM, "out of memory");
  else if (parse_command_plain(j, req->body, req->body_len) ||
           parse_body(d, l_parse_command, req, j, &err) == 0)
    ebb_runtime_stream_of(d->rt, j->cmd.aggregate, j->cmd.id, j->stream, &err);
  if (err.code) {
    answer_error(d, c, ri, &err);
    job_free(j);
    return;
  }
  enqueue(d, j);
}

/* A command a reactor issues: the same pipeline as POST /commands (its
 * stream's queue, group commit), answered to the reactor. */
static void issue_command(void *ud, const ebb_command *cmd, ebb_reactor_issued done,
                          void *done_ud) {
  ebb_daemon *d = ud;
  ebb_error err;
  ebb_error_init(&err);
  reqinfo ri = {.route = ROUTE_COMMANDS, .t0 = ebb_clock_mono_ns(), .method = "POST"};
  snprintf(ri.path, sizeof ri.path, "(reactor) %s", cmd->command_id ? cmd->command_id : "");
  job *j = NULL;
  if (d->draining || d->stopped) {
    ebb_error_set(&err, EBB_EUNAVAIL, "ebb is shutting down");
  } else if ((j = job_new(d, NULL, &ri)) == NULL) {
    ebb_error_set(&err, EBB_ENOMEM, "out of memory");
  } else {
    j->cmd.aggregate = own(j, strdup(cmd->aggregate));
    j->cmd.id = own(j, strdup(cmd->id));
    j->cmd.type = own(j, strdup(cmd->type));
    j->cmd.data = own(j, strndup(cmd->data, cmd->data_len));
    j->cmd.data_len = cmd->data_len;
    j->cmd.metadata = own(j, strndup(cmd->metadata, cmd->metadata_len));
    j->cmd.metadata_len = cmd->metadata_len;
    j->cmd.command_id = cmd->command_id ? own(j, strdup(cmd->command_id)) : NULL;
    if (!j->cmd.aggregate || !j->cmd.id || !j->cmd.type || !j->cmd.data || !j->cmd.metadata ||
        (cmd->command_id && !j->cmd.command_id))
      ebb_error_set(&err, EBB_ENOMEM, "out of memory");
    else ebb_runtime_stream_of(d->rt, j->cmd.aggregate, j->cmd.id, j->stream, &err);
  }
  if (err.code) {
    job_free(j);
    done(done_ud, &err);
    ebb_error_clear(&err);
    return;
  }
  j->done = done;
  j->done_ud = done_ud;
  enqueue(d, j);
}

static void route_append(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                         const reqinfo *ri, const char *stream) {
  if (no_query(d, c, req, ri) || require_json(d, c, ri)) return;
  job *j = job_new(d, c, ri);
  ebb_error err;
  ebb_error_init(&err);
  if (j == NULL) ebb_error_set(&err, EBB_ENOMEM, "out of memory");
  else if (ebb_validate_name("stream name", stream, &err) == 0) {
    memcpy(j->stream, stream, strlen(stream) + 1); /* validated: at most EBB_MAX_NAME */
    j->is_append = 1;
    parse_body(d, l_parse_append, req, j, &err);
  }
  if (err.code) {
    answer_error(d, c, ri, &err);
    job_free(j);
    return;
  }
  enqueue(d, j);
}

/* ---------------------------------------------------------------- reads, off the loop */

/* A read route's work: parsed on the loop, run on libuv's thread pool with a
 * runtime of the reader pool (the disk, folding and upcasting never hold up
 * the loop), answered back on the loop. */
enum { READ_STREAM, READ_EVENTS, READ_AGGREGATE, READ_STREAMS, READ_LINKED };

typedef struct readjob {
  uv_work_t work;
  ebb_daemon *d;
  ebb_http_conn *conn;       /* NULL once the client is gone */
  reqinfo ri;
  int kind;
  char *a, *b, *at;          /* stream | category, type | aggregate type, id; at */
  int64_t from, limit, version;
  int backward;
  int link;                  /* READ_LINKED: EBB_LINK_* */
  int raw;                   /* READ_STREAM: events as stored, not upcast */
  int status;                /* out */
  ebb_buf body;              /* out */
  char error[sizeof ((ebb_error *)0)->message];
} readjob;

static void readjob_on_close(ebb_http_conn *c, void *data) {
  (void)c;
  ((readjob *)data)->conn = NULL;
}

/* Appends events as a JSON array, upcast to their current schemas (one that
 * cannot be is sent as stored, with its upcast_error); raw: all as stored. */
static int events_json(ebb_runtime *rt, ebb_event_list *l, ebb_buf *b, int raw, ebb_error *err) {
  if (!raw && ebb_runtime_upcast_each(rt, l, err) != 0) return err->code;
  ebb_buf_putc(b, '[');
  for (size_t i = 0; i < l->n; i++) {
    if (i) ebb_buf_putc(b, ',');
    ebb_event_to_json(&l->items[i], b);
  }
  ebb_buf_putc(b, ']');
  return 0;
}

/* A page of /events (by position, or by correlation/causation id):
 * {"events": [...], "next": the last position in it or `after`, "head"}. */
static int events_page(ebb_runtime *rt, ebb_event_list *l, int64_t after, int64_t head, ebb_buf *b,
                       ebb_error *err) {
  int64_t next = l->n ? l->items[l->n - 1].position : after;
  ebb_buf_puts(b, "{\"events\":");
  if (events_json(rt, l, b, 0, err)) return err->code;
  ebb_buf_printf(b, ",\"next\":%lld,\"head\":%lld}", (long long)next, (long long)head);
  return 0;
}

static int read_stream(ebb_runtime *rt, readjob *j, ebb_error *err) {
  ebb_store *s = ebb_runtime_store(rt);
  ebb_event_list l;
  ebb_event_list_init(&l);
  int64_t version = 0, from = j->from;
  int deleted = 0;
  ebb_buf *b = &j->body;
  if (ebb_store_stream_version(s, j->a, &version, &deleted, err)) goto done;
  if (version == 0) {
    ebb_error_set(err, EBB_ENOTFOUND, "stream %s does not exist", j->a);
    goto done;
  }
  if (!j->backward && from == 0) from = 1;
  if (ebb_store_read_stream(s, j->a, from, j->limit, j->backward, &l, err)) goto done;
  ebb_buf_puts(b, "{\"stream\":");
  ebb_buf_json_string(b, j->a, strlen(j->a));
  ebb_buf_printf(b, ",\"version\":%lld,\"deleted\":%s,\"events\":", (long long)version,
                 deleted ? "true" : "false");
  if (events_json(rt, &l, b, j->raw, err)) goto done;
  ebb_buf_putc(b, '}');
done:
  ebb_event_list_free(&l);
  return err->code;
}

static int read_events(ebb_runtime *rt, readjob *j, ebb_error *err) {
  ebb_store *s = ebb_runtime_store(rt);
  ebb_event_list l;
  ebb_event_list_init(&l);
  ebb_read_all ra = {.after = j->from, .limit = j->limit, .category = j->a, .type = j->b};
  int64_t head = 0;
  ebb_buf *b = &j->body;
  if (ebb_store_head(s, &head, err) || ebb_store_read_all(s, &ra, &l, err)) goto done;
  events_page(rt, &l, ra.after, head, b, err);
done:
  ebb_event_list_free(&l);
  return err->code;
}

/* GET /events?correlation_id= (or causation_id=): the same answer as a page
 * of /events, from the store's index. */
static int read_linked(ebb_runtime *rt, readjob *j, ebb_error *err) {
  ebb_store *s = ebb_runtime_store(rt);
  ebb_event_list l;
  ebb_event_list_init(&l);
  int64_t head = 0;
  ebb_buf *b = &j->body;
  if (ebb_store_head(s, &head, err) ||
      ebb_store_read_linked(s, j->link, j->a, j->from, j->limit, &l, err))
    goto done;
  events_page(rt, &l, j->from, head, b, err);
done:
  ebb_event_list_free(&l);
  return err->code;
}

static int read_streams(ebb_runtime *rt, readjob *j, ebb_error *err) {
  ebb_list_streams q = {.category = j->a, .prefix = j->b, .after = j->at, .limit = j->limit};
  return ebb__streams_json(ebb_runtime_store(rt), &q, &j->body, err);
}

static int read_aggregate(ebb_runtime *rt, readjob *j, ebb_error *err) {
  char *result = NULL;
  if (ebb_runtime_state_at(rt, j->a, j->b, j->version, j->at, &result, err) == 0)
    ebb_buf_puts(&j->body, result);
  free(result);
  return err->code;
}

static void read_work(uv_work_t *w) {
  readjob *j = w->data;
  ebb_error err;
  ebb_error_init(&err);
  ebb_runtime *rt = ebb_readers_take(j->d->readers, &err);
  if (rt) {
    if (j->kind == READ_STREAM) read_stream(rt, j, &err);
    else if (j->kind == READ_EVENTS) read_events(rt, j, &err);
    else if (j->kind == READ_LINKED) read_linked(rt, j, &err);
    else if (j->kind == READ_STREAMS) read_streams(rt, j, &err);
    else read_aggregate(rt, j, &err);
    ebb_readers_give(j->d->readers, rt);
  }
  if (err.code == 0 && j->body.oom) ebb_error_set(&err, EBB_ENOMEM, "out of memory");
  if (err.code) {
    j->status = ebb__status_of(err.code);
    ebb_buf_reset(&j->body);
    j->body.oom = 0;
    ebb__error_json(&err, &j->body);
    snprintf(j->error, sizeof j->error, "%s", err.message);
  } else {
    j->status = 200;
  }
  ebb_error_clear(&err);
}

static void readjob_free(readjob *j) {
  if (j == NULL) return;
  ebb_buf_free(&j->body);
  free(j->a);
  free(j->b);
  free(j->at);
  free(j);
}

static void read_done(uv_work_t *w, int status) {
  readjob *j = w->data;
  ebb_daemon *d = j->d;
  if (status == UV_ECANCELED) {
    j->status = 503;
    ebb_buf_reset(&j->body);
    ebb_buf_puts(&j->body, "{\"error\":{\"code\":\"unavailable\",\"message\":\"ebb is shutting down\"}}");
  }
  if (j->conn) {
    ebb_http_conn_set_data(j->conn, NULL, NULL);
    ebb_http_respond(j->conn, j->status, "application/json", NULL, j->body.data ? j->body.data : "",
                     j->body.len);
  }
  log_request(d, &j->ri, j->status, j->status == 200 ? NULL : j->error);
  d->reads--;
  readjob_free(j);
  check_drained(d);
}

static void submit_read(ebb_daemon *d, ebb_http_conn *c, const reqinfo *ri, readjob *j) {
  j->d = d;
  j->conn = c;
  j->ri = *ri;
  j->work.data = j;
  ebb_buf_init(&j->body);
  ebb_http_conn_set_data(c, j, readjob_on_close);
  d->reads++;
  uv_queue_work(&d->loop, &j->work, read_work, read_done);
}

static char *dup_or_null(const char *s, int *oom) {
  if (s == NULL) return NULL;
  char *c = strdup(s);
  if (c == NULL) *oom = 1;
  return c;
}

/* Hands the parsed job to the thread pool, or answers what went wrong. */
static void start_read(ebb_daemon *d, ebb_http_conn *c, const reqinfo *ri, readjob *j,
                       ebb_error *err, int oom) {
  if (!err->code && (oom || j == NULL)) ebb_error_set(err, EBB_ENOMEM, "out of memory");
  if (err->code) {
    answer_error(d, c, ri, err);
    readjob_free(j);
    return;
  }
  submit_read(d, c, ri, j);
}

static readjob *readjob_new(int kind, ebb_error *err) {
  readjob *j = calloc(1, sizeof *j);
  if (j == NULL) {
    ebb_error_set(err, EBB_ENOMEM, "out of memory");
    return NULL;
  }
  j->kind = kind;
  j->limit = DEFAULT_LIMIT;
  j->version = -1;
  return j;
}

static void route_stream(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                         const reqinfo *ri, const char *stream) {
  ebb_params q = {0};
  ebb_error err;
  ebb_error_init(&err);
  int oom = 0;
  readjob *j = readjob_new(READ_STREAM, &err);
  if (j && !ebb__parse_query(req->query, "from limit backward raw", &q, &err) &&
      !ebb__param_bool(&q, "raw", &j->raw, &err) &&
      !ebb__param_int(&q, "from", 0, INT64_MAX, &j->from, &err) &&
      !ebb__param_int(&q, "limit", 1, MAX_LIMIT, &j->limit, &err) &&
      !ebb__param_bool(&q, "backward", &j->backward, &err) &&
      !ebb_validate_name("stream name", stream, &err))
    j->a = dup_or_null(stream, &oom);
  start_read(d, c, ri, j, &err, oom);
  ebb__params_free(&q);
}

/* correlation_id= or causation_id= makes a /events request an index lookup:
 * one of them, and with no category or type to filter on. */
static int linked_query(ebb_params *q, readjob *j, ebb_error *err, int *oom) {
  const char *corr = ebb__param(q, "correlation_id"), *caus = ebb__param(q, "causation_id");
  if (!corr && !caus) return 0;
  if (corr && caus)
    return ebb_error_set(err, EBB_EBADREQ, "give correlation_id or causation_id, not both");
  if (ebb__param(q, "category") || ebb__param(q, "type"))
    return ebb_error_set(err, EBB_EBADREQ,
                         "%s does not combine with category or type",
                         corr ? "correlation_id" : "causation_id");
  if (ebb_validate_name(corr ? "correlation_id" : "causation_id", corr ? corr : caus, err))
    return err->code;
  j->kind = READ_LINKED;
  j->link = corr ? EBB_LINK_CORRELATION : EBB_LINK_CAUSATION;
  j->at = dup_or_null(corr ? corr : caus, oom); /* moved to a below, once the rest is parsed */
  return 0;
}

/* Nonzero (err set) when the query has `key` and it is not a valid name. */
static int bad_name_param(const ebb_params *q, const char *key, const char *what, ebb_error *err) {
  const char *v = ebb__param(q, key);
  return v != NULL && ebb_validate_name(what, v, err) != 0;
}

static void route_events(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                         const reqinfo *ri) {
  ebb_params q = {0};
  ebb_error err;
  ebb_error_init(&err);
  int oom = 0;
  readjob *j = readjob_new(READ_EVENTS, &err);
  if (j && !ebb__parse_query(req->query, "after limit category type correlation_id causation_id",
                             &q, &err) &&
      !linked_query(&q, j, &err, &oom) &&
      !ebb__param_int(&q, "after", 0, INT64_MAX, &j->from, &err) &&
      !ebb__param_int(&q, "limit", 1, MAX_LIMIT, &j->limit, &err) &&
      !bad_name_param(&q, "category", "category", &err) &&
      !bad_name_param(&q, "type", "event type", &err)) {
    if (j->kind == READ_LINKED) {
      j->a = j->at;
      j->at = NULL;
    } else {
      j->a = dup_or_null(ebb__param(&q, "category"), &oom);
      j->b = dup_or_null(ebb__param(&q, "type"), &oom);
    }
  }
  start_read(d, c, ri, j, &err, oom);
  ebb__params_free(&q);
}

static void route_streams(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                          const reqinfo *ri) {
  ebb_params q = {0};
  ebb_error err;
  ebb_error_init(&err);
  int oom = 0;
  readjob *j = readjob_new(READ_STREAMS, &err);
  if (j) j->limit = 100;
  if (j && !ebb__parse_query(req->query, "category prefix after limit", &q, &err) &&
      !ebb__param_int(&q, "limit", 1, MAX_LIMIT, &j->limit, &err) &&
      !bad_name_param(&q, "category", "category", &err) &&
      !bad_name_param(&q, "prefix", "prefix", &err) &&
      !bad_name_param(&q, "after", "after", &err)) {
    j->a = dup_or_null(ebb__param(&q, "category"), &oom);
    j->b = dup_or_null(ebb__param(&q, "prefix"), &oom);
    j->at = dup_or_null(ebb__param(&q, "after"), &oom);
  }
  start_read(d, c, ri, j, &err, oom);
  ebb__params_free(&q);
}

static void route_modules(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                          const reqinfo *ri) {
  if (no_query(d, c, req, ri)) return;
  ebb_buf b = EBB_BUF_INIT;
  ebb__modules_json(d, &b);
  if (b.oom) answer_fail(d, c, ri, EBB_ENOMEM, "%s", "out of memory");
  else answer(d, c, ri, 200, b.data, b.len);
  ebb_buf_free(&b);
}

static void route_aggregate(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                            const reqinfo *ri, const char *type, const char *id) {
  ebb_params q = {0};
  ebb_error err;
  ebb_error_init(&err);
  int oom = 0;
  readjob *j = readjob_new(READ_AGGREGATE, &err);
  if (j && !ebb__parse_query(req->query, "version at", &q, &err) &&
      !ebb__param_int(&q, "version", 0, INT64_MAX, &j->version, &err)) {
    j->a = dup_or_null(type, &oom);
    j->b = dup_or_null(id, &oom);
    j->at = dup_or_null(ebb__param(&q, "at"), &oom);
  }
  start_read(d, c, ri, j, &err, oom);
  ebb__params_free(&q);
}

static void route_subscribe(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                            const reqinfo *ri) {
  ebb_params q;
  ebb_error err;
  ebb_error_init(&err);
  int64_t after = 0;
  size_t len;
  const char *last = ebb_http_header(c, "last-event-id", &len);
  if (ebb__parse_query(req->query, "after category type", &q, &err) ||
      ebb__param_int(&q, "after", 0, INT64_MAX, &after, &err) ||
      (ebb__param(&q, "category") && ebb_validate_name("category", ebb__param(&q, "category"), &err)) ||
      (ebb__param(&q, "type") && ebb_validate_name("type", ebb__param(&q, "type"), &err)))
    goto fail;
  if (last && len) {
    /* The resume point wins over after=: it is where the client got to. */
    char buf[32];
    char *end;
    snprintf(buf, sizeof buf, "%.*s", (int)(len < 31 ? len : 31), last);
    errno = 0;
    long long v = strtoll(buf, &end, 10);
    if (errno || end == buf || *end || v < 0) {
      ebb_error_set(&err, EBB_EBADREQ, "Last-Event-ID must be a position (an integer), not \"%s\"",
                    buf);
      goto fail;
    }
    after = v;
  }
  log_request(d, ri, 200, NULL);
  if (strcmp(req->method, "HEAD") == 0) {
    /* The headers a subscription would get, and no stream. */
    ebb_http_respond(c, 200, "text/event-stream", "Cache-Control: no-cache\r\n", NULL, 0);
    ebb__params_free(&q);
    return;
  }
  ebb__sse_start(d, c, req->query, after, ebb__param(&q, "category"), ebb__param(&q, "type"));
  ebb__params_free(&q);
  return;
fail:
  answer_error(d, c, ri, &err);
  ebb__params_free(&q);
}

/* The store's part: "ok"; "failing" (the last commit failed, e.g. disk full:
 * still 200, writes are tried again); "failed" (an fsync failed: 503, no
 * write is taken until a restart). See writer.c. */
static void route_health(ebb_daemon *d, ebb_http_conn *c, const reqinfo *ri) {
  ebb_buf b = EBB_BUF_INIT;
  char reason[1536] = "";
  int store = d->writer ? ebb_writer_health(d->writer, reason, sizeof reason) : EBB_WRITER_OK;
  const char *status = d->draining ? "draining"
                       : store == EBB_WRITER_STOPPED ? "failed"
                       : store == EBB_WRITER_FAILING ? "degraded"
                                                     : "ok";
  ebb_buf_printf(&b,
                 "{\"status\":\"%s\",\"store\":\"%s\",\"position\":%lld,\"uptime_ms\":%lld,"
                 "\"pid\":%ld,\"subscribers\":%zu,\"in_flight\":%zu,\"token_required\":%s,"
                 "\"version\":\"" EBB_VERSION "\",\"commit\":\"" EBB_COMMIT "\"",
                 status,
                 store == EBB_WRITER_STOPPED   ? "failed"
                 : store == EBB_WRITER_FAILING ? "failing"
                                               : "ok",
                 (long long)d->head, (long long)(ebb_clock_now_ms() - d->started_ms),
                 (long)getpid(), d->n_subscribers, d->jobs,
                 /* the console asks for a token before its first data call, never after a 401 */
                 d->cfg->token[0] ? "true" : "false");
  if (store != EBB_WRITER_OK) {
    ebb_buf_puts(&b, ",\"reason\":");
    ebb_buf_json_string(&b, reason, strlen(reason));
  }
  ebb_live_status ls;
  ebb_live_status_get(d->live, &ls);
  ebb_buf_printf(&b, ",\"leader\":%s", ls.leader ? "true" : "false");
  if (d->live) {
    ebb_buf_printf(&b, ",\"connection\":\"%s\"", ls.connected ? "connected" : "reconnecting");
    if (ls.error[0]) {
      ebb_buf_puts(&b, ",\"connection_error\":");
      ebb_buf_json_string(&b, ls.error, strlen(ls.error));
    }
  }
  if (d->publisher) {
    ebb_buf_puts(&b, ",\"nats\":");
    ebb_publisher_status(d->publisher, &b);
  }
  ebb_buf_puts(&b, "}");
  answer(d, c, ri, d->draining || store == EBB_WRITER_STOPPED ? 503 : 200, b.data, b.len);
  ebb_buf_free(&b);
}

static void route_metrics(ebb_daemon *d, ebb_http_conn *c, const reqinfo *ri) {
  ebb_buf b = EBB_BUF_INIT;
  ebb__metrics_render(d, &b);
  ebb_http_respond(c, 200, "text/plain; version=0.0.4", NULL, b.data, b.len);
  log_request(d, ri, 200, NULL);
  ebb_buf_free(&b);
}

/* ---------------------------------------------------------------- projections */

/* A query or control on its way to the projection host and back. */
typedef struct pquery {
  ebb_daemon *d;
  ebb_http_conn *conn;          /* NULL once the client is gone */
  reqinfo ri;
  char *name, *query, *args;
  int64_t after;
  uv_timer_t timer;             /* the after= deadline */
  int timer_open;
  struct pquery *next;          /* parked */
} pquery;

static void pquery_on_close(ebb_http_conn *c, void *data) {
  (void)c;
  ((pquery *)data)->conn = NULL;
}

static void pquery_timer_closed(uv_handle_t *h) {
  pquery *q = h->data;
  free(q->name);
  free(q->query);
  free(q->args);
  free(q);
}

static void pquery_free(pquery *q) {
  if (q->timer_open) {
    uv_close((uv_handle_t *)&q->timer, pquery_timer_closed);
    return;
  }
  q->timer.data = q;
  pquery_timer_closed((uv_handle_t *)&q->timer);
}

static void pquery_answer(void *ud, int status, char *body) {
  pquery *q = ud;
  if (q->conn) {
    ebb_http_conn_set_data(q->conn, NULL, NULL);
    ebb_http_respond(q->conn, status, "application/json", NULL, body ? body : "null",
                     body ? strlen(body) : 4);
  }
  log_request(q->d, &q->ri, status, status >= 400 ? body : NULL);
  free(body);
  pquery_free(q);
}

static void unpark(ebb_daemon *d, pquery *q) {
  for (pquery **pp = &d->parked; *pp; pp = &(*pp)->next)
    if (*pp == q) {
      *pp = q->next;
      break;
    }
  q->next = NULL;
  if (q->timer_open) uv_timer_stop(&q->timer);
}

static void on_query_deadline(uv_timer_t *t) {
  pquery *q = t->data;
  ebb_daemon *d = q->d;
  unpark(d, q);
  int64_t pos = d->projections ? ebb_projections_position(d->projections, q->name) : -1;
  ebb_buf b = EBB_BUF_INIT;
  ebb_buf_printf(&b,
                 "{\"error\":{\"code\":\"timeout\",\"message\":\"projection %s did not reach "
                 "position %lld within %lld ms\",\"after\":%lld,\"position\":%lld}}",
                 q->name, (long long)q->after, (long long)d->cfg->query_timeout_ms,
                 (long long)q->after, (long long)pos);
  pquery_answer(q, 504, ebb_buf_take(&b, NULL));
}

/* Sends parked queries whose projection has reached their position. */
static void on_projections_progress(void *ud) {
  ebb_daemon *d = ud;
  for (pquery *q = d->parked, *next; q; q = next) {
    next = q->next;
    if (ebb_projections_position(d->projections, q->name) >= q->after) {
      unpark(d, q);
      ebb_projections_query(d->projections, q->name, q->query, q->args, pquery_answer, q);
    }
  }
}

static void route_projections(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                              const reqinfo *ri, const char *name) {
  ebb_params q;
  ebb_error err;
  ebb_error_init(&err);
  if (ebb__parse_query(req->query, "", &q, &err)) {
    answer_error(d, c, ri, &err);
    ebb__params_free(&q);
    return;
  }
  ebb__params_free(&q);
  ebb_buf b = EBB_BUF_INIT;
  if (d->projections == NULL) ebb_buf_puts(&b, name ? "" : "[]");
  else if (!ebb_projections_status(d->projections, name, &b)) ebb_buf_reset(&b);
  if (name && b.len == 0) answer_fail(d, c, ri, EBB_ENOTFOUND, "no projection %s", name);
  else answer(d, c, ri, 200, b.data, b.len);
  ebb_buf_free(&b);
}

/* GET /reactors, /reactors/{name}, /reactors/{name}/schedules; POST
 * /reactors/{name}/retry|skip. */
static void route_reactors(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                           const reqinfo *ri, const ebb_path_parts *pp) {
  int post = strcmp(req->method, "POST") == 0;
  if (post ? no_query(d, c, req, ri) : 0) return;
  if (!post) {
    ebb_params q;
    ebb_error err;
    ebb_error_init(&err);
    int rc = ebb__parse_query(req->query, "", &q, &err);
    ebb__params_free(&q);
    if (rc) {
      answer_error(d, c, ri, &err);
      return;
    }
  }
  const char *name = pp->n >= 2 ? pp->seg[1] : NULL;
  ebb_buf b = EBB_BUF_INIT;
  int status = 200;
  if (d->reactors == NULL) {
    if (name) status = 0;
    else ebb_buf_puts(&b, "[]");
  } else if (pp->n == 3 && !post) {
    if (!ebb_reactors_schedules(d->reactors, name, &b)) status = 0;
  } else if (pp->n == 3) {
    status = ebb_reactors_control(d->reactors, name, pp->seg[2], &b);
  } else if (!ebb_reactors_status(d->reactors, name, &b)) {
    status = 0;
  }
  if (status == 0) answer_fail(d, c, ri, EBB_ENOTFOUND, "no reactor %s", name);
  else answer(d, c, ri, status, b.data, b.len);
  ebb_buf_free(&b);
}

static void route_query(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                        const reqinfo *ri, const char *name, const char *query) {
  ebb_params q = {0};
  ebb_error err;
  ebb_error_init(&err);
  ebb_buf args = EBB_BUF_INIT;
  int64_t after = -1;
  /* Any parameter is an argument of the query; the query decides what it takes. */
  if (ebb__parse_query(req->query, NULL, &q, &err)) goto fail;
  if (ebb__query_args(&q, &args, &after, &err)) goto fail;
  if (d->projections == NULL) {
    ebb_error_set(&err, EBB_ENOTFOUND, "no projection %s", name);
    goto fail;
  }
  pquery *pq = calloc(1, sizeof *pq);
  if (pq == NULL || !(pq->name = strdup(name)) || !(pq->query = strdup(query)) ||
      !(pq->args = ebb_buf_take(&args, NULL))) {
    if (pq) {
      free(pq->name);
      free(pq->query);
      free(pq);
    }
    ebb_error_set(&err, EBB_ENOMEM, "out of memory");
    goto fail;
  }
  pq->d = d;
  pq->conn = c;
  pq->ri = *ri;
  pq->after = after;
  ebb_http_conn_set_data(c, pq, pquery_on_close);
  if (after >= 0 && ebb_projections_position(d->projections, name) < after) {
    /* Read-your-writes: wait, bounded, until the projection has reached it. */
    uv_timer_init(&d->loop, &pq->timer);
    pq->timer.data = pq;
    pq->timer_open = 1;
    uv_timer_start(&pq->timer, on_query_deadline, (uint64_t)d->cfg->query_timeout_ms, 0);
    pq->next = d->parked;
    d->parked = pq;
  } else {
    ebb_projections_query(d->projections, name, query, pq->args, pquery_answer, pq);
  }
  ebb__params_free(&q);
  ebb_buf_free(&args);
  return;
fail:
  answer_error(d, c, ri, &err);
  ebb__params_free(&q);
  ebb_buf_free(&args);
}

static void route_control(ebb_daemon *d, ebb_http_conn *c, const ebb_http_request *req,
                          const reqinfo *ri, const char *name, const char *action) {
  if (no_query(d, c, req, ri)) return;
  if (strcmp(action, "rebuild") && strcmp(action, "retry") && strcmp(action, "skip")) {
    answer_fail(d, c, ri, EBB_ENOTFOUND,
                "no projection action %s (rebuild, retry and skip are)", action);
    return;
  }
  if (d->projections == NULL) {
    answer_fail(d, c, ri, EBB_ENOTFOUND, "no projection %s", name);
    return;
  }
  pquery *pq = calloc(1, sizeof *pq);
  if (pq == NULL) {
    answer_fail(d, c, ri, EBB_ENOMEM, "%s", "out of memory");
    return;
  }
  pq->d = d;
  pq->conn = c;
  pq->ri = *ri;
  ebb_http_conn_set_data(c, pq, pquery_on_close);
  ebb_projections_control(d->projections, name, action, pquery_answer, pq);
}

/* Descriptors the daemon keeps for itself beyond those open at start: the
 * projections' databases, the readers' connections, log files. */
#define FD_RESERVE 64

/* max_connections, lowered if need be so that the server runs out of
 * connections (and answers 503) before the process runs out of descriptors:
 * up to twice the limit may be open at once, the refused ones included. The
 * soft descriptor limit is raised to the hard one first. */
static unsigned connections_within_fd_limit(int64_t wanted) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return (unsigned)wanted;
  if (rl.rlim_cur < rl.rlim_max) {
    struct rlimit raised = {rl.rlim_max, rl.rlim_max};
    if (setrlimit(RLIMIT_NOFILE, &raised) == 0) rl = raised;
  }
  if (rl.rlim_cur == RLIM_INFINITY) return (unsigned)wanted;
  int64_t open_now = 0;
  DIR *fds = opendir("/proc/self/fd");
  if (fds) {
    while (readdir(fds)) open_now++;
    closedir(fds);
  } else {
    open_now = 32;
  }
  int64_t room = ((int64_t)rl.rlim_cur - open_now - FD_RESERVE) / 2;
  if (room < 1) room = 1;
  if (room >= wanted) return (unsigned)wanted;
  char lim[32], n[32];
  snprintf(lim, sizeof lim, "%lld", (long long)rl.rlim_cur);
  snprintf(n, sizeof n, "%lld", (long long)room);
  ebb_log(EBB_LOG_WARN, "max_connections lowered to fit the file descriptor limit", "#max_connections",
          n, "#fd_limit", lim, NULL);
  return (unsigned)room;
}

static void on_rescan_timer(uv_timer_t *t) {
  ebb_daemon *d = t->data;
  if (d->projections) ebb_projections_rescan(d->projections);
}

static void on_projections_changed(uv_fs_event_t *h, const char *file, int events, int status) {
  (void)file;
  (void)events;
  (void)status;
  ebb_daemon *d = h->data;
  /* Editors write in several steps: one rescan once the burst is over. */
  uv_timer_start(&d->rescan_timer, on_rescan_timer, 100, 0);
}

/* Compares in time independent of where the first difference is. */
static int same_secret(const char *a, size_t alen, const char *b) {
  size_t blen = strlen(b);
  unsigned diff = (unsigned)(alen ^ blen);
  for (size_t i = 0; i < alen; i++) diff |= (unsigned char)a[i] ^ (unsigned char)b[i % (blen ? blen : 1)];
  return diff == 0;
}

static int authorized(ebb_daemon *d, ebb_http_conn *c) {
  const char *token = d->cfg->token;
  if (token[0] == '\0') return 1;
  size_t len;
  const char *h = ebb_http_header(c, "authorization", &len);
  if (h == NULL || len < 7 || strncasecmp(h, "Bearer ", 7) != 0) return 0;
  return same_secret(h + 7, len - 7, token);
}

static void on_request(void *ud, ebb_http_conn *c, const ebb_http_request *req) {
  ebb_daemon *d = ud;
  reqinfo ri;
  reqinfo_init(&ri, req);
  ebb_error err;
  ebb_error_init(&err);
  ebb_path_parts parts, *pp = &parts; /* on the stack: a malloc this size costs more than the request */
  int get = strcmp(req->method, "GET") == 0 || strcmp(req->method, "HEAD") == 0;
  int post = strcmp(req->method, "POST") == 0;
  const char *allow = NULL; /* the methods of a path that exists, for a 405 */
  if (ebb__split_path(req->path, pp, &err) != 0) {
    answer_error(d, c, &ri, &err);
    goto done;
  }
  int n = pp->n;
  ri.route = ebb__route_of(pp, post, &allow);
  if (allow == NULL) {
    answer_fail(d, c, &ri, EBB_ENOTFOUND, "no route %s; see README.md for the API", req->path);
    goto done;
  }
  if ((strstr(allow, "GET") && get) || (strstr(allow, "POST") && post)) {
  } else {
    char hdr[128];
    snprintf(hdr, sizeof hdr, "Allow: %s\r\n", allow);
    ebb_error_set(&err, EBB_EBADREQ, "%s is not allowed on this route (allowed: %s)", req->method,
                  allow);
    ebb_buf b = EBB_BUF_INIT;
    ebb__error_json(&err, &b);
    ebb_http_respond(c, 405, "application/json", hdr, b.data, b.len);
    log_request(d, &ri, 405, err.message);
    ebb_buf_free(&b);
    goto done;
  }
  if (ri.route == ROUTE_HEALTH) {
    route_health(d, c, &ri);
    goto done;
  }
  if (ri.route == ROUTE_CONSOLE) { /* the page's files: public, the data it reads is not */
    log_request(d, &ri, ebb__console_serve(c, req), NULL);
    goto done;
  }
  if (!authorized(d, c)) {
    ebb_http_respond(c, 401, "application/json", "WWW-Authenticate: Bearer\r\n",
                     "{\"error\":{\"code\":\"unauthorized\",\"message\":\"this daemon needs "
                     "Authorization: Bearer <token>\"}}",
                     strlen("{\"error\":{\"code\":\"unauthorized\",\"message\":\"this daemon needs "
                            "Authorization: Bearer <token>\"}}"));
    log_request(d, &ri, 401, "unauthorized");
    goto done;
  }
  if (d->draining && ri.route != ROUTE_METRICS) {
    answer_fail(d, c, &ri, EBB_EUNAVAIL, "%s", "ebb is shutting down");
    goto done;
  }
  switch (ri.route) {
    case ROUTE_COMMANDS: route_command(d, c, req, &ri); break;
    case ROUTE_APPEND: route_append(d, c, req, &ri, pp->seg[1]); break;
    case ROUTE_STREAM: route_stream(d, c, req, &ri, pp->seg[1]); break;
    case ROUTE_EVENTS: route_events(d, c, req, &ri); break;
    case ROUTE_SUBSCRIBE: route_subscribe(d, c, req, &ri); break;
    case ROUTE_AGGREGATE: route_aggregate(d, c, req, &ri, pp->seg[1], pp->seg[2]); break;
    case ROUTE_METRICS: route_metrics(d, c, &ri); break;
    case ROUTE_STREAMS: route_streams(d, c, req, &ri); break;
    case ROUTE_MODULES: route_modules(d, c, req, &ri); break;
    case ROUTE_PROJECTIONS: route_projections(d, c, req, &ri, n == 2 ? pp->seg[1] : NULL); break;
    case ROUTE_QUERY: route_query(d, c, req, &ri, pp->seg[1], pp->seg[2]); break;
    case ROUTE_REACTORS: route_reactors(d, c, req, &ri, pp); break;
    case ROUTE_PROJECTION_CONTROL:
      route_control(d, c, req, &ri, pp->seg[1], pp->seg[2]);
      break;
    default: break;
  }
done:
  return;
}

/* ---------------------------------------------------------------- pumping subscribers */

static void on_pump_idle(uv_idle_t *h) {
  ebb_daemon *d = h->data;
  uv_idle_stop(h);
  d->pump_scheduled = 0;
  ebb__sse_pump(d);
}

/* Delivers new events to subscribers once the current loop turn is done, so
 * a batch of commits costs one read per subscriber, not one per commit. */
static void schedule_pump(ebb_daemon *d) {
  if (d->pump_scheduled || d->n_subscribers == 0 || d->stopped) return;
  d->pump_scheduled = 1;
  uv_idle_start(&d->pump_idle, on_pump_idle);
}

static void on_heartbeat(uv_timer_t *t) {
  ebb__sse_heartbeat(t->data);
}

/* ---------------------------------------------------------------- life cycle */

static void close_handle(uv_handle_t *h) {
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

static void close_rest(ebb_daemon *d) {
  ebb_http_server_close(d->http);
  d->http = NULL;
  ebb_live_stop(d->live); /* its handles would keep the loop running */
  d->live = NULL;
  if (d->watching) close_handle((uv_handle_t *)&d->watch);
  close_handle((uv_handle_t *)&d->rescan_timer);
  close_handle((uv_handle_t *)&d->sigterm);
  close_handle((uv_handle_t *)&d->sigint);
  close_handle((uv_handle_t *)&d->sighup);
  close_handle((uv_handle_t *)&d->heartbeat);
  close_handle((uv_handle_t *)&d->pump_timer);
  close_handle((uv_handle_t *)&d->pump_idle);
  close_handle((uv_handle_t *)&d->shutdown_timer);
  ebb_notifier_close(&d->notifier);
}

/* After the last answers are written (the draining server closes each
 * connection once its answer is out), or at the deadline, closes the rest. */
static void on_final_check(uv_timer_t *t) {
  ebb_daemon *d = t->data;
  if (ebb_http_server_connections(d->http) > 0 && ebb_clock_now_ms() < d->final_deadline_ms) return;
  close_rest(d);
}

/* Stops the work: uv_run returns once every handle is closed. */
static void stop(ebb_daemon *d) {
  if (d->stopped) return;
  d->stopped = 1;
  ebb__sse_close_all(d, "ebb is shutting down");
  ebb_http_server_drain(d->http);
  /* Reports everything submitted; jobs queued behind them end with 503. */
  ebb_writer_stop(d->writer);
  d->writer = NULL;
  /* Parked queries are answered now; the host answers the queued ones. */
  while (d->parked) {
    pquery *q = d->parked;
    unpark(d, q);
    ebb_error err;
    ebb_error_init(&err);
    ebb_error_set(&err, EBB_EUNAVAIL, "ebb is shutting down");
    ebb_buf b = EBB_BUF_INIT;
    ebb__error_json(&err, &b);
    pquery_answer(q, 503, ebb_buf_take(&b, NULL));
  }
  ebb_projections_stop(d->projections);
  d->projections = NULL;
  /* The writer reported every command, reactors' included: none is in flight. */
  ebb_reactors_stop(d->reactors);
  d->reactors = NULL;
  /* Every commit is reported: wait (bounded) for the acks of what is in flight. */
  ebb_publisher_stop(d->publisher, d->cfg->shutdown_timeout_ms < 5000 ? d->cfg->shutdown_timeout_ms : 5000);
  d->publisher = NULL;
  d->final_deadline_ms = ebb_clock_now_ms() + 2000;
  uv_timer_stop(&d->shutdown_timer);
  uv_timer_start(&d->shutdown_timer, on_final_check, 0, 10);
}

static void check_drained(ebb_daemon *d) {
  if (d->draining && !d->stopped && d->jobs == 0 && d->reads == 0) {
    ebb_log(EBB_LOG_INFO, "drained: every accepted command is answered", NULL);
    stop(d);
  }
}

static void on_shutdown_timeout(uv_timer_t *t) {
  if (((ebb_daemon *)t->data)->stopped) return;
  ebb_daemon *d = t->data;
  char n[32];
  snprintf(n, sizeof n, "%zu", d->jobs);
  ebb_log(EBB_LOG_WARN, "shutdown timeout: stopping with commands still queued", "#queued", n,
          NULL);
  stop(d);
}

static void begin_drain(ebb_daemon *d, const char *why) {
  if (d->draining) {
    ebb_log(EBB_LOG_WARN, "second signal: stopping now", NULL);
    stop(d);
    return;
  }
  d->draining = 1;
  ebb_log(EBB_LOG_INFO, "draining: no new connections; finishing in-flight commands", "signal",
          why, NULL);
  ebb_notifier_stopping(&d->notifier);
  ebb_http_server_drain(d->http);
  ebb__sse_close_all(d, "ebb is shutting down");
  uv_timer_start(&d->shutdown_timer, on_shutdown_timeout, (uint64_t)d->cfg->shutdown_timeout_ms, 0);
  check_drained(d);
}

static void reload(ebb_daemon *d) {
  ebb_buf report = EBB_BUF_INIT;
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_runtime_reload(d->rt, &report, &err) == 0) {
    d->m.reloads++;
    ebb_log(EBB_LOG_INFO, "reloaded the aggregate modules", "dir", d->cfg->aggregates, NULL);
  } else {
    d->m.reload_failures++;
    ebb_log(EBB_LOG_ERROR, "reload failed; the running modules stay", "error", err.message,
            "problems", ebb_buf_cstr(&report), NULL);
  }
  ebb_error_clear(&err);
  ebb_buf_free(&report);
}

static void on_signal(uv_signal_t *s, int signum) {
  ebb_daemon *d = s->data;
  if (signum == SIGHUP) {
    reload(d);
    ebb_readers_reload(d->readers);
    if (d->projections) ebb_projections_rescan(d->projections);
    if (d->reactors) ebb_reactors_rescan(d->reactors);
  }
  else begin_drain(d, signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

static int make_dir(const char *dir, ebb_error *err) {
  if (mkdir(dir, 0755) == 0 || errno == EEXIST) return 0;
  return ebb_error_set(err, EBB_ESTORE, "cannot create the data directory %s: %s", dir,
                       strerror(errno));
}

static void holder_json(ebb_daemon *d, char *buf, size_t len) {
  char now[EBB_TIME_LEN + 1];
  ebb_clock_format(d->started_ms, now);
  ebb_buf b = EBB_BUF_INIT;
  ebb_buf_printf(&b, "{\"pid\":%ld,\"url\":", (long)getpid());
  ebb_buf_json_string(&b, d->url, strlen(d->url));
  ebb_buf_printf(&b, ",\"started_at\":\"%s\"}", now);
  snprintf(buf, len, "%s", b.oom ? "{}" : ebb_buf_cstr(&b));
  ebb_buf_free(&b);
}

int ebb_daemon_run(const ebb_config *cfg, ebb_error *err) {
  ebb_daemon *d = calloc(1, sizeof *d);
  if (d == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  d->cfg = cfg;
  d->started_ms = ebb_clock_now_ms();
  int rc = 0, loop_open = 0;
  char host[256], buf[512];
  int port;
  if (ebb_config_validate(cfg, err) || ebb_config_listen(cfg, host, sizeof host, &port, err) ||
      make_dir(cfg->data, err))
    goto out;
  snprintf(d->url, sizeof d->url, strchr(host, ':') ? "http://[%s]:%d" : "http://%s:%d", host, port);
  holder_json(d, buf, sizeof buf);
  if (ebb_lock_acquire(&d->lock, cfg->data, buf, err)) goto out;
  int durability = strcmp(cfg->durability, "normal") == 0 ? EBB_DURABILITY_NORMAL
                                                          : EBB_DURABILITY_FULL;
  ebb_runtime_options ro = {.data_dir = cfg->data,
                            .store = cfg->store,
                            .aggregates_dir = cfg->aggregates,
                            .durability = durability,
                            .memory_limit = (size_t)cfg->memory_limit,
                            .instruction_budget = cfg->instruction_budget,
                            .cache_size = cfg->cache_size == 0 ? -1 : cfg->cache_size};
  if (ebb_runtime_open(&d->rt, &ro, err)) goto out;
  ebb_buf problems = EBB_BUF_INIT;
  int np = ebb_runtime_check(d->rt, &problems);
  if (np) {
    ebb_error_set(err, EBB_ESCRIPT, "%d problem%s in the modules of %s (run 'ebb check'):\n%s", np,
                  np == 1 ? "" : "s", cfg->aggregates, ebb_buf_cstr(&problems));
    ebb_buf_free(&problems);
    goto out;
  }
  ebb_buf_free(&problems);
  if (ebb_readers_new(&d->readers, &ro, err)) goto out;
  d->remote_store = strcmp(ebb_store_kind(ebb_runtime_store(d->rt)), "sqlite") != 0;
  if (d->remote_store &&
      (d->pre_batches = calloc(EBB_PREFETCH_BATCHES, sizeof *d->pre_batches)) == NULL) {
    ebb_error_set(err, EBB_ENOMEM, "out of memory");
    goto out;
  }
  if ((d->queues = ebb_strmap_new()) == NULL || (d->parser = luaL_newstate()) == NULL) {
    ebb_error_set(err, EBB_ENOMEM, "out of memory");
    goto out;
  }
  if (ebb_store_head(ebb_runtime_store(d->rt), &d->head, err)) goto out;
  uv_loop_init(&d->loop);
  loop_open = 1;
  ebb_store_options so = {.uri = cfg->store, .dir = cfg->data, .durability = durability};
  if (ebb_writer_start(&d->writer, &d->loop, &so, on_written, on_reported, d, err)) goto out;
  ebb_http_limits lim = {.max_header_bytes = 16 * 1024,
                         .max_body_bytes = (size_t)cfg->max_body,
                         .max_connections = connections_within_fd_limit(cfg->max_connections),
                         .idle_timeout_ms = (unsigned)cfg->idle_timeout_ms,
                         .request_timeout_ms = (unsigned)cfg->request_timeout_ms};
  if (ebb_http_server_new(&d->http, &d->loop, &lim, on_request, d, err) ||
      ebb_http_server_listen(d->http, host, port, err))
    goto out;
  port = ebb_http_server_port(d->http);
  snprintf(d->url, sizeof d->url, strchr(host, ':') ? "http://[%s]:%d" : "http://%s:%d", host, port);
  /* Before the handles the failure path below does not close. */
  if (cfg->nats[0]) {
    ebb_publisher_options pbo = {.loop = &d->loop,
                                 .rt = d->rt,
                                 .data_dir = cfg->data,
                                 .urls = cfg->nats,
                                 .stream = cfg->nats_stream,
                                 .prefix = cfg->nats_subject_prefix,
                                 .from = cfg->nats_from,
                                 .creds = cfg->nats_creds,
                                 .token = cfg->nats_token,
                                 .user = cfg->nats_user,
                                 .password = cfg->nats_password,
                                 .tls_ca = cfg->nats_tls_ca,
                                 .tls_cert = cfg->nats_tls_cert,
                                 .tls_key = cfg->nats_tls_key};
    if (ebb_publisher_start(&d->publisher, &pbo, err)) goto out;
  }
  uv_timer_init(&d->loop, &d->rescan_timer);
  d->rescan_timer.data = d;
  ebb_projections_options po = {.loop = &d->loop,
                                .data_dir = cfg->data,
                                .store = cfg->store,
                                .projections_dir = cfg->projections,
                                .aggregates_dir = cfg->aggregates,
                                .memory_limit = (size_t)cfg->memory_limit,
                                .instruction_budget = cfg->instruction_budget,
                                .on_progress = on_projections_progress,
                                .ud = d};
  if (ebb_projections_start(&d->projections, &po, err)) goto out;
  ebb_live_options lo = {.loop = &d->loop,
                         .store = cfg->store,
                         .on_head = on_store_head,
                         .on_leader = on_leader,
                         .ud = d};
  if (ebb_live_start(&d->live, &lo, err)) goto out;
  if (uv_fs_event_init(&d->loop, &d->watch) == 0) {
    d->watch.data = d;
    d->watching = 1;
    if (uv_fs_event_start(&d->watch, on_projections_changed, cfg->projections, 0) != 0) {
      ebb_log(EBB_LOG_WARN, "cannot watch the projections directory: edits need SIGHUP", "dir",
              cfg->projections, NULL);
    }
  }
  ebb_reactors_options rdo = {.loop = &d->loop,
                              .rt = d->rt,
                              .data_dir = cfg->data,
                              .reactors_dir = cfg->reactors,
                              .durability = durability,
                              .memory_limit = (size_t)cfg->memory_limit,
                              .instruction_budget = cfg->instruction_budget,
                              .issue = issue_command,
                              .issue_ud = d};
  if (ebb_reactors_start(&d->reactors, &rdo, err)) goto out;
  /* One daemon on a store (SQLite) always leads; on a shared store the
   * leader lock may have been granted before the reactors existed. */
  ebb_reactors_set_active(d->reactors, ebb_live_leader(d->live));
  if (d->publisher) ebb_publisher_set_active(d->publisher, ebb_live_leader(d->live));
  uv_signal_init(&d->loop, &d->sigterm);
  uv_signal_init(&d->loop, &d->sigint);
  uv_signal_init(&d->loop, &d->sighup);
  d->sigterm.data = d->sigint.data = d->sighup.data = d;
  uv_signal_start(&d->sigterm, on_signal, SIGTERM);
  uv_signal_start(&d->sigint, on_signal, SIGINT);
  uv_signal_start(&d->sighup, on_signal, SIGHUP);
  /* The lock shows where to connect only now: whoever reads it may signal
   * the daemon, and a SIGTERM before the handlers were installed killed it. */
  holder_json(d, buf, sizeof buf);
  ebb_lock_update(d->lock, buf, NULL);
  uv_timer_init(&d->loop, &d->heartbeat);
  uv_timer_init(&d->loop, &d->pump_timer);
  uv_timer_init(&d->loop, &d->shutdown_timer);
  uv_idle_init(&d->loop, &d->pump_idle);
  d->heartbeat.data = d->pump_timer.data = d->shutdown_timer.data = d->pump_idle.data = d;
  uv_timer_start(&d->heartbeat, on_heartbeat, (uint64_t)cfg->heartbeat_ms,
                 (uint64_t)cfg->heartbeat_ms);
  signal(SIGPIPE, SIG_IGN);
  char pos[32];
  snprintf(pos, sizeof pos, "%lld", (long long)d->head);
  ebb_log(EBB_LOG_INFO, "listening", "url", d->url, "data", cfg->data, "aggregates",
          cfg->aggregates, "durability", cfg->durability, "#position", pos, NULL);
  /* The one line scripts wait for, on stdout: where to connect. */
  printf("ebb listening on %s\nthe console: %s/console/\n", d->url, d->url);
  fflush(stdout);
  ebb_notifier_ready(&d->notifier, &d->loop, &d->head);
  uv_run(&d->loop, UV_RUN_DEFAULT);
  ebb_log(EBB_LOG_INFO, "stopped", NULL);
out:
  rc = err->code;
  ebb_live_stop(d->live);
  d->live = NULL;
  if (d->projections) ebb_projections_stop(d->projections);
  if (d->writer) ebb_writer_stop(d->writer);
  ebb_reactors_stop(d->reactors); /* after the writer: it answers their commands */
  ebb_publisher_stop(d->publisher, 0);
  if (d->http) ebb_http_server_close(d->http);
  if (loop_open) {
    uv_run(&d->loop, UV_RUN_DEFAULT); /* the close callbacks */
    uv_loop_close(&d->loop);
  }
  ebb_readers_free(d->readers); /* the loop ran every read to its end */
  free(d->pre_batches);         /* ... and every prefetch batch */
  ebb_runtime_close(d->rt); /* writes the snapshots still waiting */
  if (d->parser) lua_close(d->parser);
  ebb_strmap_free(d->queues);
  while (d->spare_jobs) {
    job *next = d->spare_jobs->next;
    free(d->spare_jobs);
    d->spare_jobs = next;
  }
  ebb_lock_release(d->lock);
  free(d);
  return rc;
}
