/*
 * cli.c: the `ebb` command line (see cli.h and README.md).
 *
 * A command works on a data directory directly through the runtime, or,
 * with --url, through a running daemon's HTTP API; the output is the same
 * either way. A command that writes refuses a data directory a daemon holds.
 * Output is JSON, one object per line for lists, so it pipes into jq;
 * errors go to stderr as "ebb: <code>: <message>" with an exit code per kind.
 */
#include "cli.h"

#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "config.h"
#include "daemon.h"
#include "http_client.h"
#include "import.h"
#include "json.h"
#include "lock.h"
#include "log.h"
#include "paths.h"
#include "project.h"
#include "projection.h"
#include "reactor.h"
#include "runtime.h"
#include "uuid.h"
#include "version.h"

#define MAX_POSITIONAL 8
#define MAX_SETTINGS 32
#define PAGE 1000

typedef struct cli {
  const char *command;
  const char *pos[MAX_POSITIONAL];
  int npos;
  /* settings (config.h): flags collected first, applied over file and environment */
  ebb_config cfg;
  const char *set_name[MAX_SETTINGS], *set_value[MAX_SETTINGS];
  int nset;
  const char *data, *aggregates, *projections, *durability; /* = cfg's */
  ebb_http_target target; /* the daemon, when remote */
  int remote;  /* --url given: go through the daemon */
  int held;    /* a daemon holds the data directory: open it for reading only */
  /* command options */
  const char *expect, *command_id, *metadata, *from, *limit, *after, *before, *category, *type;
  const char *version, *at, *reason;
  int backward, help, raw, stale, follow;
} cli;

typedef struct option {
  const char *name;
  int takes_value;
  size_t offset;
} option;

#define OPT(n, f) {n, 1, offsetof(cli, f)}
#define FLAG(n, f) {n, 0, offsetof(cli, f)}

static const option global_options[] = {
    FLAG("help", help), {NULL, 0, 0},
};

typedef struct command {
  const char *name;
  int (*run)(cli *);
  int min_pos, max_pos;
  const char *options; /* names allowed, space-separated */
  const char *usage;
  const char *help;
} command;

static const command *find_command(const char *name);

/* ---------------------------------------------------------------- output */

static int exit_code(int code) {
  switch (code) {
    case EBB_OK: return EBB_EXIT_OK;
    case EBB_ENOTFOUND: return EBB_EXIT_NOTFOUND;
    case EBB_EVERSION:
    case EBB_ECONFLICT: return EBB_EXIT_CONFLICT;
    case EBB_EREJECTED: return EBB_EXIT_REJECTED;
    case EBB_ESCRIPT: return EBB_EXIT_SCRIPT;
    case EBB_EBADREQ:
    case EBB_ETOOLARGE: return EBB_EXIT_INVALID;
    case EBB_EBUSY: return EBB_EXIT_BUSY;
    case EBB_EDELETED: return EBB_EXIT_DELETED;
    default: return EBB_EXIT_FAILURE;
  }
}

/* Prints the error as one line of text and, for scripts, one JSON line:
 * ebb: wrong_expected_version: ... */
static int fail(ebb_error *err) {
  fprintf(stderr, "ebb: %s: %s\n", ebb_error_name(err->code), err->message);
  if (err->details) fprintf(stderr, "ebb: details: %s\n", err->details);
  int rc = exit_code(err->code);
  ebb_error_clear(err);
  return rc;
}

static int usage_error(const char *fmt, const char *arg) {
  fprintf(stderr, "ebb: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\nRun 'ebb --help' for usage.\n");
  return EBB_EXIT_USAGE;
}

/* ---------------------------------------------------------------- arguments */

static int parse_int(const char *s, const char *what, int64_t min, int64_t *out) {
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s || *end || v < min) {
    fprintf(stderr, "ebb: %s must be an integer of at least %lld, not \"%s\"\n", what,
            (long long)min, s);
    return -1;
  }
  *out = v;
  return 0;
}

static int set_option(cli *c, const option *opts, const char *name, const char *value,
                      int *used_value) {
  for (const option *o = opts; o->name; o++) {
    if (strcmp(o->name, name) != 0) continue;
    if (o->takes_value) {
      if (value == NULL) return usage_error("option --%s needs a value", name);
      *(const char **)((char *)c + o->offset) = value;
      *used_value = 1;
    } else {
      *(int *)((char *)c + o->offset) = 1;
    }
    return 0;
  }
  return -1;
}

static const option command_options[] = {
    OPT("expect", expect),   OPT("command-id", command_id), OPT("metadata", metadata),
    OPT("from", from),       OPT("limit", limit),           OPT("after", after),
    OPT("before", before),   OPT("category", category),     OPT("type", type),
    OPT("version", version), OPT("at", at), OPT("reason", reason),
    FLAG("backward", backward), FLAG("raw", raw), FLAG("stale", stale), FLAG("follow", follow),
    {NULL, 0, 0},
};

static int option_allowed(const command *cmd, const char *name) {
  size_t n = strlen(name);
  for (const char *p = cmd->options; (p = strstr(p, name)) != NULL; p += n)
    if ((p == cmd->options || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0')) return 1;
  return 0;
}

static int parse_args(cli *c, int argc, char **argv) {
  int only_positional = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!only_positional && strcmp(a, "--") == 0) {
      only_positional = 1;
      continue;
    }
    if (!only_positional && a[0] == '-' && a[1] == '-' && a[2]) {
      char name[64];
      const char *eq = strchr(a + 2, '=');
      size_t n = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
      if (n >= sizeof name) return usage_error("unknown option %s", a);
      memcpy(name, a + 2, n);
      name[n] = '\0';
      const char *value = eq ? eq + 1 : (i + 1 < argc ? argv[i + 1] : NULL);
      int used = 0;
      if (ebb_config_known(name)) {
        if (value == NULL) return usage_error("option --%s needs a value", name);
        if (c->nset == MAX_SETTINGS) return usage_error("too many settings (%s)", a);
        c->set_name[c->nset] = a + 2; /* "name" or "name=value": cut below */
        c->set_value[c->nset++] = value;
        if (!eq) i++;
        continue;
      }
      int rc = set_option(c, global_options, name, value, &used);
      if (rc < 0) {
        const command *cmd = c->command ? find_command(c->command) : NULL;
        if (cmd == NULL || !option_allowed(cmd, name))
          return usage_error("unknown option --%s for this command", name);
        rc = set_option(c, command_options, name, value, &used);
      }
      if (rc > 0) return rc;
      if (used && !eq) i++;
      if (!used && eq) return usage_error("option --%s takes no value", name);
      continue;
    }
    if (!only_positional && a[0] == '-' && a[1] && a[1] != '-' && strcmp(a, "-h") == 0) {
      c->help = 1;
      continue;
    }
    if (c->command == NULL) {
      c->command = a;
      continue;
    }
    if (c->npos == MAX_POSITIONAL) return usage_error("too many arguments (%s)", a);
    c->pos[c->npos++] = a;
  }
  return 0;
}

/* ---------------------------------------------------------------- opening */

