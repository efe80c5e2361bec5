/*
 * config.c: settings and their sources (see config.h). One table describes
 * every setting; flags, environment, file, validation, dump and help all
 * walk it, so a setting added here is available everywhere at once.
 */
#include "config.h"
#include "log.h"
#include "store.h"
#include "sandbox.h"

#include <ctype.h>
#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct setting {
  const char *name;      /* with '_'; flags spell it with '-' */
  int is_text;
  size_t offset;
  const char *def;       /* default, as text */
  int64_t min, max;      /* numbers only */
  const char *help;
} setting;

#define TEXT(n, d, h) {#n, 1, offsetof(ebb_config, n), d, 0, 0, h}
#define NUM(n, d, lo, hi, h) {#n, 0, offsetof(ebb_config, n), d, lo, hi, h}
#define GIB ((int64_t)1 << 30)

static const setting settings[] = {
    TEXT(data, "data", "data directory"),
    TEXT(store, "sqlite", "sqlite (DATA/events.db) or a PostgreSQL URI postgresql://user@host:port/db"),
    TEXT(aggregates, "aggregates", "aggregate modules"),
    TEXT(projections, "projections", "projection modules"),
    TEXT(reactors, "reactors", "reactor modules"),
    TEXT(durability, "full", "full (fsync every commit) or normal"),
    TEXT(listen, "127.0.0.1:7070", "serve: HOST:PORT to listen on (port 0 picks one)"),
    TEXT(token, "", "bearer token clients must send (required off loopback)"),
    TEXT(url, "", "go through the daemon at this URL instead of opening the data directory"),
    TEXT(cacert, "", "with an https --url: trust the CA certificates in this PEM file, not the system's"),
    TEXT(log_level, "info", "serve: debug (one line per request), info, warn or error"),
    TEXT(log_format, "auto", "serve: text, json, or auto (text on a terminal)"),
    TEXT(config, "", "a Lua config file"),
    TEXT(nats, "", "serve: publish every event to NATS JetStream at these server URLs (comma-separated)"),
    TEXT(nats_stream, "EBB", "serve: the JetStream stream events are published to"),
    TEXT(nats_subject_prefix, "ebb", "serve: subjects are PREFIX.<category>.<type>"),
    TEXT(nats_from, "", "serve: publish only these categories or event types (comma-separated; all if empty)"),
    TEXT(nats_creds, "", "serve: a NATS credentials file (user JWT and seed) to connect with"),
    TEXT(nats_token, "", "serve: a NATS authentication token to connect with"),
    TEXT(nats_user, "", "serve: a NATS user name to connect with (with nats_password)"),
    TEXT(nats_password, "", "serve: the password of nats_user"),
    TEXT(nats_tls_ca, "", "serve: TLS to NATS, trusting the CA certificates in this PEM file"),
    TEXT(nats_tls_cert, "", "serve: TLS to NATS with this client certificate (PEM; with nats_tls_key)"),
    TEXT(nats_tls_key, "", "serve: the private key (PEM) of nats_tls_cert"),
    NUM(max_body, "1048576", 1024, GIB, "serve: largest request body in bytes (413 above)"),
    NUM(max_connections, "1024", 1, 1000000, "serve: open connections at most (503 above)"),
    NUM(idle_timeout_ms, "60000", 100, 86400000, "serve: close keep-alive connections idle this long"),
    NUM(request_timeout_ms, "10000", 100, 3600000, "serve: a request must arrive within this (408)"),
    NUM(shutdown_timeout_ms, "10000", 0, 3600000, "serve: how long SIGTERM waits for in-flight work"),
    NUM(cache_size, "10000", -1, 100000000, "aggregates whose state stays in memory (-1: none)"),
    NUM(subscriber_buffer, "4194304", 4096, GIB, "serve: bytes queued for a live subscriber before it is cut off"),
    NUM(heartbeat_ms, "15000", 10, 3600000, "serve: SSE heartbeat comment interval"),
    NUM(memory_limit, "0", 0, 64 * GIB, "Lua memory cap in bytes (0: the sandbox default)"),
    NUM(instruction_budget, "0", 0, INT64_MAX, "Lua instructions per call (0: the sandbox default)"),
    NUM(query_timeout_ms, "5000", 0, 3600000, "serve: longest wait of a query's after= (504 then)"),
};
#define N_SETTINGS (sizeof settings / sizeof settings[0])
_Static_assert(N_SETTINGS <= sizeof ((ebb_config *)0)->source / sizeof(const char *),
               "ebb_config.source needs a slot per setting");

