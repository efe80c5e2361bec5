/*
 * projection_db.c: the `db` handle of projection modules (see
 * projection_db.h): an SQLite connection seen from sandboxed Lua through
 * four methods, a cache of prepared statements, and an authorizer that keeps
 * the statements made through the handle inside the projection's own tables.
 *
 * The authorizer and the `ours` flag. SQLite has one authorizer per
 * connection, and the runner runs its own statements (checkpoint, BEGIN,
 * COMMIT) on the same connection. Installing the authorizer only around our
 * sqlite3_prepare_v3 calls would not do: sqlite3_set_authorizer expires
 * every prepared statement of the connection (each would be prepared again
 * on its next step, ours and the runner's, on every call), and SQLite
 * re-prepares statements by itself inside sqlite3_step after a schema
 * change, when an authorizer installed only around prepare would be gone.
 * So the authorizer is installed once, for the life of the handle, and
 * `ours` says whether it restricts: it is set only around the
 * sqlite3_prepare_v3 and sqlite3_step calls made for a statement of ours
 * and cleared right after each, before anything else can run. A step
 * re-preparing one of our statements therefore sees ours = 1 and is checked
 * in the mode the statement was cached for (the mode is part of the cache
 * key, and a call never changes mode); the runner's statements, prepared
 * and stepped outside those windows, always see ours = 0. SQLite calls no
 * Lua while stepping, so nothing of the runner's can run inside a window.
 * A few things the authorizer is not told about are checked on the text
 * after preparing: VACUUM (its step asks to ATTACH, refused anyway, but
 * the message would name ATTACH), ALTER TABLE ... RENAME TO _ebb_... (the
 * authorizer sees the old name only), and, in READ mode, any statement
 * that SQLite itself does not call read-only.
 *
 * Every method leaves its statement reset and unbound, or finalized, when
 * it returns or raises: errors raised by the handle itself come after the
 * cleanup, and a Lua error in the middle (out of memory, the sandbox's
 * memory cap) closes a to-be-closed guard that does the same. Strings are
 * bound without copying (SQLITE_STATIC): they stay on the Lua stack for the
 * whole call and are unbound before it returns.
 */
#include "projection_db.h"

#include <lauxlib.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

#define DB_MT "ebb.db"             /* borrowed handles (ebb_projdb_push) */
#define OWNED_MT "ebb.db.owned"    /* handles that own their connection (ebb_projdb_open) */
#define GUARD_MT "ebb.db.guard"
#define NBUCKETS 128               /* power of two, twice EBB_PROJDB_CACHE */
#define EXCERPT 200                /* bytes of SQL quoted in error messages */

/* ------------------------------------------------------------------ */
/* Types                                                               */

typedef struct entry {
  sqlite3_stmt *stmt;
  char *sql;                   /* malloc'd copy of the key text */
  size_t len;
  uint32_t hash;
  int mode;                    /* prepared (and re-prepared) under this mode */
  int nparams;
  struct entry *chain;         /* next in its bucket */
  struct entry *newer, *older; /* the LRU list */
} entry;

struct ebb_projdb {
  sqlite3 *db;          /* NULL once closed */
  int mode;
  int owned;            /* from ebb_projdb_open: closes db; has begin/commit/rollback/close */
  int ours;             /* the authorizer restricts: one of our statements is in prepare or step */
  int saw_alter;        /* the authorizer saw ALTER TABLE during the last prepare */
  int in_use;           /* a method is running; re-entry (from a finalizer) is refused */
  sqlite3_stmt *busy;   /* the statement of the running method, or NULL */
  int busy_cached;      /* busy belongs to the cache (reset it) or not (finalize it) */
  char refusal[320];    /* why the authorizer refused, or "" */
  size_t n;             /* cache entries in use: slots[0 .. n) */
  entry *newest, *oldest;
  entry *buckets[NBUCKETS];
  entry slots[EBB_PROJDB_CACHE];
};

/* The to-be-closed guard of row/rows/value: user value 1 of the handle. */
typedef struct guard {
  ebb_projdb *h;
} guard;

/* Registry key of this state's {[connection] = borrowed handle} (weak values). */
static const char connections_key = 0;

/* ------------------------------------------------------------------ */
/* SQL text                                                            */

/* Skips whitespace and comments, and semicolons too if asked. */
static const char *skip_blank(const char *p, const char *end, int semicolons) {
  while (p < end) {
    if (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == '\f' || *p == '\v' ||
        (semicolons && *p == ';')) {
      p++;
    } else if (*p == '-' && p + 1 < end && p[1] == '-') {
      while (p < end && *p != '\n') p++;
    } else if (*p == '/' && p + 1 < end && p[1] == '*') {
      const char *q = p + 2;
      while (q + 1 < end && !(q[0] == '*' && q[1] == '/')) q++;
      p = q + 1 < end ? q + 2 : end;
    } else {
      break;
    }
  }
  return p;
}

typedef struct token {
  const char *s; /* the token, quotes included; n == 0 at the end */
  size_t n;
} token;

/* Reads the token at p: a quoted identifier or string ("", ``, '', []), a
 * word, or any other single character. Returns the position after it. */