/* Resolves the settings: defaults < config file < environment < flags. */
static int resolve_settings(cli *c) {
  ebb_error err;
  ebb_error_init(&err);
  ebb_config_init(&c->cfg);
  const char *file = getenv("EBB_CONFIG");
  char name[64];
  for (int i = 0; i < c->nset; i++) {
    size_t n = strcspn(c->set_name[i], "=");
    snprintf(name, sizeof name, "%.*s", (int)n, c->set_name[i]);
    if (ebb_config_known(name) && !strcmp(name, "config")) file = c->set_value[i];
  }
  if (file && file[0] && ebb_config_load_file(&c->cfg, file, &err) != 0) return fail(&err);
  if (ebb_config_load_env(&c->cfg, &err) != 0) return fail(&err);
  for (int i = 0; i < c->nset; i++) {
    size_t n = strcspn(c->set_name[i], "=");
    snprintf(name, sizeof name, "%.*s", (int)n, c->set_name[i]);
    if (ebb_config_set(&c->cfg, name, c->set_value[i], "flag", &err) != 0) {
      fprintf(stderr, "ebb: --%s: %s\n", name, err.message);
      return EBB_EXIT_USAGE;
    }
  }
  if (strcmp(c->cfg.durability, "full") != 0 && strcmp(c->cfg.durability, "normal") != 0)
    return usage_error("--durability must be full or normal, not \"%s\"", c->cfg.durability);
  c->data = c->cfg.data;
  c->aggregates = c->cfg.aggregates;
  c->projections = c->cfg.projections;
  c->durability = c->cfg.durability;
  c->target.token = c->cfg.token;
  c->target.cacert = c->cfg.cacert;
  if (c->cfg.url[0]) {
    if (ebb_url_parse(c->cfg.url, &c->target.url, &err) != 0) {
      fprintf(stderr, "ebb: --url: %s\n", err.message);
      return EBB_EXIT_USAGE;
    }
    c->remote = 1;
  }
  return 0;
}

/* A daemon holding the data directory: writers refuse (naming it), readers
 * open the store read-only. 0 to go on, else the exit code. */
static int check_holder(cli *c, int writes) {
  char *holder = NULL;
  ebb_error err;
  ebb_error_init(&err);
  int held = ebb_lock_probe(c->data, &holder, &err);
  if (held < 0) return fail(&err);
  c->held = held;
  /* A daemon's data directory holds the SQLite store; a PostgreSQL store is
   * shared by design, and the CLI writes to it beside running daemons. */
  const char *backend = ebb_store_backend(c->cfg.store);
  if (held && writes && (backend == NULL || strcmp(backend, "sqlite") == 0)) {
    char msg[sizeof err.message];
    ebb_lock_describe(c->data, holder, msg, sizeof msg);
    free(holder);
    ebb_error_set(&err, EBB_EBUSY, "%s", msg);
    return fail(&err);
  }
  free(holder);
  return 0;
}

static int open_runtime(cli *c, ebb_runtime **rt) {
  ebb_runtime_options o = {
      .data_dir = c->data,
      .store = c->cfg.store,
      .aggregates_dir = c->aggregates,
      .durability = strcmp(c->durability, "normal") == 0 ? EBB_DURABILITY_NORMAL
                                                          : EBB_DURABILITY_FULL,
      .memory_limit = (size_t)c->cfg.memory_limit,
      .instruction_budget = c->cfg.instruction_budget,
      /* Reading beside a daemon: snapshots are loaded, never written. */
      .snapshots_read_only = c->held,
  };
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_runtime_open(rt, &o, &err) != 0) return fail(&err);
  return 0;
}

/* ---------------------------------------------------------------- through a daemon */

static int code_of_name(const char *name, size_t len) {
  for (int code = -1; code >= -13; code--) {
    const char *n = ebb_error_name(code);
    if (strlen(n) == len && memcmp(n, name, len) == 0) return code;
  }
  return EBB_ESTORE;
}

static int l_json_text(lua_State *L) {
  const char *v = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tointeger(L, 2);
  char msg[160];
  if (ebb_json_decode(L, v, len, msg, sizeof msg) != 0) return 0;
  return 1;
}

/* Decodes the JSON string value v (as ebb_json_member gives it) with ebb's
 * codec into out: 0, or -1 when it is not a string or does not fit. */
static int json_text(const char *v, size_t vlen, char *out, size_t outlen) {
  lua_State *L = luaL_newstate();
  if (L == NULL) return -1;
  int rc = -1;
  lua_pushcfunction(L, l_json_text);
  lua_pushlightuserdata(L, (void *)v);
  lua_pushinteger(L, (lua_Integer)vlen);
  if (lua_pcall(L, 2, 1, 0) == LUA_OK && lua_type(L, -1) == LUA_TSTRING) {
    size_t n;
    const char *text = lua_tolstring(L, -1, &n);
    if (n < outlen) {
      memcpy(out, text, n + 1);
      rc = 0;
    }
  }
  lua_close(L);
  return rc;
}

/* Turns a daemon's error answer into the same line and exit code as locally. */
static int remote_fail(const ebb_http_response *res) {
  const char *e = NULL, *v;
  size_t elen = 0, vlen;
  char name[64], msg[4096];
  int code = EBB_ESTORE;
  int has_error = ebb_json_member(res->body, res->body_len, "error", &e, &elen) == 1;
  if (has_error && ebb_json_member(e, elen, "code", &v, &vlen) == 1 &&
      json_text(v, vlen, name, sizeof name) == 0) {
    if (strcmp(name, "unauthorized") == 0) {
      fprintf(stderr, "ebb: unauthorized: the daemon needs a token (--token or EBB_TOKEN)\n");
      return EBB_EXIT_FAILURE;
    }
    code = code_of_name(name, strlen(name));
  }
  /* The daemon's message, decoded: "ebb: <code>: <message>" like a local failure. */
  if (has_error && ebb_json_member(e, elen, "message", &v, &vlen) == 1 &&
      json_text(v, vlen, msg, sizeof msg) == 0)
    fprintf(stderr, "ebb: %s: %s\n", ebb_error_name(code), msg);
  else fprintf(stderr, "ebb: HTTP %d: %.*s\n", res->status, (int)res->body_len, res->body);
  fprintf(stderr, "ebb: response: %.*s\n", (int)res->body_len, res->body);
  return exit_code(code);
}

/* One request to the daemon. On 200, *res holds the answer (caller frees). */
static int remote_call(cli *c, const char *method, const char *path, const char *body,
                       ebb_http_response *res) {
  ebb_error err;
  ebb_error_init(&err);
  memset(res, 0, sizeof *res);
  if (ebb_http_request_send(&c->target, method, path, body, body ? strlen(body) : 0, 60000, res,
                            &err) != 0)
    return fail(&err);
  if (res->status == 200) return 0;
  int rc = remote_fail(res);
  ebb_http_response_free(res);
  return rc;
}

/* What one page of a daemon's answer holds, read with ebb's codec. */
typedef struct page {
  size_t n;                            /* events */
  int64_t last_version, last_position; /* of the last event */
  int has_next;
  int64_t next;                        /* the answer's "next" position, if any */
} page;

static int64_t int_field(lua_State *L, int t, const char *key, size_t i) {
  lua_getfield(L, t, key);
  if (!lua_isinteger(L, -1))
    luaL_error(L, "event %d has no integer \"%s\"", (int)i, key);
  int64_t v = (int64_t)lua_tointeger(L, -1);
  lua_pop(L, 1);
  return v;
}

/* Decodes the answer (a lightuserdata ebb_http_response) into the page (a
 * lightuserdata page); raises with what is wrong with it. */