static const setting *find(const char *name) {
  char norm[64];
  size_t n = strlen(name);
  if (n >= sizeof norm) return NULL;
  for (size_t i = 0; i <= n; i++) norm[i] = name[i] == '-' ? '_' : name[i];
  for (size_t i = 0; i < N_SETTINGS; i++)
    if (strcmp(settings[i].name, norm) == 0) return &settings[i];
  return NULL;
}

int ebb_config_known(const char *name) {
  return find(name) != NULL;
}

static int set_value(ebb_config *c, const setting *s, const char *value, const char *source,
                     ebb_error *err) {
  char *base = (char *)c;
  if (s->is_text) {
    char *copy = strdup(value);
    if (copy == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
    free(*(char **)(base + s->offset));
    *(char **)(base + s->offset) = copy;
  } else {
    char *end;
    errno = 0;
    long long v = strtoll(value, &end, 10);
    if (errno || end == value || *end || v < s->min || v > s->max)
      return ebb_error_set(err, EBB_EBADREQ, "%s must be an integer from %lld to %lld, not \"%s\"",
                           s->name, (long long)s->min, (long long)s->max, value);
    *(int64_t *)(base + s->offset) = v;
  }
  c->source[s - settings] = source;
  return 0;
}

void ebb_config_init(ebb_config *c) {
  memset(c, 0, sizeof *c);
  for (size_t i = 0; i < N_SETTINGS; i++) set_value(c, &settings[i], settings[i].def, "default", NULL);
}

void ebb_config_free(ebb_config *c) {
  for (size_t i = 0; i < N_SETTINGS; i++)
    if (settings[i].is_text) {
      char **p = (char **)((char *)c + settings[i].offset);
      free(*p);
      *p = NULL;
    }
}

int ebb_config_set(ebb_config *c, const char *name, const char *value, const char *source,
                   ebb_error *err) {
  const setting *s = find(name);
  if (s == NULL) return ebb_error_set(err, EBB_ENOTFOUND, "unknown setting \"%s\"", name);
  return set_value(c, s, value, source, err);
}

int ebb_config_load_env(ebb_config *c, ebb_error *err) {
  for (size_t i = 0; i < N_SETTINGS; i++) {
    char var[64] = "EBB_";
    for (size_t k = 0; settings[i].name[k] && k < 58; k++)
      var[4 + k] = (char)toupper((unsigned char)settings[i].name[k]), var[5 + k] = '\0';
    const char *v = getenv(var);
    if (v && set_value(c, &settings[i], v, "env", err) != 0) {
      char msg[sizeof err->message];
      snprintf(msg, sizeof msg, "%s", err->message);
      return ebb_error_set(err, EBB_EBADREQ, "%s: %s", var, msg);
    }
  }
  return 0;
}

/* Runs the file (argument 1: path; 2: the environment table). */
static int l_run_file(lua_State *L) {
  const char *path = lua_tostring(L, 1);
  if (luaL_loadfilex(L, path, "t") != LUA_OK) lua_error(L);
  lua_pushvalue(L, 2);
  lua_setupvalue(L, -2, 1); /* _ENV: the empty table, so no library is reachable */
  lua_call(L, 0, 1);
  return 1;
}

/* A config file is code: it runs in the sandbox, whose bounds stop a loop
 * or a growing string in it (a typo can make either) with an error instead
 * of hanging or exhausting ebb at start-up. Settings need a few hundred
 * instructions and a few KiB. */
#define CONFIG_MEMORY ((size_t)8 * 1024 * 1024)
#define CONFIG_BUDGET ((int64_t)100000)

int ebb_config_load_file(ebb_config *c, const char *path, ebb_error *err) {
  ebb_sandbox *sb;
  ebb_sandbox_options opt = {.memory_limit = CONFIG_MEMORY, .instruction_budget = CONFIG_BUDGET};
  if (ebb_sandbox_new(&sb, &opt, err) != 0) return err->code;
  lua_State *L = ebb_sandbox_state(sb);
  lua_settop(L, 0);
  lua_newtable(L); /* the environment, kept below the call */
  lua_pushcfunction(L, l_run_file);
  lua_pushstring(L, path);
  lua_pushvalue(L, 1);
  int rc = 0;
  if (ebb_sandbox_call(sb, 2, 1) != LUA_OK) {
    if (ebb_sandbox_killed(sb)) /* the reason does not always name the file */
      rc = ebb_error_set(err, EBB_EBADREQ, "config file %s: %s", path, ebb_sandbox_killed(sb));
    else /* Lua's message starts with the file's name */
      rc = ebb_error_set(err, EBB_EBADREQ, "config file %s",
                         lua_isstring(L, -1) ? lua_tostring(L, -1) : "failed");
    goto done;
  }
  /* A returned table wins over assigned globals. */
  int t = lua_istable(L, -1) ? lua_gettop(L) : 1;
  if (!lua_isnil(L, -1) && !lua_istable(L, -1)) {
    rc = ebb_error_set(err, EBB_EBADREQ, "config file %s returned a %s, not a table of settings",
                       path, luaL_typename(L, -1));
    goto done;
  }
  lua_pushnil(L);
  while (lua_next(L, t)) {
    if (lua_type(L, -2) != LUA_TSTRING) {
      rc = ebb_error_set(err, EBB_EBADREQ, "config file %s: setting names must be strings", path);
      goto done;
    }
    const char *name = lua_tostring(L, -2);
    const setting *s = find(name);
    if (s == NULL || strcmp(s->name, "config") == 0) {
      rc = ebb_error_set(err, EBB_EBADREQ, "config file %s: unknown setting \"%s\"", path, name);
      goto done;
    }
    int ok = s->is_text ? lua_type(L, -1) == LUA_TSTRING : lua_isinteger(L, -1);
    if (!ok) {
      rc = ebb_error_set(err, EBB_EBADREQ, "config file %s: %s must be %s, not a %s", path, name,
                         s->is_text ? "a string" : "an integer", luaL_typename(L, -1));
      goto done;
    }
    char num[32];
    const char *text = lua_tostring(L, -1);
    if (!s->is_text) snprintf(num, sizeof num, "%lld", (long long)lua_tointeger(L, -1)), text = num;
    if (set_value(c, s, text, "file", err) != 0) {
      char msg[sizeof err->message];
      snprintf(msg, sizeof msg, "%s", err->message);
      rc = ebb_error_set(err, EBB_EBADREQ, "config file %s: %s", path, msg);
      goto done;
    }
    lua_pop(L, 1);
  }
done:
  ebb_sandbox_free(sb);
  return rc;
}

int ebb_config_is_loopback(const char *host) {
  return strcmp(host, "localhost") == 0 || strcmp(host, "::1") == 0 ||
         strncmp(host, "127.", 4) == 0;
}

int ebb_config_listen(const ebb_config *c, char *host, size_t hostlen, int *port, ebb_error *err) {
  const char *l = c->listen, *colon;
  size_t hl;
  if (l[0] == '[') {
    const char *close = strchr(l, ']');
    if (close == NULL || close[1] != ':') goto bad;
    hl = (size_t)(close - l - 1);
    l++;
    colon = close + 1;
  } else {
    colon = strrchr(l, ':');
    if (colon == NULL) goto bad;
    hl = (size_t)(colon - l);
  }
  if (hl >= hostlen) goto bad;
  memcpy(host, l, hl);
  host[hl] = '\0';
  if (hl == 0) snprintf(host, hostlen, "127.0.0.1");
  char *end;
  errno = 0;
  long p = strtol(colon + 1, &end, 10);
  if (errno || end == colon + 1 || *end || p < 0 || p > 65535) goto bad;
  *port = (int)p;
  return 0;
bad:
  return ebb_error_set(err, EBB_EBADREQ,
                       "listen must be HOST:PORT (such as 127.0.0.1:7070 or [::1]:7070), not \"%s\"",
                       c->listen);
}

int ebb_config_validate(const ebb_config *c, ebb_error *err) {
  char host[256];
  int port;
  if (strcmp(c->durability, "full") != 0 && strcmp(c->durability, "normal") != 0)
    return ebb_error_set(err, EBB_EBADREQ, "durability must be full or normal, not \"%s\"",
                         c->durability);
  if (ebb_store_backend(c->store) == NULL)
    return ebb_error_set(err, EBB_EBADREQ,
                         "store must be sqlite or a PostgreSQL connection URI "
                         "(postgresql://user@host:port/database)");
  if (ebb_log_level_parse(c->log_level) < 0)
    return ebb_error_set(err, EBB_EBADREQ, "log_level must be debug, info, warn or error, not \"%s\"",
                         c->log_level);
  if (strcmp(c->log_format, "auto") && strcmp(c->log_format, "text") && strcmp(c->log_format, "json"))
    return ebb_error_set(err, EBB_EBADREQ, "log_format must be auto, text or json, not \"%s\"",
                         c->log_format);
  if (ebb_config_listen(c, host, sizeof host, &port, err) != 0) return err->code;
  if (c->nats[0] && (c->nats_stream[0] == '\0' || strpbrk(c->nats_stream, ".*> \t\r\n/\\")))
    return ebb_error_set(err, EBB_EBADREQ,
                         "nats_stream must be a JetStream stream name (no '.', '*', '>', '/', "
                         "'\\' or whitespace), not \"%s\"", c->nats_stream);
  if (c->nats[0] && (c->nats_subject_prefix[0] == '\0' ||
                     strpbrk(c->nats_subject_prefix, "*> \t\r\n") ||
                     c->nats_subject_prefix[0] == '.' ||
                     c->nats_subject_prefix[strlen(c->nats_subject_prefix) - 1] == '.' ||
                     strstr(c->nats_subject_prefix, "..")))
    return ebb_error_set(err, EBB_EBADREQ,
                         "nats_subject_prefix must be NATS subject tokens joined by '.' (no '*', "
                         "'>', whitespace or empty token), not \"%s\"", c->nats_subject_prefix);
  if (c->nats[0] && (c->nats_tls_cert[0] == '\0') != (c->nats_tls_key[0] == '\0'))
    return ebb_error_set(err, EBB_EBADREQ,
                         "nats_tls_cert and nats_tls_key go together: set both (a client "
                         "certificate and its private key) or neither");
  if (c->nats[0] && c->nats_password[0] && c->nats_user[0] == '\0')
    return ebb_error_set(err, EBB_EBADREQ, "nats_password needs nats_user");
  if (c->nats[0]) {
    /* Unreadable files stop the start here; what they hold is checked when
     * the publisher loads them. */
    const struct { const char *name, *path; } files[] = {
        {"nats_creds", c->nats_creds},
        {"nats_tls_ca", c->nats_tls_ca},
        {"nats_tls_cert", c->nats_tls_cert},
        {"nats_tls_key", c->nats_tls_key},
    };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
      if (files[i].path[0] == '\0') continue;
      FILE *f = fopen(files[i].path, "r");
      if (f == NULL)
        return ebb_error_set(err, EBB_EBADREQ, "%s: cannot read %s: %s", files[i].name,
                             files[i].path, strerror(errno));
      fclose(f);
    }
  }
  if (!ebb_config_is_loopback(host) && c->token[0] == '\0')
    return ebb_error_set(err, EBB_EBADREQ,
                         "refusing to listen on %s without a token: anyone who can reach it could "
                         "write events. Set --token (or EBB_TOKEN), or listen on 127.0.0.1",
                         host);
  return 0;
}