static const char *next_token(const char *p, const char *end, token *t) {
  p = skip_blank(p, end, 0);
  t->s = p;
  if (p == end) {
    t->n = 0;
    return p;
  }
  const unsigned char c = (unsigned char)*p;
  if (c == '"' || c == '`' || c == '\'' || c == '[') {
    const char close = c == '[' ? ']' : (char)c;
    const char *q = p + 1;
    while (q < end) {
      if (*q == close) {
        if (close != ']' && q + 1 < end && q[1] == close) q += 2; /* a doubled quote */
        else break;
      } else {
        q++;
      }
    }
    p = q < end ? q + 1 : end;
  } else if (c == '_' || c == '$' || c >= 0x80 || (c >= '0' && c <= '9') ||
             ((c | 0x20) >= 'a' && (c | 0x20) <= 'z')) {
    do p++;
    while (p < end && (*p == '_' || *p == '$' || (unsigned char)*p >= 0x80 ||
                       (*p >= '0' && *p <= '9') || ((*p | 0x20) >= 'a' && (*p | 0x20) <= 'z')));
  } else {
    p++;
  }
  t->n = (size_t)(p - t->s);
  return p;
}

static int is_word(const token *t, const char *w) {
  return t->n == strlen(w) && sqlite3_strnicmp(t->s, w, (int)t->n) == 0;
}

static int has_ebb_prefix(const char *name) {
  return name != NULL && sqlite3_strnicmp(name, "_ebb_", 5) == 0;
}

/* Whether the identifier token names something starting with _ebb_, once
 * its quotes are taken off. */
static int token_is_ebb(const token *t) {
  char name[8];
  size_t k = 0;
  const char *p = t->s, *end = t->s + t->n;
  char close = 0;
  if (t->n > 0 && (*p == '"' || *p == '`' || *p == '\'' || *p == '[')) {
    close = *p == '[' ? ']' : *p;
    p++;
    end--; /* the closing quote */
  }
  while (p < end && k < sizeof name - 1) {
    name[k++] = *p;
    p += close && close != ']' && *p == close ? 2 : 1; /* a doubled quote is one character */
  }
  name[k] = '\0';
  return has_ebb_prefix(name);
}

/* Whether the statement text is ALTER TABLE [schema.]name RENAME TO _ebb_... */
static int renames_to_ebb(const char *sql) {
  const char *p = sql, *end = sql + strlen(sql);
  token t;
  p = next_token(p, end, &t);
  if (!is_word(&t, "ALTER")) return 0;
  p = next_token(p, end, &t);
  if (!is_word(&t, "TABLE")) return 0;
  p = next_token(p, end, &t); /* the name, or its schema */
  p = next_token(p, end, &t);
  if (t.n == 1 && *t.s == '.') {
    p = next_token(p, end, &t);
    p = next_token(p, end, &t);
  }
  if (!is_word(&t, "RENAME")) return 0;
  p = next_token(p, end, &t);
  if (!is_word(&t, "TO")) return 0; /* RENAME [COLUMN] a TO b renames a column */
  next_token(p, end, &t);
  return token_is_ebb(&t);
}

static int starts_with_word(const char *sql, const char *w) {
  token t;
  next_token(sql, sql + strlen(sql), &t);
  return is_word(&t, w);
}

/* Writes a one-line excerpt of the SQL text for messages: whitespace runs
 * become one space, and beyond EXCERPT bytes it is cut (never inside a
 * character) and ends in "...". out must hold EXCERPT + 4 bytes. */
static void excerpt(char *out, const char *sql, size_t len) {
  size_t k = 0;
  int space = 0, cut = 0;
  for (size_t i = 0; i < len; i++) {
    char c = sql[i];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
      space = k > 0;
      continue;
    }
    if (k + (size_t)space + 1 > EXCERPT) {
      cut = 1;
      break;
    }
    if (space) out[k++] = ' ';
    space = 0;
    out[k++] = c;
  }
  if (cut) {
    /* Drop a last character whose bytes did not all fit. */
    size_t j = k;
    while (j > 0 && k - j < 4 && ((unsigned char)out[j - 1] & 0xC0) == 0x80) j--;
    if (j > 0 && (unsigned char)out[j - 1] >= 0xC0) {
      unsigned lead = (unsigned char)out[j - 1];
      size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
      if (k - (j - 1) < need) k = j - 1;
    }
    memcpy(out + k, "...", 3);
    k += 3;
  }
  out[k] = '\0';
}

/* Strict UTF-8 (no overlong forms, no surrogates, at most U+10FFFF); NUL is
 * a character like any other. */
static int utf8_valid(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    if (n - i >= 8) {
      uint64_t w;
      memcpy(&w, s + i, 8);
      if ((w & 0x8080808080808080ull) == 0) {
        i += 8;
        continue;
      }
    }
    unsigned c = s[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t need;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) need = 1, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) need = 2, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) need = 3, cp = c & 0x07;
    else return 0;
    if (n - i - 1 < need) return 0;
    for (size_t k = 1; k <= need; k++) {
      if ((s[i + k] & 0xC0) != 0x80) return 0;
      cp = cp << 6 | (s[i + k] & 0x3F);
    }
    if (need == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) return 0;
    if (need == 3 && (cp < 0x10000 || cp > 0x10FFFF)) return 0;
    i += need + 1;
  }
  return 1;
}

/* ------------------------------------------------------------------ */
/* The authorizer                                                      */