static int l_read_page(lua_State *L) {
  const ebb_http_response *res = lua_touserdata(L, 1);
  page *p = lua_touserdata(L, 2);
  lua_settop(L, 2);
  char msg[256];
  if (ebb_json_decode_document(L, res->body, res->body_len, msg, sizeof msg) != 0)
    luaL_error(L, "%s", msg);
  if (!lua_istable(L, 3) || lua_getmetatable(L, 3)) luaL_error(L, "not a JSON object");
  lua_getfield(L, 3, "events");
  int array = 0;
  if (lua_istable(L, 4) && lua_getmetatable(L, 4)) {
    ebb_json_push_array_mt(L);
    array = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
  }
  if (!array) luaL_error(L, "no \"events\" array");
  p->n = (size_t)lua_rawlen(L, 4);
  for (size_t i = 1; i <= p->n; i++) {
    lua_rawgeti(L, 4, (lua_Integer)i);
    if (!lua_istable(L, -1)) luaL_error(L, "event %d is not an object", (int)i);
    p->last_version = int_field(L, -1, "version", i);
    p->last_position = int_field(L, -1, "position", i);
    lua_pop(L, 1);
  }
  lua_getfield(L, 3, "next");
  if (lua_isinteger(L, -1)) {
    p->has_next = 1;
    p->next = (int64_t)lua_tointeger(L, -1);
  }
  return 0;
}

static int print_item(void *ud, const char *item, size_t len) {
  (void)ud;
  fwrite(item, 1, len, stdout);
  fputc('\n', stdout);
  return 0;
}

/* Reads the `events` array of a daemon's answer and prints its events, one
 * per line, as the daemon wrote them, only once the whole answer is known to
 * be what it should be: 0, or an exit code after saying on stderr why the
 * answer cannot be read. */
static int print_page(const ebb_http_response *res, const char *path, page *p) {
  memset(p, 0, sizeof *p);
  lua_State *L = luaL_newstate();
  if (L == NULL) {
    fprintf(stderr, "ebb: out of memory reading the daemon's answer to GET %s\n", path);
    return EBB_EXIT_FAILURE;
  }
  lua_pushcfunction(L, l_read_page);
  lua_pushlightuserdata(L, (void *)res);
  lua_pushlightuserdata(L, p);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
    fprintf(stderr, "ebb: the daemon's answer to GET %s cannot be read: %s: %.200s\n", path,
            lua_tostring(L, -1), res->body);
    lua_close(L);
    return EBB_EXIT_FAILURE;
  }
  lua_close(L);
  const char *v;
  size_t vlen;
  ebb_json_member(res->body, res->body_len, "events", &v, &vlen);
  ebb_json_array_items(v, vlen, print_item, NULL);
  return 0;
}

static void path_segment(ebb_buf *b, const char *s) {
  ebb_buf_putc(b, '/');
  ebb_url_encode(b, s, strlen(s));
}

static void query_param(ebb_buf *b, const char *k, const char *v) {
  if (v == NULL) return;
  ebb_buf_putc(b, strchr(ebb_buf_cstr(b), '?') ? '&' : '?');
  ebb_buf_puts(b, k);
  ebb_buf_putc(b, '=');
  ebb_url_encode(b, v, strlen(v));
}

/* Prints events one per line, upcast to their current schema unless --raw;
 * one that cannot be upcast is printed as stored, with its upcast_error. */
static int print_events(cli *c, ebb_runtime *rt, ebb_event_list *l, ebb_error *err) {
  if (!c->raw && ebb_runtime_upcast_each(rt, l, err) != 0) return err->code;
  ebb_buf b = EBB_BUF_INIT;
  for (size_t i = 0; i < l->n; i++) {
    ebb_buf_reset(&b);
    ebb_event_to_json(&l->items[i], &b);
    ebb_buf_putc(&b, '\n');
    fwrite(b.data, 1, b.len, stdout);
    if (l->items[i].upcast_error)
      fprintf(stderr, "ebb: warning: the event at position %lld is written as stored: %s\n",
              (long long)l->items[i].position, l->items[i].upcast_error);
  }
  ebb_buf_free(&b);
  return 0;
}

/* ---------------------------------------------------------------- commands */

static int remote_send(cli *c, const ebb_command *cmd) {
  ebb_buf b = EBB_BUF_INIT;
  ebb_buf_puts(&b, "{\"aggregate\":");
  ebb_buf_json_string(&b, cmd->aggregate, strlen(cmd->aggregate));
  ebb_buf_puts(&b, ",\"id\":");
  ebb_buf_json_string(&b, cmd->id, strlen(cmd->id));
  ebb_buf_puts(&b, ",\"type\":");
  ebb_buf_json_string(&b, cmd->type, strlen(cmd->type));
  if (cmd->data) ebb_buf_printf(&b, ",\"data\":%s", cmd->data);
  if (cmd->metadata) ebb_buf_printf(&b, ",\"metadata\":%s", cmd->metadata);
  if (cmd->command_id) {
    ebb_buf_puts(&b, ",\"command_id\":");
    ebb_buf_json_string(&b, cmd->command_id, strlen(cmd->command_id));
  }
  if (cmd->has_expected) {
    char buf[24];
    const char *e = ebb_expected_name(cmd->expected, buf, sizeof buf);
    ebb_buf_puts(&b, ",\"expected_version\":");
    if (cmd->expected >= 0) ebb_buf_puts(&b, e);
    else ebb_buf_json_string(&b, e, strlen(e));
  }
  ebb_buf_putc(&b, '}');
  ebb_http_response res;
  int rc = remote_call(c, "POST", "/commands", ebb_buf_cstr(&b), &res);
  ebb_buf_free(&b);
  if (rc) return rc;
  printf("%.*s\n", (int)res.body_len, res.body);
  ebb_http_response_free(&res);
  return 0;
}

static int remote_read(cli *c, int64_t from, int64_t limit) {
  int64_t printed = 0;
  for (;;) {
    int64_t want = limit - printed < PAGE ? limit - printed : PAGE;
    char num[32];
    ebb_buf path = EBB_BUF_INIT;
    ebb_buf_puts(&path, "/streams");
    path_segment(&path, c->pos[0]);
    snprintf(num, sizeof num, "%lld", (long long)from);
    query_param(&path, "from", num);
    snprintf(num, sizeof num, "%lld", (long long)want);
    query_param(&path, "limit", num);
    if (c->backward) query_param(&path, "backward", "true");
    ebb_http_response res;
    int rc = remote_call(c, "GET", ebb_buf_cstr(&path), NULL, &res);
    page p;
    if (rc == 0) rc = print_page(&res, ebb_buf_cstr(&path), &p);
    ebb_http_response_free(&res);
    ebb_buf_free(&path);
    if (rc) return rc;
    printed += (int64_t)p.n;
    if (p.n == 0 || (int64_t)p.n < want || printed >= limit) return 0;
    /* The next page starts next to the last event this one held. */
    from = c->backward ? p.last_version - 1 : p.last_version + 1;
    if (from < 1) return 0;
  }
}

typedef struct follow_state {
  long long count, limit;
} follow_state;

static int on_sse_event(void *ud, const char *id, const char *event, const char *data) {
  follow_state *f = ud;
  (void)id;
  if (event && strcmp(event, "message") != 0) {
    /* The daemon's last word: shutting down, or this client fell behind. */
    fprintf(stderr, "ebb: subscription ended (%s): %s\n", event, data ? data : "");
    return 2;
  }
  if (data) {
    puts(data);
    fflush(stdout);
  }
  return ++f->count >= f->limit ? 1 : 0;
}