/* One URI as shown: a password in it (user:secret@ or password=) masked. */
static void mask_uri(ebb_buf *shown, const char *v, size_t len) {
  char *item = strndup(v, len);
  if (item == NULL) return;
  const char *scheme = strstr(item, "://");
  const char *at = scheme ? strchr(scheme + 3, '@') : NULL;
  const char *colon = scheme ? strchr(scheme + 3, ':') : NULL;
  const char *kw = strstr(item, "password=");
  if (at && colon && colon < at) {
    ebb_buf_append(shown, item, (size_t)(colon + 1 - item));
    ebb_buf_puts(shown, "(set)");
    ebb_buf_puts(shown, at);
  } else if (kw) {
    ebb_buf_append(shown, item, (size_t)(kw + 9 - item));
    ebb_buf_puts(shown, "(set)");
    const char *end = kw + 9 + strcspn(kw + 9, " &");
    ebb_buf_puts(shown, end);
  } else {
    ebb_buf_puts(shown, item);
  }
  free(item);
}

/* A store URI, or the comma-separated NATS URLs, as shown: passwords masked. */
static void put_store(ebb_buf *out, const char *v) {
  ebb_buf shown = EBB_BUF_INIT;
  for (;;) {
    size_t n = strcspn(v, ",");
    mask_uri(&shown, v, n);
    if (v[n] == '\0') break;
    ebb_buf_putc(&shown, ',');
    v += n + 1;
  }
  ebb_buf_json_string(out, shown.data ? shown.data : "", shown.len);
  ebb_buf_free(&shown);
}