static int refuse(ebb_projdb *h, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int refuse(ebb_projdb *h, const char *fmt, ...) {
  if (h->refusal[0] == '\0') { /* the first refusal is the one that stopped the statement */
    int k = snprintf(h->refusal, sizeof h->refusal, "not authorized: ");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(h->refusal + k, sizeof h->refusal - (size_t)k, fmt, ap);
    va_end(ap);
  }
  return SQLITE_DENY;
}

/* What an action does, for messages: "projections may not <verb> <name>". */
static const char *verb(int action) {
  switch (action) {
  case SQLITE_CREATE_INDEX: case SQLITE_CREATE_TEMP_INDEX: return "create index";
  case SQLITE_CREATE_TABLE: case SQLITE_CREATE_TEMP_TABLE: return "create table";
  case SQLITE_CREATE_TRIGGER: case SQLITE_CREATE_TEMP_TRIGGER: return "create trigger";
  case SQLITE_CREATE_VIEW: case SQLITE_CREATE_TEMP_VIEW: return "create view";
  case SQLITE_CREATE_VTABLE: return "create virtual table";
  case SQLITE_DROP_INDEX: case SQLITE_DROP_TEMP_INDEX: return "drop index";
  case SQLITE_DROP_TABLE: case SQLITE_DROP_TEMP_TABLE: return "drop table";
  case SQLITE_DROP_TRIGGER: case SQLITE_DROP_TEMP_TRIGGER: return "drop trigger";
  case SQLITE_DROP_VIEW: case SQLITE_DROP_TEMP_VIEW: return "drop view";
  case SQLITE_DROP_VTABLE: return "drop virtual table";
  case SQLITE_INSERT: return "insert into";
  case SQLITE_UPDATE: return "update";
  case SQLITE_DELETE: return "delete from";
  case SQLITE_READ: return "read";
  case SQLITE_ALTER_TABLE: return "alter table";
  case SQLITE_REINDEX: return "reindex";
  case SQLITE_ANALYZE: return "analyze";
  case SQLITE_PRAGMA: return "inspect";
  default: return "use";
  }
}

/* Pragmas that only report on the schema. data_version is on the list
 * because FTS5 asks for it from inside our statements. */
static int pragma_allowed(const char *name) {
  static const char *const allowed[] = {"table_info",  "table_xinfo",      "index_list",
                                        "index_info",  "index_xinfo",      "foreign_key_list",
                                        "data_version"};
  for (size_t i = 0; i < sizeof allowed / sizeof *allowed; i++)
    if (name && sqlite3_stricmp(name, allowed[i]) == 0) return 1;
  return 0;
}

/* Whether the action's a4 names a table (or, for PRAGMA, its argument). */
static int a4_is_a_table(int action) {
  switch (action) {
  case SQLITE_CREATE_INDEX: case SQLITE_CREATE_TEMP_INDEX:
  case SQLITE_DROP_INDEX: case SQLITE_DROP_TEMP_INDEX:
  case SQLITE_CREATE_TRIGGER: case SQLITE_CREATE_TEMP_TRIGGER:
  case SQLITE_DROP_TRIGGER: case SQLITE_DROP_TEMP_TRIGGER:
  case SQLITE_ALTER_TABLE: case SQLITE_PRAGMA:
    return 1;
  default:
    return 0;
  }
}

/* a3, a4: the action's two arguments; db: the database name; inner: the
 * trigger or view the access comes from. See sqlite3_set_authorizer. */
static int authorize(void *ud, int action, const char *a3, const char *a4, const char *db,
                     const char *inner) {
  ebb_projdb *h = ud;
  if (!h->ours) return SQLITE_OK; /* the runner's own statement */
  static const char own_db[] = "a projection has only its own database";
  static const char runner_tx[] = "the runner owns transactions, and handlers already run in one";
  if (action == SQLITE_ALTER_TABLE) db = a3; /* its a3 is the database, a4 the table */
  if (db && strcmp(db, "main") != 0 && strcmp(db, "temp") != 0)
    return refuse(h, "projections may not use database \"%.80s\": %s", db, own_db);
  switch (action) {
  case SQLITE_ATTACH: return refuse(h, "projections may not use ATTACH: %s", own_db);
  case SQLITE_DETACH: return refuse(h, "projections may not use DETACH: %s", own_db);
  case SQLITE_TRANSACTION: return refuse(h, "projections may not use %s: %s", a3, runner_tx);
  case SQLITE_SAVEPOINT:
    return refuse(h, "projections may not use %s: %s",
                  strcmp(a3, "BEGIN") == 0 ? "SAVEPOINT" : strcmp(a3, "RELEASE") == 0 ? "RELEASE"
                                                                                 : "ROLLBACK TO",
                  runner_tx);
  case SQLITE_PRAGMA:
    if (!pragma_allowed(a3))
      return refuse(h, "projections may not use PRAGMA %.80s: pragmas act on the connection, "
                       "which belongs to the runner", a3);
    break;
  case SQLITE_FUNCTION:
    if (a4 && (sqlite3_stricmp(a4, "load_extension") == 0 ||
               sqlite3_stricmp(a4, "fts3_tokenizer") == 0))
      return refuse(h, "projections may not call %s(): it reaches outside the database", a4);
    return SQLITE_OK;
  case SQLITE_SELECT: case SQLITE_RECURSIVE:
    return SQLITE_OK;
  case SQLITE_ALTER_TABLE:
    h->saw_alter = 1;
    break;
  default:
    if (action > SQLITE_RECURSIVE) /* an action newer than this file: not known to be safe */
      return refuse(h, "projections may not use this statement (authorizer action %d)", action);
  }
  /* Names: a3 is the object, except for ALTER TABLE (a4) and PRAGMA (a4,
   * its argument); a4 is also the table an index or trigger is on. */
  const char *name = action == SQLITE_ALTER_TABLE || action == SQLITE_PRAGMA ? NULL : a3;
  const char *on = a4_is_a_table(action) ? a4 : NULL;
  if (has_ebb_prefix(name) || has_ebb_prefix(on))
    return refuse(h, "projections may not %s %.80s%s%.80s: names starting with _ebb_ belong to "
                     "the runner", verb(action), name ? name : on, name && on ? " on " : "",
                  name && on ? on : "");
  /* SQLite's own bookkeeping: it reports schema-table writes while it only
   * parses (declaring a virtual table, inside a query of FTS5) and before
   * the CREATE or DROP that a refusal should name. Statements cannot write
   * these tables (that takes PRAGMA writable_schema), and prepare_checked
   * refuses every statement that is not read-only in READ mode anyway. */
  if ((action == SQLITE_INSERT || action == SQLITE_UPDATE || action == SQLITE_DELETE) &&
      (sqlite3_stricmp(a3, "sqlite_master") == 0 || sqlite3_stricmp(a3, "sqlite_temp_master") == 0))
    return SQLITE_OK;
  if (h->mode == EBB_PROJDB_READ && action != SQLITE_READ && action != SQLITE_PRAGMA)
    return refuse(h, "queries may not %s %.80s%s%.80s: a query only reads", verb(action),
                  name ? name : on ? on : "", name && on ? " on " : "", name && on ? on : "");
  return SQLITE_OK;
}

/* ------------------------------------------------------------------ */
/* Preparing and stepping with the authorizer on                       */

/* Prepares the first statement of sql[0 .. len) (the byte after it must be
 * readable, as Lua strings end in NUL) under the authorizer, then applies the
 * checks the authorizer cannot make. 0: *stmt (NULL if the text is only
 * blanks) and *tail set. -1: nothing prepared, the reason in msg. */
static int prepare_checked(ebb_projdb *h, const char *sql, size_t len, unsigned flags,
                           sqlite3_stmt **stmt, const char **tail, char *msg, size_t msglen) {
  h->refusal[0] = '\0';
  h->saw_alter = 0;
  h->ours = 1;
  int rc = sqlite3_prepare_v3(h->db, sql, (int)len + 1, flags, stmt, tail);
  h->ours = 0;
  if (rc != SQLITE_OK) {
    *stmt = NULL;
    snprintf(msg, msglen, "%s", h->refusal[0] ? h->refusal : sqlite3_errmsg(h->db));
    return -1;
  }
  if (*stmt == NULL) return 0;
  const char *text = sqlite3_sql(*stmt), *why = NULL;
  if (starts_with_word(text, "VACUUM"))
    why = "not authorized: projections may not use VACUUM: it rewrites the whole file, which "
          "belongs to the runner";
  else if (h->saw_alter && renames_to_ebb(text))
    why = "not authorized: projections may not rename a table to a name starting with _ebb_: "
          "those names belong to the runner";
  else if (h->mode == EBB_PROJDB_READ && !sqlite3_stmt_readonly(*stmt))
    why = "not authorized: queries may not write: a query only reads";
  if (why) {
    sqlite3_finalize(*stmt);
    *stmt = NULL;
    snprintf(msg, msglen, "%s", why);
    return -1;
  }
  return 0;
}

/* sqlite3_step under the authorizer: it may re-prepare the statement. */
static int step(ebb_projdb *h, sqlite3_stmt *s) {
  h->refusal[0] = '\0';
  h->ours = 1;
  int rc = sqlite3_step(s);
  h->ours = 0;
  return rc;
}

/* The message of the last failure of h's connection. */
static const char *last_error(ebb_projdb *h) {
  return h->refusal[0] ? h->refusal : sqlite3_errmsg(h->db);
}

/* Ends the running method's use of the handle: its statement reset and
 * unbound (cached) or finalized (not). Harmless when nothing runs. */
static void release(ebb_projdb *h) {
  if (h->busy) {
    if (h->busy_cached) {
      sqlite3_reset(h->busy);
      sqlite3_clear_bindings(h->busy);
    } else {
      sqlite3_finalize(h->busy);
    }
    h->busy = NULL;
  }
  h->ours = 0;
  h->in_use = 0;
}

/* Releases, then raises "db:<method>: <msg> (in "<sql>")". msg may point
 * into SQLite's memory: it is copied before the release. */
static int raise_sql(lua_State *L, ebb_projdb *h, const char *method, const char *msg,
                     const char *sql, size_t len) {
  char m[512], ex[EXCERPT + 4];
  snprintf(m, sizeof m, "%s", msg);
  excerpt(ex, sql, len);
  release(h);
  return luaL_error(L, "db:%s: %s (in \"%s\")", method, m, ex);
}

/* ------------------------------------------------------------------ */
/* The statement cache                                                 */

static uint32_t hash_sql(const char *s, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, s, 8);
    h = (h ^ w) * 0xff51afd7ed558ccdull;
    h ^= h >> 29;
    s += 8;
    n -= 8;
  }
  uint64_t w = 0;
  memcpy(&w, s, n);
  h = (h ^ w) * 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 32;
  return (uint32_t)h;
}