static int remote_events(cli *c, int64_t after, int64_t limit) {
  char num[32];
  ebb_buf path = EBB_BUF_INIT;
  if (c->follow) {
    ebb_buf_puts(&path, "/subscribe");
    snprintf(num, sizeof num, "%lld", (long long)after);
    query_param(&path, "after", num);
    query_param(&path, "category", c->category);
    query_param(&path, "type", c->type);
    follow_state f = {0, limit};
    int status = 0;
    char *error_body = NULL;
    ebb_error err;
    ebb_error_init(&err);
    int rc = ebb_http_sse(&c->target, ebb_buf_cstr(&path), NULL, on_sse_event, &f, &status,
                          &error_body, &err);
    ebb_buf_free(&path);
    if (rc < 0) return fail(&err);
    if (status != 200 && status != 0) {
      ebb_http_response res = {.status = status, .body = error_body ? error_body : "",
                               .body_len = error_body ? strlen(error_body) : 0};
      rc = remote_fail(&res);
      free(error_body);
      return rc;
    }
    free(error_body);
    return rc == 2 ? EBB_EXIT_FAILURE : 0;
  }
  int64_t printed = 0;
  for (;;) {
    int64_t want = limit - printed < PAGE ? limit - printed : PAGE;
    ebb_buf_reset(&path);
    ebb_buf_puts(&path, "/events");
    snprintf(num, sizeof num, "%lld", (long long)after);
    query_param(&path, "after", num);
    snprintf(num, sizeof num, "%lld", (long long)want);
    query_param(&path, "limit", num);
    query_param(&path, "category", c->category);
    query_param(&path, "type", c->type);
    ebb_http_response res;
    int rc = remote_call(c, "GET", ebb_buf_cstr(&path), NULL, &res);
    if (rc) {
      ebb_buf_free(&path);
      return rc;
    }
    page p;
    rc = print_page(&res, ebb_buf_cstr(&path), &p);
    if (rc == 0 && (!p.has_next || (p.n > 0 && p.next < p.last_position))) {
      fprintf(stderr, "ebb: the daemon's answer to GET %s has no usable \"next\" position\n",
              ebb_buf_cstr(&path));
      rc = EBB_EXIT_FAILURE;
    }
    ebb_http_response_free(&res);
    if (rc) {
      ebb_buf_free(&path);
      return rc;
    }
    after = p.next;
    printed += (int64_t)p.n;
    if (p.n == 0 || (int64_t)p.n < want || printed >= limit) break;
  }
  ebb_buf_free(&path);
  return 0;
}

static int remote_state(cli *c) {
  ebb_buf path = EBB_BUF_INIT;
  ebb_buf_puts(&path, "/aggregates");
  path_segment(&path, c->pos[0]);
  path_segment(&path, c->pos[1]);
  query_param(&path, "version", c->version);
  query_param(&path, "at", c->at);
  ebb_http_response res;
  int rc = remote_call(c, "GET", ebb_buf_cstr(&path), NULL, &res);
  ebb_buf_free(&path);
  if (rc) return rc;
  printf("%.*s\n", (int)res.body_len, res.body);
  ebb_http_response_free(&res);
  return 0;
}

/* Goes through the daemon that holds the data directory, if one does: 1. */
static int use_holder(cli *c) {
  char *holder = NULL;
  ebb_error err;
  ebb_error_init(&err);
  const char *u;
  size_t ulen;
  if (ebb_lock_probe(c->data, &holder, &err) == 1 && holder &&
      ebb_json_member(holder, strlen(holder), "url", &u, &ulen) == 1) {
    char url[1024];
    if (json_text(u, ulen, url, sizeof url) == 0 && ebb_url_parse(url, &c->target.url, &err) == 0)
      c->remote = 1;
  }
  free(holder);
  ebb_error_clear(&err);
  return c->remote;
}

/* Adds the members of a JSON object as query parameters (scalars only). */
static int l_args_query(lua_State *L) {
  size_t len;
  const char *text = lua_tolstring(L, 1, &len);
  ebb_buf *b = lua_touserdata(L, 2);
  char msg[256];
  if (ebb_json_decode(L, text, len, msg, sizeof msg) != 0) luaL_error(L, "%s", msg);
  if (!lua_istable(L, -1) || lua_getmetatable(L, -1)) luaL_error(L, "the arguments must be a JSON object");
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    const char *k = lua_tostring(L, -2);
    const char *v = NULL;
    if (lua_type(L, -1) == LUA_TBOOLEAN) v = lua_toboolean(L, -1) ? "true" : "false";
    else if (lua_type(L, -1) == LUA_TNUMBER || lua_type(L, -1) == LUA_TSTRING) v = lua_tostring(L, -1);
    else luaL_error(L, "argument %s must be a string, a number or a boolean", k);
    query_param(b, k, v);
    lua_pop(L, 1);
  }
  return 0;
}

/* The end of `ebb projections|reactors ...`: sends the request (path is
 * freed), then prints a list answer one item a line, anything else as is. */
static int send_and_print(cli *c, const char *method, ebb_buf *path, int list) {
  ebb_http_response res;
  int rc = remote_call(c, method, ebb_buf_cstr(path), NULL, &res);
  ebb_buf_free(path);
  if (rc) return rc;
  if (list) ebb_json_array_items(res.body, res.body_len, print_item, NULL);
  else printf("%.*s\n", (int)res.body_len, res.body);
  ebb_http_response_free(&res);
  return 0;
}

static int cmd_reactors(cli *c) {
  if (!c->remote && !use_holder(c))
    return usage_error("%s", "reactors live in the daemon: start 'ebb serve' or give --url");
  const char *action = c->npos > 0 ? c->pos[0] : "list";
  ebb_buf path = EBB_BUF_INIT;
  const char *method = "GET";
  int list = 0;
  ebb_buf_puts(&path, "/reactors");
  if (!strcmp(action, "list") && c->npos <= 1) {
    list = 1;
  } else if (!strcmp(action, "status") && c->npos == 2) {
    path_segment(&path, c->pos[1]);
  } else if (!strcmp(action, "schedules") && c->npos == 2) {
    path_segment(&path, c->pos[1]);
    path_segment(&path, "schedules");
    list = 1;
  } else if ((!strcmp(action, "retry") || !strcmp(action, "skip")) && c->npos == 2) {
    method = "POST";
    path_segment(&path, c->pos[1]);
    path_segment(&path, action);
  } else {
    ebb_buf_free(&path);
    return usage_error("%s", "usage: ebb reactors [list | status NAME | schedules NAME | retry NAME "
                             "| skip NAME]");
  }
  return send_and_print(c, method, &path, list);
}

static int cmd_projections(cli *c) {
  if (!c->remote && !use_holder(c))
    return usage_error("%s", "projections live in the daemon: start 'ebb serve' or give --url");
  const char *action = c->npos > 0 ? c->pos[0] : "list";
  ebb_buf path = EBB_BUF_INIT;
  const char *method = "GET";
  int list = 0;
  if (!strcmp(action, "list") && c->npos == (c->npos > 0 ? 1 : 0)) {
    ebb_buf_puts(&path, "/projections");
    list = 1;
  } else if (!strcmp(action, "status") && c->npos == 2) {
    ebb_buf_puts(&path, "/projections");
    path_segment(&path, c->pos[1]);
  } else if (!strcmp(action, "query") && (c->npos == 3 || c->npos == 4)) {
    ebb_buf_puts(&path, "/projections");
    path_segment(&path, c->pos[1]);
    path_segment(&path, c->pos[2]);
    if (c->after) query_param(&path, "after", c->after);
    if (c->npos == 4) {
      lua_State *L = luaL_newstate();
      int ok = L != NULL;
      if (ok) {
        lua_pushcfunction(L, l_args_query);
        lua_pushstring(L, c->pos[3]);
        lua_pushlightuserdata(L, &path);
        if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
          fprintf(stderr, "ebb: bad_request: query arguments: %s\n", lua_tostring(L, -1));
          ok = 0;
        }
        lua_close(L);
      }
      if (!ok) {
        ebb_buf_free(&path);
        return EBB_EXIT_INVALID;
      }
    }
  } else if ((!strcmp(action, "rebuild") || !strcmp(action, "retry") || !strcmp(action, "skip")) &&
             c->npos == 2) {
    method = "POST";
    ebb_buf_puts(&path, "/projections");
    path_segment(&path, c->pos[1]);
    path_segment(&path, action);
  } else {
    ebb_buf_free(&path);
    return usage_error("%s", "usage: ebb projections [list | status NAME | query NAME QUERY [JSON] "
                             "[--after POS] | rebuild NAME | retry NAME | skip NAME]");
  }
  return send_and_print(c, method, &path, list);
}