void ebb_config_dump(const ebb_config *c, ebb_buf *out) {
  ebb_buf_putc(out, '{');
  for (size_t i = 0; i < N_SETTINGS; i++) {
    const setting *s = &settings[i];
    if (i) ebb_buf_putc(out, ',');
    ebb_buf_json_string(out, s->name, strlen(s->name));
    ebb_buf_puts(out, ":{\"value\":");
    if (s->is_text) {
      const char *v = *(char *const *)((const char *)c + s->offset);
      if ((strcmp(s->name, "token") == 0 || strcmp(s->name, "nats_token") == 0 ||
           strcmp(s->name, "nats_password") == 0) && v[0])
        v = "(set)";
      if (strcmp(s->name, "store") == 0 || strcmp(s->name, "nats") == 0) put_store(out, v);
      else ebb_buf_json_string(out, v, strlen(v));
    } else {
      ebb_buf_printf(out, "%lld", (long long)*(const int64_t *)((const char *)c + s->offset));
    }
    ebb_buf_puts(out, ",\"source\":");
    ebb_buf_json_string(out, c->source[i], strlen(c->source[i]));
    ebb_buf_putc(out, '}');
  }
  ebb_buf_putc(out, '}');
}

void ebb_config_help(ebb_buf *out) {
  for (size_t i = 0; i < N_SETTINGS; i++) {
    char flag[64];
    size_t k = 0;
    for (; settings[i].name[k] && k < sizeof flag - 1; k++)
      flag[k] = settings[i].name[k] == '_' ? '-' : settings[i].name[k];
    flag[k] = '\0';
    ebb_buf_printf(out, "  --%-20s %s", flag, settings[i].help);
    if (settings[i].def[0]) ebb_buf_printf(out, " (default %s)", settings[i].def);
    ebb_buf_putc(out, '\n');
  }
}