static void lru_unlink(ebb_projdb *h, entry *e) {
  if (e->newer) e->newer->older = e->older;
  else h->newest = e->older;
  if (e->older) e->older->newer = e->newer;
  else h->oldest = e->newer;
  e->newer = e->older = NULL;
}

static void lru_push(ebb_projdb *h, entry *e) {
  e->older = h->newest;
  e->newer = NULL;
  if (h->newest) h->newest->newer = e;
  h->newest = e;
  if (h->oldest == NULL) h->oldest = e;
}

static entry *cache_find(ebb_projdb *h, const char *sql, size_t len, uint32_t hash) {
  for (entry *e = h->buckets[hash & (NBUCKETS - 1)]; e; e = e->chain) {
    if (e->hash == hash && e->len == len && e->mode == h->mode && memcmp(e->sql, sql, len) == 0) {
      if (h->newest != e) {
        lru_unlink(h, e);
        lru_push(h, e);
      }
      return e;
    }
  }
  return NULL;
}

/* Keeps stmt under its text; evicts the least recently used entry when
 * full. NULL when the copy of the text cannot be allocated. */
static entry *cache_add(ebb_projdb *h, const char *sql, size_t len, uint32_t hash,
                        sqlite3_stmt *stmt) {
  char *copy = malloc(len + 1);
  if (copy == NULL) return NULL;
  memcpy(copy, sql, len);
  copy[len] = '\0';
  entry *e;
  if (h->n < EBB_PROJDB_CACHE) {
    e = &h->slots[h->n++];
  } else {
    e = h->oldest;
    lru_unlink(h, e);
    entry **p = &h->buckets[e->hash & (NBUCKETS - 1)];
    while (*p != e) p = &(*p)->chain;
    *p = e->chain;
    sqlite3_finalize(e->stmt);
    free(e->sql);
  }
  e->stmt = stmt;
  e->sql = copy;
  e->len = len;
  e->hash = hash;
  e->mode = h->mode;
  e->nparams = sqlite3_bind_parameter_count(stmt);
  e->chain = h->buckets[hash & (NBUCKETS - 1)];
  h->buckets[hash & (NBUCKETS - 1)] = e;
  lru_push(h, e);
  return e;
}