static int cmd_serve(cli *c) {
  ebb_error err;
  ebb_error_init(&err);
  ebb_log_setup((ebb_log_level)(ebb_log_level_parse(c->cfg.log_level) < 0
                                    ? EBB_LOG_INFO
                                    : ebb_log_level_parse(c->cfg.log_level)),
                !strcmp(c->cfg.log_format, "json")   ? EBB_LOG_JSON
                : !strcmp(c->cfg.log_format, "text") ? EBB_LOG_TEXT
                                                     : EBB_LOG_AUTO);
  if (ebb_daemon_run(&c->cfg, &err) != 0) return fail(&err);
  return 0;
}

static int cmd_send(cli *c) {
  ebb_command cmd = {
      .aggregate = c->pos[0],
      .id = c->pos[1],
      .type = c->pos[2],
      .data = c->npos > 3 ? c->pos[3] : NULL,
      .data_len = c->npos > 3 ? strlen(c->pos[3]) : 0,
      .metadata = c->metadata,
      .metadata_len = c->metadata ? strlen(c->metadata) : 0,
      .command_id = c->command_id,
  };
  if (c->expect) {
    cmd.has_expected = 1;
    if (ebb_parse_expected(c->expect, &cmd.expected) != 0)
      return usage_error("--expect takes any, no_stream, exists or a version, not \"%s\"",
                         c->expect);
  }
  if (c->remote) return remote_send(c, &cmd);
  int rc = check_holder(c, 1);
  if (rc) return rc;
  ebb_runtime *rt;
  rc = open_runtime(c, &rt);
  if (rc) return rc;
  char *result;
  ebb_error err;
  ebb_error_init(&err);
  rc = ebb_runtime_send(rt, &cmd, &result, &err);
  ebb_runtime_close(rt);
  if (rc) return fail(&err);
  puts(result);
  free(result);
  return 0;
}

static int cmd_read(cli *c) {
  int64_t from = 0, limit = INT64_MAX;
  if ((c->from && parse_int(c->from, "--from", 0, &from)) ||
      (c->limit && parse_int(c->limit, "--limit", 1, &limit)))
    return EBB_EXIT_USAGE;
  if (c->remote) return remote_read(c, from, limit);
  int rc = check_holder(c, 0);
  if (rc) return rc;
  ebb_runtime *rt;
  rc = open_runtime(c, &rt);
  if (rc) return rc;
  ebb_event_list l;
  ebb_event_list_init(&l);
  ebb_error err;
  ebb_error_init(&err);
  int64_t printed = 0;
  for (;;) {
    int64_t want = limit - printed < PAGE ? limit - printed : PAGE;
    if (ebb_store_read_stream(ebb_runtime_store(rt), c->pos[0], from, want, c->backward, &l,
                              &err) != 0)
      break;
    if (print_events(c, rt, &l, &err) != 0) break;
    printed += (int64_t)l.n;
    if ((int64_t)l.n < want || printed >= limit) break;
    int64_t last = l.items[l.n - 1].version;
    from = c->backward ? last - 1 : last + 1;
    ebb_event_list_clear(&l);
    if (c->backward && from < 1) break;
  }
  ebb_event_list_free(&l);
  ebb_runtime_close(rt);
  if (err.code) return fail(&err);
  if (printed == 0) {
    /* An empty answer would hide a typo in the stream name (as the daemon's 404 does). */
    int64_t version = 0;
    ebb_runtime *again;
    if ((rc = open_runtime(c, &again)) != 0) return rc;
    ebb_store_stream_version(ebb_runtime_store(again), c->pos[0], &version, NULL, &err);
    ebb_runtime_close(again);
    if (err.code) return fail(&err);
    if (version == 0) {
      ebb_error_set(&err, EBB_ENOTFOUND, "stream %s does not exist", c->pos[0]);
      return fail(&err);
    }
  }
  return 0;
}

/* Pages through all events after `after` (and before `before`, when > 0). */
static int page_events(cli *c, int64_t after, int64_t before, int64_t limit) {
  int rc = check_holder(c, 0);
  if (rc) return rc;
  ebb_runtime *rt;
  rc = open_runtime(c, &rt);
  if (rc) return rc;
  ebb_event_list l;
  ebb_event_list_init(&l);
  ebb_error err;
  ebb_error_init(&err);
  int64_t printed = 0;
  ebb_read_all q = {.after = after, .category = c->category, .type = c->type};
  for (;;) {
    q.limit = limit - printed < PAGE ? limit - printed : PAGE;
    if (ebb_store_read_all(ebb_runtime_store(rt), &q, &l, &err) != 0) break;
    size_t keep = l.n;
    while (before > 0 && keep > 0 && l.items[keep - 1].position >= before) keep--;
    size_t n = l.n;
    l.n = keep;
    rc = print_events(c, rt, &l, &err);
    l.n = n;
    if (rc) break;
    printed += (int64_t)keep;
    if ((int64_t)n < q.limit || keep < n || printed >= limit) break;
    q.after = l.items[n - 1].position;
    ebb_event_list_clear(&l);
  }
  ebb_event_list_free(&l);
  ebb_runtime_close(rt);
  if (err.code) return fail(&err);
  return 0;
}

static int cmd_events(cli *c) {
  int64_t after = 0, limit = INT64_MAX;
  if ((c->after && parse_int(c->after, "--after", 0, &after)) ||
      (c->limit && parse_int(c->limit, "--limit", 1, &limit)))
    return EBB_EXIT_USAGE;
  if (c->follow && !c->remote && !use_holder(c))
    return usage_error("%s", "--follow needs a running daemon: start 'ebb serve' or give --url");
  if (c->remote && c->raw) return usage_error("%s", "--raw reads the store itself: not with --url");
  if (c->remote) return remote_events(c, after, limit);
  return page_events(c, after, 0, limit);
}

static int cmd_export(cli *c) {
  int64_t after = 0, before = 0;
  if ((c->after && parse_int(c->after, "--after", 0, &after)) ||
      (c->before && parse_int(c->before, "--before", 1, &before)))
    return EBB_EXIT_USAGE;
  return page_events(c, after, before, INT64_MAX);
}

static int cmd_state(cli *c) {
  int64_t version = 0;
  if (c->version && parse_int(c->version, "--version", 0, &version)) return EBB_EXIT_USAGE;
  if (c->version && c->at) return usage_error("%s", "give --version or --at, not both");
  if (c->remote) return remote_state(c);
  int rc = check_holder(c, 0);
  if (rc) return rc;
  ebb_runtime *rt;
  rc = open_runtime(c, &rt);
  if (rc) return rc;
  char *result;
  ebb_error err;
  ebb_error_init(&err);
  rc = ebb_runtime_state_at(rt, c->pos[0], c->pos[1], c->version ? version : -1, c->at, &result,
                            &err);
  ebb_runtime_close(rt);
  if (rc) return fail(&err);
  puts(result);
  free(result);
  return 0;
}

static int cmd_delete(cli *c) {
  int64_t expected = EBB_EXPECT_EXISTS;
  if (c->expect && ebb_parse_expected(c->expect, &expected) != 0)
    return usage_error("--expect takes any, exists or a version, not \"%s\"", c->expect);
  int rc = check_holder(c, 1);
  if (rc) return rc;
  ebb_runtime *rt;
  rc = open_runtime(c, &rt);
  if (rc) return rc;
  ebb_append_result r;
  ebb_error err;
  ebb_error_init(&err);
  rc = ebb_store_delete(ebb_runtime_store(rt), c->pos[0], expected, c->reason, &r, &err);
  ebb_runtime_close(rt);
  if (rc) return fail(&err);
  ebb_buf b = EBB_BUF_INIT;
  ebb_buf_puts(&b, "{\"stream\":");
  ebb_buf_json_string(&b, c->pos[0], strlen(c->pos[0]));
  ebb_buf_printf(&b, ",\"deleted\":true,\"version\":%lld,\"position\":%lld}", (long long)r.version,
                 (long long)r.position);
  puts(ebb_buf_cstr(&b));
  ebb_buf_free(&b);
  return 0;
}

static int cmd_snapshots(cli *c) {
  int deleting = c->npos > 0;
  if (deleting && strcmp(c->pos[0], "delete") != 0)
    return usage_error("unknown snapshots action \"%s\" (only delete)", c->pos[0]);
  if (!deleting && c->stale) return usage_error("%s", "--stale goes with delete");
  int rc = check_holder(c, deleting);
  if (rc) return rc;
  ebb_runtime *rt;
  rc = open_runtime(c, &rt);
  if (rc) return rc;
  ebb_error err;
  ebb_error_init(&err);
  ebb_buf b = EBB_BUF_INIT;
  int64_t deleted = 0;
  rc = deleting ? ebb_runtime_delete_snapshots(rt, c->npos > 1 ? c->pos[1] : NULL, c->stale,
                                               &deleted, &err)
                : ebb_runtime_snapshots(rt, &b, &err);
  ebb_runtime_close(rt);
  if (rc == 0 && deleting) printf("{\"deleted\":%lld}\n", (long long)deleted);
  else if (rc == 0) fwrite(b.data ? b.data : "", 1, b.len, stdout);
  ebb_buf_free(&b);
  return rc ? fail(&err) : 0;
}

static int cmd_check(cli *c) {
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_config_validate(&c->cfg, &err) != 0) {
    fprintf(stderr, "ebb: configuration: %s\n", err.message);
    ebb_error_clear(&err);
    return EBB_EXIT_INVALID;
  }
  int rc = check_holder(c, 0);
  if (rc) return rc;
  ebb_runtime *rt;
  rc = open_runtime(c, &rt);
  if (rc) return rc;
  ebb_buf b = EBB_BUF_INIT, names = EBB_BUF_INIT;
  int problems = ebb_runtime_check(rt, &b);
  int schema = 0;
  const char *backend = ebb_store_kind(ebb_runtime_store(rt));
  if (ebb_store_schema_version(ebb_runtime_store(rt), &schema, &err) != 0) {
    ebb_runtime_close(rt);
    return fail(&err);
  }
  ebb_runtime_close(rt);
  int pproblems = ebb_projections_check(c->projections, NULL, &b, &names);
  ebb_buf rnames = EBB_BUF_INIT;
  int rproblems = ebb_reactors_check(c->cfg.reactors, NULL, &b, &rnames);
  if (problems || pproblems || rproblems) {
    fprintf(stderr, "%s", b.data);
    if (problems)
      fprintf(stderr, "ebb: script_error: %d problem%s in %s\n", problems, problems == 1 ? "" : "s",
              c->aggregates);
    if (pproblems)
      fprintf(stderr, "ebb: script_error: %d problem%s in %s\n", pproblems,
              pproblems == 1 ? "" : "s", c->projections);
    if (rproblems)
      fprintf(stderr, "ebb: script_error: %d problem%s in %s\n", rproblems,
              rproblems == 1 ? "" : "s", c->cfg.reactors);
    ebb_buf_free(&b);
    ebb_buf_free(&names);
    ebb_buf_free(&rnames);
    return EBB_EXIT_SCRIPT;
  }
  ebb_buf_free(&b);
  ebb_buf_printf(&b, "{\"ok\":true,\"store\":{\"backend\":\"%s\",\"schema_version\":%d},"
                 "\"aggregates\":", backend, schema);
  ebb_buf_json_string(&b, c->aggregates, strlen(c->aggregates));
  ebb_buf_puts(&b, ",\"projections\":[");
  ebb_buf_append(&b, names.data ? names.data : "", names.len);
  ebb_buf_putc(&b, ']');
  ebb_buf_free(&names);
  ebb_buf_puts(&b, ",\"reactors\":[");
  ebb_buf_append(&b, rnames.data ? rnames.data : "", rnames.len);
  ebb_buf_putc(&b, ']');
  ebb_buf_free(&rnames);
  ebb_buf_puts(&b, ",\"config\":");
  ebb_config_dump(&c->cfg, &b);
  ebb_buf_puts(&b, "}\n");
  fwrite(b.data, 1, b.len, stdout);
  ebb_buf_free(&b);
  return 0;
}

/* ---------------------------------------------------------------- import */

typedef struct import_state {
  ebb_store *store;
  ebb_import_event *events;
  size_t n, cap;
  long imported, skipped;
} import_state;

/* Appends the collected events, one request per run of one stream's
 * consecutive versions, all or nothing. When one request fails, those before
 * it are appended again on their own, so that everything before the first bad
 * line is imported and nothing after it. */
static int import_flush(import_state *s, ebb_error *err) {
  if (s->n == 0) return 0;
  ebb_event_in *in = calloc(s->n, sizeof *in);
  ebb_append *reqs = calloc(s->n, sizeof *reqs);
  if (!in || !reqs) {
    free(in);
    free(reqs);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  }
  size_t nreq = 0;
  for (size_t i = 0; i < s->n; i++) {
    ebb_import_event *e = &s->events[i];
    in[i] = (ebb_event_in){e->id, e->type, e->schema, e->data, e->data_len,
                           e->metadata, e->metadata_len, e->recorded_at};
    ebb_append *last = nreq ? &reqs[nreq - 1] : NULL;
    if (last && strcmp(last->stream, e->stream) == 0 &&
        s->events[i - 1].version + 1 == e->version && last->events + last->n == &in[i]) {
      last->n++;
      continue;
    }
    /* reserved: an export holds the tombstones of deleted streams too */
    reqs[nreq++] = (ebb_append){.stream = e->stream, .expected = e->version - 1, .events = &in[i],
                                .n = 1, .reserved = 1};
  }
  size_t good = nreq; /* requests before the first failing one */
  int rc = ebb_store_append_atomic(s->store, reqs, nreq, err);
  if (rc != 0 && !err->code) {
    for (good = 0; good < nreq && reqs[good].err.code == EBB_EUNAVAIL; good++) {
    }
    ebb_append *bad = &reqs[good];
    const ebb_import_event *first = &s->events[bad->events - in];
    ebb_error_set(err, bad->err.code, "line %ld (%s, from version %lld): %s", first->line,
                  first->stream, (long long)first->version, bad->err.message);
    err->expected = bad->err.expected;
    err->actual = bad->err.actual;
    if (good > 0) {
      ebb_error again;
      ebb_error_init(&again);
      for (size_t r = 0; r < good; r++) ebb_error_clear(&reqs[r].err);
      if (ebb_store_append_atomic(s->store, reqs, good, &again) != 0) good = 0;
      ebb_error_clear(&again);
    }
  }
  for (size_t r = 0; r < good; r++) {
    if (reqs[r].err.code) continue;
    if (reqs[r].result.idempotent) s->skipped += (long)reqs[r].n;
    else s->imported += (long)reqs[r].n;
  }
  for (size_t r = 0; r < nreq; r++) ebb_error_clear(&reqs[r].err);
  for (size_t i = 0; i < s->n; i++) ebb_import_event_free(&s->events[i]);
  s->n = 0;
  free(in);
  free(reqs);
  return err->code;
}