static void cache_clear(ebb_projdb *h) {
  for (size_t i = 0; i < h->n; i++) {
    sqlite3_finalize(h->slots[i].stmt);
    free(h->slots[i].sql);
  }
  h->n = 0;
  h->newest = h->oldest = NULL;
  memset(h->buckets, 0, sizeof h->buckets);
}

/* ------------------------------------------------------------------ */
/* Binding and reading values                                          */

/* Binds the value at idx as parameter i of s. 0, -1 for a value that
 * cannot be bound, or an SQLite error code. */
static int bind_value(lua_State *L, sqlite3_stmt *s, int i, int idx) {
  size_t n;
  const char *p;
  switch (lua_type(L, idx)) {
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) return sqlite3_bind_int64(s, i, lua_tointeger(L, idx));
    return sqlite3_bind_double(s, i, lua_tonumber(L, idx));
  case LUA_TSTRING:
    p = lua_tolstring(L, idx, &n);
    if (utf8_valid((const unsigned char *)p, n))
      return sqlite3_bind_text64(s, i, p, n, SQLITE_STATIC, SQLITE_UTF8);
    return sqlite3_bind_blob64(s, i, p, n, SQLITE_STATIC);
  case LUA_TBOOLEAN:
    return sqlite3_bind_int(s, i, lua_toboolean(L, idx));
  case LUA_TNIL:
    return sqlite3_bind_null(s, i);
  case LUA_TLIGHTUSERDATA:
    if (lua_touserdata(L, idx) == NULL) return sqlite3_bind_null(s, i); /* the JSON null */
    return -1;
  default:
    return -1;
  }
}

/* Pushes column i of the current row. NULL is the JSON null, or nil. */
static void push_column(lua_State *L, sqlite3_stmt *s, int i, int null_as_nil) {
  const void *p;
  switch (sqlite3_column_type(s, i)) {
  case SQLITE_INTEGER:
    lua_pushinteger(L, sqlite3_column_int64(s, i));
    break;
  case SQLITE_FLOAT:
    lua_pushnumber(L, sqlite3_column_double(s, i));
    break;
  case SQLITE_TEXT:
    p = sqlite3_column_text(s, i);
    if (p == NULL) luaL_error(L, "db: out of memory reading a column");
    lua_pushlstring(L, p, (size_t)sqlite3_column_bytes(s, i));
    break;
  case SQLITE_BLOB:
    p = sqlite3_column_blob(s, i); /* NULL for an empty blob */
    lua_pushlstring(L, p ? p : "", (size_t)sqlite3_column_bytes(s, i));
    break;
  default:
    if (null_as_nil) lua_pushnil(L);
    else ebb_json_push_null(L);
  }
}

/* ------------------------------------------------------------------ */
/* Methods                                                             */

/* The handle in argument 1 (to_db), open and idle (check_db); pushes
 * nothing. The upvalue is the metatable the method was registered for, so
 * handles of the other kind are refused. */
static ebb_projdb *to_db(lua_State *L, const char *method) {
  ebb_projdb *h = lua_touserdata(L, 1);
  int ok = h != NULL && lua_getmetatable(L, 1);
  if (ok) {
    ok = lua_rawequal(L, -1, lua_upvalueindex(1));
    lua_pop(L, 1);
  }
  if (!ok) luaL_error(L, "db:%s: call it on a db handle, with a colon: db:%s(...)", method, method);
  return h;
}

static ebb_projdb *check_db(lua_State *L, const char *method) {
  ebb_projdb *h = to_db(L, method);
  if (h->db == NULL) luaL_error(L, "db:%s: this db handle is closed", method);
  if (h->in_use) luaL_error(L, "db:%s: the db handle is busy with another call", method);
  return h;
}

/* Makes h->busy the statement for the SQL at argument 2, with arguments
 * 3 .. 3 + nargs - 1 bound: from the cache, or prepared (and cached). When
 * the text holds several statements and multi is not NULL (exec without
 * parameters), h->busy is the first one, uncached, unbound, *multi points
 * past it and 1 is returned; else 0. Pushes nothing. Raises, with nothing
 * left busy, on anything wrong. */
static int acquire(lua_State *L, ebb_projdb *h, const char *method, int nargs,
                   const char **multi) {
  size_t len;
  const char *sql = luaL_checklstring(L, 2, &len);
  uint32_t hash = hash_sql(sql, len);
  int nparams;
  h->in_use = 1;
  entry *e = cache_find(h, sql, len, hash);
  if (e) {
    h->busy = e->stmt;
    h->busy_cached = 1;
    nparams = e->nparams;
  } else {
    char msg[512];
    const char *tail;
    sqlite3_stmt *s;
    if (len >= INT_MAX) return raise_sql(L, h, method, "the SQL text is too long", sql, len);
    if (memchr(sql, '\0', len))
      return raise_sql(L, h, method, "the SQL text contains a NUL byte", sql, len);
    if (prepare_checked(h, sql, len, SQLITE_PREPARE_PERSISTENT, &s, &tail, msg, sizeof msg) != 0)
      return raise_sql(L, h, method, msg, sql, len);
    if (s == NULL) return raise_sql(L, h, method, "no SQL statement in the text", sql, len);
    h->busy = s;
    h->busy_cached = 0;
    if (skip_blank(tail, sql + len, 1) != sql + len) {
      if (multi && nargs == 0 && sqlite3_bind_parameter_count(s) == 0) {
        *multi = tail;
        return 1;
      }
      return raise_sql(L, h, method,
                       multi ? "parameters can only be bound to a single statement, and the "
                               "text has several"
                             : "the text has several statements; this method runs one",
                       sql, len);
    }
    e = cache_add(h, sql, len, hash, s);
    h->busy_cached = e != NULL;
    nparams = sqlite3_bind_parameter_count(s);
  }
  if (nargs != nparams) {
    char msg[128];
    snprintf(msg, sizeof msg, "the statement takes %d parameter%s, but %d %s given", nparams,
             nparams == 1 ? "" : "s", nargs, nargs == 1 ? "was" : "were");
    return raise_sql(L, h, method, msg, sql, len);
  }
  for (int i = 1; i <= nargs; i++) {
    int rc = bind_value(L, h->busy, i, i + 2);
    if (rc != SQLITE_OK) {
      char msg[512];
      if (rc < 0)
        snprintf(msg, sizeof msg, "parameter %d: cannot bind a %s", i, luaL_typename(L, i + 2));
      else
        snprintf(msg, sizeof msg, "parameter %d: %s", i, sqlite3_errmsg(h->db));
      return raise_sql(L, h, method, msg, sql, len);
    }
  }
  return 0;
}

/* Steps s to its end. SQLITE_DONE and the rows it changed, or the error. */
static int run_to_end(ebb_projdb *h, sqlite3_stmt *s, sqlite3_int64 *changes) {
  /* sqlite3_changes64 keeps the count of the last INSERT/UPDATE/DELETE
   * across other statements: only trust it when this one changed rows. */
  sqlite3_int64 before = sqlite3_total_changes64(h->db);
  int rc;
  while ((rc = step(h, s)) == SQLITE_ROW) continue;
  *changes = rc == SQLITE_DONE && sqlite3_total_changes64(h->db) != before
                 ? sqlite3_changes64(h->db)
                 : 0;
  return rc;
}

/* Pushes the guard as a to-be-closed value: a Lua error from here on
 * releases the running statement. */
static void push_guard(lua_State *L) {
  lua_getiuservalue(L, 1, 1);
  lua_toclose(L, -1);
}

static int guard_close(lua_State *L) {
  guard *g = lua_touserdata(L, 1);
  release(g->h);
  return 0;
}

/* db:exec(sql, ...) -> rows changed */
static int l_exec(lua_State *L) {
  ebb_projdb *h = check_db(L, "exec");
  const char *tail = NULL;
  sqlite3_int64 changes, total = 0;
  if (acquire(L, h, "exec", lua_gettop(L) - 2, &tail)) {
    size_t len;
    const char *sql = lua_tolstring(L, 2, &len), *end = sql + len;
    for (;;) {
      sqlite3_stmt *s = h->busy;
      if (run_to_end(h, s, &changes) != SQLITE_DONE) {
        const char *text = sqlite3_sql(s);
        return raise_sql(L, h, "exec", last_error(h), text, strlen(text));
      }
      total += changes;
      sqlite3_finalize(s);
      h->busy = NULL;
      const char *p = skip_blank(tail, end, 1);
      if (p == end) break;
      char msg[512];
      if (prepare_checked(h, p, (size_t)(end - p), 0, &s, &tail, msg, sizeof msg) != 0)
        return raise_sql(L, h, "exec", msg, p, (size_t)(end - p));
      if (s == NULL) break;
      h->busy = s;
      h->busy_cached = 0;
      if (sqlite3_bind_parameter_count(s) > 0) {
        const char *text = sqlite3_sql(s);
        return raise_sql(L, h, "exec",
                         "parameters can only be bound to a single statement, and the text has "
                         "several", text, strlen(text));
      }
    }
  } else {
    if (run_to_end(h, h->busy, &changes) != SQLITE_DONE) {
      size_t len;
      const char *sql = lua_tolstring(L, 2, &len);
      return raise_sql(L, h, "exec", last_error(h), sql, len);
    }
    total = changes;
  }
  release(h);
  lua_pushinteger(L, (lua_Integer)total);
  return 1;
}