static int cmd_import(cli *c) {
  FILE *f = stdin;
  if (c->npos > 0 && strcmp(c->pos[0], "-") != 0 && (f = fopen(c->pos[0], "r")) == NULL) {
    fprintf(stderr, "ebb: cannot open %s: %s\n", c->pos[0], strerror(errno));
    return EBB_EXIT_USAGE;
  }
  int rc = check_holder(c, 1);
  if (rc) {
    if (f != stdin) fclose(f);
    return rc;
  }
  ebb_runtime *rt;
  rc = open_runtime(c, &rt);
  if (rc) {
    if (f != stdin) fclose(f);
    return rc;
  }
  lua_State *L = luaL_newstate();
  import_state s = {.store = ebb_runtime_store(rt)};
  ebb_error err;
  ebb_error_init(&err);
  char *line = NULL;
  size_t linecap = 0;
  ssize_t len;
  long lineno = 0;
  if (L == NULL) ebb_error_set(&err, EBB_ENOMEM, "out of memory");
  while (L && !err.code && (len = getline(&line, &linecap, f)) >= 0) {
    lineno++;
    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
    if (len == 0) continue;
    if (s.n == s.cap) {
      size_t cap = s.cap ? s.cap * 2 : 256;
      ebb_import_event *p = realloc(s.events, cap * sizeof *p);
      if (p == NULL) {
        ebb_error_set(&err, EBB_ENOMEM, "out of memory");
        break;
      }
      s.events = p;
      s.cap = cap;
    }
    ebb_import_event *e = &s.events[s.n];
    memset(e, 0, sizeof *e);
    e->line = lineno;
    lua_pushcfunction(L, ebb_import_parse_line);
    lua_pushlstring(L, line, (size_t)len);
    lua_pushlightuserdata(L, e);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
      ebb_import_event_free(e);
      /* everything before the bad line is imported, nothing after it */
      if (import_flush(&s, &err) == 0)
        ebb_error_set(&err, EBB_EBADREQ, "line %ld: %s", lineno, lua_tostring(L, -1));
      lua_pop(L, 1);
      break;
    }
    if (ebb_runtime_check_schema(rt, e->type, e->schema, &err) != 0) {
      ebb_import_event_free(e);
      char why[sizeof err.message];
      snprintf(why, sizeof why, "%s", err.message);
      ebb_error_clear(&err);
      /* everything before the bad line is imported, nothing after it */
      if (import_flush(&s, &err) == 0) ebb_error_set(&err, EBB_EBADREQ, "line %ld: %s", lineno, why);
      break;
    }
    s.n++;
    if (s.n == PAGE) import_flush(&s, &err);
  }
  if (!err.code && ferror(f)) ebb_error_set(&err, EBB_ESTORE, "reading input: %s", strerror(errno));
  if (!err.code) import_flush(&s, &err);
  for (size_t i = 0; i < s.n; i++) ebb_import_event_free(&s.events[i]);
  free(s.events);
  free(line);
  if (L) lua_close(L);
  if (f != stdin) fclose(f);
  ebb_runtime_close(rt);
  printf("{\"imported\":%ld,\"skipped\":%ld}\n", s.imported, s.skipped);
  if (err.code) return fail(&err);
  return 0;
}

/* ---------------------------------------------------------------- projects */

static int cmd_init(cli *c) {
  const char *dir = c->npos ? c->pos[0] : ".";
  ebb_buf report = EBB_BUF_INIT;
  ebb_error err;
  ebb_error_init(&err);
  int rc = ebb_project_init(dir, ebb_paths_skeleton_dir(), &report, &err);
  fputs(ebb_buf_cstr(&report), stdout);
  ebb_buf_free(&report);
  if (rc) return fail(&err);
  printf("next: cd %s && ebb test\n", dir);
  return 0;
}

/* `ebb test ARGS...`: every argument is busted's, so this runs before the
 * option parser; the module directories come from EBB_CONFIG and EBB_<NAME>. */
static int run_test(int argc, char **argv) {
  ebb_config cfg;
  ebb_error err;
  ebb_error_init(&err);
  ebb_config_init(&cfg);
  const char *file = getenv("EBB_CONFIG");
  int rc = (file && file[0] && ebb_config_load_file(&cfg, file, &err) != 0) ||
           ebb_config_load_env(&cfg, &err) != 0;
  if (rc == 0) rc = ebb_project_test(cfg.aggregates, cfg.projections, cfg.reactors, argc, argv, &err);
  ebb_config_free(&cfg);
  if (rc < 0 || err.code) {
    fail(&err);
    return EBB_EXIT_FAILURE;
  }
  return rc;
}

static int cmd_test(cli *c) {
  return run_test(c->npos, (char **)c->pos);
}

/* ---------------------------------------------------------------- help */

static int cmd_help(cli *c);