/* Pushes the current row of s as {column = value}. */
static void push_row(lua_State *L, sqlite3_stmt *s) {
  int ncols = sqlite3_column_count(s);
  lua_createtable(L, 0, ncols);
  for (int i = 0; i < ncols; i++) {
    const char *name = sqlite3_column_name(s, i);
    if (name == NULL) luaL_error(L, "db: out of memory reading a column name");
    push_column(L, s, i, 0);
    lua_setfield(L, -2, name);
  }
}

/* db:row(sql, ...) -> {column = value} | nil;
 * db:value(sql, ...) -> the first column | nil */
static int row_or_value(lua_State *L, const char *method, int value) {
  ebb_projdb *h = check_db(L, method);
  acquire(L, h, method, lua_gettop(L) - 2, NULL);
  push_guard(L);
  int rc = step(h, h->busy);
  if (rc == SQLITE_ROW) {
    if (!value) push_row(L, h->busy);
    else if (sqlite3_column_count(h->busy) > 0) push_column(L, h->busy, 0, 1);
    else lua_pushnil(L);
  } else if (rc == SQLITE_DONE) {
    lua_pushnil(L);
  } else {
    size_t len;
    const char *sql = lua_tolstring(L, 2, &len);
    return raise_sql(L, h, method, last_error(h), sql, len);
  }
  release(h);
  return 1;
}

static int l_row(lua_State *L) {
  return row_or_value(L, "row", 0);
}

static int l_value(lua_State *L) {
  return row_or_value(L, "value", 1);
}

/* db:rows(sql, ...) -> array of {column = value} */
static int l_rows(lua_State *L) {
  ebb_projdb *h = check_db(L, "rows");
  acquire(L, h, "rows", lua_gettop(L) - 2, NULL);
  push_guard(L);
  lua_newtable(L);
  ebb_json_push_array_mt(L);
  lua_setmetatable(L, -2);
  int array = lua_gettop(L), ncols = 0, rc;
  lua_Integer n = 0;
  sqlite3_stmt *s = h->busy;
  while ((rc = step(h, s)) == SQLITE_ROW) {
    if (n == 0) {
      /* The names once, on the stack above the array, for every row. */
      ncols = sqlite3_column_count(s);
      luaL_checkstack(L, ncols + 4, "db:rows: too many columns");
      for (int i = 0; i < ncols; i++) {
        const char *name = sqlite3_column_name(s, i);
        if (name == NULL) luaL_error(L, "db:rows: out of memory reading a column name");
        lua_pushstring(L, name);
      }
    } else if (n == EBB_PROJDB_MAX_ROWS) {
      char msg[160];
      snprintf(msg, sizeof msg,
               "more than %d rows: add a LIMIT (with OFFSET to page through), or use db:row "
               "or db:value", EBB_PROJDB_MAX_ROWS);
      size_t len;
      const char *sql = lua_tolstring(L, 2, &len);
      return raise_sql(L, h, "rows", msg, sql, len);
    }
    lua_createtable(L, 0, ncols);
    for (int i = 0; i < ncols; i++) {
      lua_pushvalue(L, array + 1 + i);
      push_column(L, s, i, 0);
      lua_rawset(L, -3);
    }
    lua_rawseti(L, array, ++n);
  }
  if (rc != SQLITE_DONE) {
    size_t len;
    const char *sql = lua_tolstring(L, 2, &len);
    return raise_sql(L, h, "rows", last_error(h), sql, len);
  }
  release(h);
  lua_settop(L, array);
  return 1;
}

/* db:begin(), db:commit(), db:rollback() of owned handles: run directly on
 * the connection, with ours = 0, so the authorizer lets them through. */
static int run_owned(lua_State *L, const char *method, const char *sql) {
  ebb_projdb *h = check_db(L, method);
  char *e = NULL;
  int rc = sqlite3_exec(h->db, sql, NULL, NULL, &e);
  if (rc != SQLITE_OK) {
    char m[512];
    snprintf(m, sizeof m, "%s", e ? e : sqlite3_errstr(rc));
    sqlite3_free(e);
    return luaL_error(L, "db:%s: %s", method, m);
  }
  return 0;
}

static int l_begin(lua_State *L) {
  return run_owned(L, "begin", "BEGIN");
}

static int l_commit(lua_State *L) {
  return run_owned(L, "commit", "COMMIT");
}

static int l_rollback(lua_State *L) {
  return run_owned(L, "rollback", "ROLLBACK");
}

/* db:close() of owned handles; harmless twice. */
static int l_close(lua_State *L) {
  ebb_projdb *h = to_db(L, "close");
  if (h->in_use) luaL_error(L, "db:close: the db handle is busy with another call");
  ebb_projdb_close(h);
  return 0;
}

/* __gc: a collected handle is idle (no method holds it on the stack). */
static int m_gc(lua_State *L) {
  ebb_projdb_close(lua_touserdata(L, 1));
  return 0;
}

/* __close: closes an owned handle. A borrowed one belongs to the runner,
 * which goes on using it after the handler that closed a variable holding
 * it returns, so there it does nothing. */
static int m_close(lua_State *L) {
  ebb_projdb *h = lua_touserdata(L, 1);
  if (h->owned && h->db) {
    if (h->in_use) luaL_error(L, "db: cannot close the db handle during a call");
    ebb_projdb_close(h);
  }
  return 0;
}

static int m_tostring(lua_State *L) {
  ebb_projdb *h = lua_touserdata(L, 1);
  if (h->db == NULL) lua_pushliteral(L, "ebb.db (closed)");
  else lua_pushfstring(L, "ebb.db (%s, %d cached)", h->mode == EBB_PROJDB_READ ? "read" : "write",
                       (int)h->n);
  return 1;
}

static const luaL_Reg methods[] = {
    {"exec", l_exec}, {"row", l_row}, {"rows", l_rows}, {"value", l_value}, {NULL, NULL},
};

static const luaL_Reg owned_methods[] = {
    {"begin", l_begin}, {"commit", l_commit}, {"rollback", l_rollback}, {"close", l_close},
    {NULL, NULL},
};

static const luaL_Reg metamethods[] = {
    {"__gc", m_gc}, {"__close", m_close}, {"__tostring", m_tostring}, {NULL, NULL},
};

/* Pushes the metatable of borrowed or owned handles, made on first use.
 * Every function in it has the metatable as upvalue 1 (see check_db), and
 * __metatable hides it from Lua code. */
static void push_metatable(lua_State *L, int owned) {
  if (luaL_newmetatable(L, owned ? OWNED_MT : DB_MT)) {
    lua_newtable(L);
    lua_pushvalue(L, -2);
    luaL_setfuncs(L, methods, 1);
    if (owned) {
      lua_pushvalue(L, -2);
      luaL_setfuncs(L, owned_methods, 1);
    }
    lua_setfield(L, -2, "__index");
    lua_pushvalue(L, -1);
    luaL_setfuncs(L, metamethods, 1);
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
  }
}

/* Pushes a new handle in the closed state (db NULL), with its guard. */
static ebb_projdb *new_handle(lua_State *L, int owned) {
  ebb_projdb *h = lua_newuserdatauv(L, sizeof *h, 1);
  memset(h, 0, sizeof *h);
  h->owned = owned;
  guard *g = lua_newuserdatauv(L, sizeof *g, 0);
  g->h = h;
  if (luaL_newmetatable(L, GUARD_MT)) {
    lua_pushcfunction(L, guard_close);
    lua_setfield(L, -2, "__close");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
  }
  lua_setmetatable(L, -2);
  lua_setiuservalue(L, -2, 1);
  push_metatable(L, owned);
  lua_setmetatable(L, -2);
  return h;
}

static int check_mode(lua_State *L, int mode) {
  if (mode != EBB_PROJDB_WRITE && mode != EBB_PROJDB_READ)
    luaL_error(L, "db handle: unknown mode %d", mode);
  return mode;
}

/* ------------------------------------------------------------------ */
/* Public API                                                          */

int ebb_projdb_push(lua_State *L, sqlite3 *db, int mode, ebb_projdb **out) {
  if (db == NULL) luaL_error(L, "ebb_projdb_push: no connection");
  check_mode(L, mode);
  /* One open handle per connection: a second authorizer would replace ours. */
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &connections_key) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "v");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &connections_key);
  }
  if (lua_rawgetp(L, -1, db) == LUA_TUSERDATA && !ebb_projdb_closed(lua_touserdata(L, -1)))
    luaL_error(L, "ebb_projdb_push: the connection already has an open db handle");
  lua_pop(L, 1);
  ebb_projdb *h = new_handle(L, 0);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, -3, db);
  lua_remove(L, -2); /* the map */
  /* Nothing below can fail: the handle holds the connection only now. */
  h->db = db;
  h->mode = mode;
  sqlite3_set_authorizer(db, authorize, h);
  if (out) *out = h;
  return 0;
}

int ebb_projdb_open(lua_State *L, const char *path, int mode, ebb_projdb **out, ebb_error *err) {
  check_mode(L, mode);
  ebb_projdb *h = new_handle(L, 1);
  sqlite3 *db = NULL;
  int rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL);
  if (rc != SQLITE_OK) {
    ebb_error_set(err, EBB_ESTORE, "cannot open %s: %s", path,
                  db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
    sqlite3_close(db);
    lua_pop(L, 1);
    return EBB_ESTORE;
  }
  sqlite3_busy_timeout(db, 2000); /* a second handle on the same file waits for the first */
  h->db = db;
  h->mode = mode;
  sqlite3_set_authorizer(db, authorize, h);
  if (out) *out = h;
  return 0;
}

void ebb_projdb_set_mode(ebb_projdb *h, int mode) {
  if (h) h->mode = mode == EBB_PROJDB_WRITE ? EBB_PROJDB_WRITE : EBB_PROJDB_READ;
}

void ebb_projdb_close(ebb_projdb *h) {
  if (h == NULL || h->db == NULL) return;
  release(h);
  cache_clear(h);
  sqlite3_set_authorizer(h->db, NULL, NULL);
  if (h->owned) sqlite3_close_v2(h->db);
  h->db = NULL;
}

sqlite3 *ebb_projdb_connection(const ebb_projdb *h) {
  return h ? h->db : NULL;
}

int ebb_projdb_closed(const ebb_projdb *h) {
  return h == NULL || h->db == NULL;
}