static const command commands[] = {
    {"send", cmd_send, 3, 4, "expect command-id metadata",
     "ebb send AGGREGATE ID COMMAND [JSON] [--expect N] [--command-id ID] [--metadata JSON]",
     "Runs COMMAND on the aggregate AGGREGATE (its type, e.g. Order, or module name, e.g. order)\n"
     "with instance id ID; JSON is the command's data (an object). Prints the result:\n"
     "{stream, version, position, events}. --expect makes the command fail unless the stream is\n"
     "at that version (any, no_stream, exists or N); --command-id makes it idempotent: sending\n"
     "the same id again returns the original result and records nothing."},
    {"serve", cmd_serve, 0, 0, "",
     "ebb serve [--listen HOST:PORT] [--token T] [--data DIR] [--aggregates DIR] [...]",
     "Runs the daemon: the HTTP API (README.md) on HOST:PORT (default 127.0.0.1:7070), over\n"
     "the data directory, which it locks. Prints 'ebb listening on URL' once it accepts\n"
     "connections. SIGTERM or SIGINT drain it (no new work; in-flight commands finish; exit 0);\n"
     "SIGHUP reloads the aggregate modules (a module that fails keeps the old one). All settings\n"
     "are below; each also comes from EBB_<NAME> or a --config Lua file."},
    {"projections", cmd_projections, 0, 4, "after",
     "ebb projections [list | status NAME | query NAME QUERY [JSON] [--after POS] | rebuild NAME |"
     " retry NAME | skip NAME]",
     "Talks to the daemon's projections (through --url, or the daemon holding the data\n"
     "directory). list: one status per line (version, state, position, lag, last error).\n"
     "query: runs a query with the JSON object's members as arguments; --after POS waits until\n"
     "the projection has processed POS (the position a command answered with). rebuild: a\n"
     "blue/green rebuild from the first event. retry: resume a faulted projection. skip: skip the\n"
     "event it faulted on (recorded in its read model) and resume."},
    {"read", cmd_read, 1, 1, "from limit backward raw",
     "ebb read STREAM [--from N] [--limit N] [--backward] [--raw]",
     "Prints the events of STREAM, one JSON object per line, from version N (forward: the first\n"
     "by default; --backward: the last by default). Events stored with an older schema are\n"
     "upcast to the current one by the aggregate modules; --raw prints them as stored."},
    {"events", cmd_events, 0, 0, "after limit category type raw follow",
     "ebb events [--after POS] [--limit N] [--category C] [--type T] [--raw] [--follow]",
     "Prints all events in global order after position POS, optionally only those of stream\n"
     "category C (the text before a stream's first '-') and/or of stored event type T; upcast\n"
     "to their current schema unless --raw. --follow then goes on printing events as they are\n"
     "committed, through the daemon (its subscription, GET /subscribe), until interrupted."},
    {"state", cmd_state, 2, 2, "version at", "ebb state AGGREGATE ID [--version N | --at TIME]",
     "Prints the aggregate's state: {aggregate, id, stream, version, position, state}; by default\n"
     "the current one, with --version N as it was after version N, with --at TIME (RFC 3339) as it\n"
     "was at that time. Before the first event it is the initial state at version 0."},
    {"delete", cmd_delete, 1, 1, "expect reason", "ebb delete STREAM [--expect N] [--reason TEXT]",
     "Soft-deletes STREAM: appends a tombstone event ($deleted, with the reason). The stream\n"
     "then takes no more commands or appends (exit 9, stream_deleted), its state says deleted,\n"
     "and its events stay readable for audit. Nothing is ever removed or edited."},
    {"snapshots", cmd_snapshots, 0, 2, "stale", "ebb snapshots [delete [STREAM] [--stale]]",
     "Lists the stored snapshots, one JSON object per line: {stream, version, position,\n"
     "recorded_at, fingerprint, bytes, created_at, current}; current is false for snapshots made\n"
     "by other code, which are never loaded. 'delete' removes them (of STREAM only if given; only\n"
     "the stale ones with --stale) and prints {deleted}. Snapshots are taken again as needed."},
    {"check", cmd_check, 0, 0, "", "ebb check",
     "Loads and validates every module in the aggregates, projections and reactors directories\n"
     "(running each projection's setup on a scratch database) and the settings; prints each\n"
     "problem with its file and line and exits 6 if there is any, else {ok, aggregates,\n"
     "projections, reactors, config}."},
    {"reactors", cmd_reactors, 0, 2, "", "ebb reactors [list | status NAME | schedules NAME | retry NAME | skip NAME]",
     "Talks to the daemon about its reactors: list prints one status per line; status NAME its\n"
     "status; schedules NAME its pending schedules; retry NAME resumes a faulted reactor at the\n"
     "event it faulted on, skip NAME records that event as skipped and goes on."},
    {"export", cmd_export, 0, 0, "after before raw",
     "ebb export [--after POS] [--before POS] [--raw]",
     "Writes events in global order as NDJSON (one event per line) to standard output: those\n"
     "with position > --after and < --before, upcast to their current schema; --raw writes them\n"
     "exactly as stored (use it for backups and cold storage). Events stay in the store."},
    {"import", cmd_import, 0, 1, "", "ebb import [FILE]",
     "Reads NDJSON events (as written by export) from FILE or standard input and appends them,\n"
     "keeping stream, version, id, schema, data, metadata and recorded_at. Idempotent by event\n"
     "id: events already stored at the same place are skipped. Prints {imported, skipped}."},
    {"init", cmd_init, 0, 1, "", "ebb init [DIR]",
     "Creates an ebb project in DIR (default: here): an example aggregate in aggregates/, an\n"
     "example projection in projections/, their specs in spec/, a commented ebb.conf.lua and a\n"
     "README. Never overwrites a file: those that exist are reported as skipped."},
    {"test", cmd_test, 0, MAX_POSITIONAL, "", "ebb test [BUSTED ARGS...]",
     "Runs the project's specs (spec/*_spec.lua) with busted under Lua 5.4, with ebb, ebb.testing,\n"
     "ebb.core and the aggregates, projections and spec directories on the paths; every argument\n"
     "goes to busted. Exits as busted does; the last line is \"N passed, N failed\"."},
    {"help", cmd_help, 0, 1, "", "ebb help [COMMAND]", "Shows help for COMMAND."},
    {NULL, NULL, 0, 0, NULL, NULL, NULL},
};

static const command *find_command(const char *name) {
  for (const command *c = commands; c->name; c++)
    if (strcmp(c->name, name) == 0) return c;
  return NULL;
}

static void print_overview(FILE *f) {
  fprintf(f,
          "ebb: a Lua-scriptable event-sourcing runtime\n\n"
          "Usage: ebb COMMAND [ARGS] [OPTIONS]\n       ebb --version\n\nCommands:\n");
  for (const command *c = commands; c->name; c++) fprintf(f, "  %s\n", c->usage);
  fprintf(f,
          "\nSettings (flags > EBB_<NAME> environment > --config FILE > defaults):\n");
  ebb_buf b = EBB_BUF_INIT;
  ebb_config_help(&b);
  fputs(ebb_buf_cstr(&b), f);
  ebb_buf_free(&b);
  fprintf(f,
          "\n"
          "Exit codes: 0 ok, 1 failure, 2 usage, 3 not found, 4 conflict, 5 rejected,\n"
          "6 script error, 7 invalid input, 8 busy, 9 stream deleted. 'ebb help COMMAND' for more.\n");
}

static int cmd_help(cli *c) {
  if (c->npos == 0) {
    print_overview(stdout);
    return 0;
  }
  const command *cmd = find_command(c->pos[0]);
  if (cmd == NULL) return usage_error("unknown command \"%s\"", c->pos[0]);
  printf("Usage: %s\n\n%s\n", cmd->usage, cmd->help);
  return 0;
}

int ebb_cli_main(int argc, char **argv) {
  /* Before option parsing: --version is also an option of `ebb state`. */
  if (argc == 2 && strcmp(argv[1], "--version") == 0) {
    printf("ebb %s (commit %s)\n", EBB_VERSION, EBB_COMMIT);
    return 0;
  }
  if (argc >= 2 && strcmp(argv[1], "test") == 0) return run_test(argc - 2, argv + 2);
  cli c = {0};
  int rc = parse_args(&c, argc, argv);
  if (rc) return rc;
  if ((rc = resolve_settings(&c)) != 0) {
    ebb_config_free(&c.cfg);
    return rc;
  }
  if (c.command == NULL) {
    print_overview(c.help ? stdout : stderr);
    return c.help ? 0 : EBB_EXIT_USAGE;
  }
  const command *cmd = find_command(c.command);
  if (cmd == NULL) return usage_error("unknown command \"%s\"", c.command);
  if (c.help) {
    printf("Usage: %s\n\n%s\n", cmd->usage, cmd->help);
    return 0;
  }
  if (c.npos < cmd->min_pos || c.npos > cmd->max_pos) {
    fprintf(stderr, "ebb: wrong number of arguments\nUsage: %s\n", cmd->usage);
    ebb_config_free(&c.cfg);
    return EBB_EXIT_USAGE;
  }
  rc = cmd->run(&c);
  ebb_config_free(&c.cfg);
  return rc;
}
