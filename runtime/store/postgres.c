/*
 * postgres.c: the event store on PostgreSQL through libpq. Implements
 * ebb_store_vtable (store.h) so several `ebb serve` processes can share one
 * event store; what an append decides is append.c's, the same for SQLite.
 *
 * Global order: every append transaction locks `ebb_head`'s one row (SELECT
 * ... FOR UPDATE, which writes no new row version), numbers its events after
 * the largest position stored (EBB__PG_HEAD, read once the lock is held) and
 * commits, releasing the lock. Writers are therefore serialized on one lock,
 * taken once per append call (one group-commit batch), and a transaction that
 * got positions 11..12 is visible before the one that gets 13 can even start
 * numbering: commit order equals position order and there are no gaps (a
 * request that fails inside the batch is not written, and the positions
 * after it close up). No sequences, timers or high-water marks. The lock is
 * taken in the commit's round trip, not before the batch is read (read_batch,
 * tx_commit): one writer reads and decides while another commits.
 *
 * Data, metadata and names are kept in text columns (never jsonb), so their
 * bytes come back exactly as stored; names and times use the "C" collation so
 * comparisons and order are bytewise, as in SQLite.
 *
 * The schema is versioned in `ebb_schema`; it is created or migrated in one
 * transaction under a transaction-level advisory lock, so daemons starting at
 * once do not race. Durability maps to synchronous_commit: full = on,
 * normal = off (a crash of the PostgreSQL server may lose the last commits).
 *
 * A lost connection fails the call in flight with EBB_EUNAVAIL (an append
 * whose COMMIT got no answer is reported failed, never as stored: re-sending
 * it is idempotent by event id or command id); the next call reconnects once
 * and prepares the statements again. Backoff between attempts is the
 * caller's business.
 *
 * Every statement that carries a value is prepared once per connection and
 * run with bound parameters; text goes in binary format with its length, so
 * nothing is re-quoted or cut at a NUL.
 */
#include "store_backend.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "clock.h"
#include "strmap.h"

/* 1: events, commands, snapshots, the position counter. 2: the correlation
 * and causation indexes (GET /events?correlation_id=). 3: commands.rejection
 * (a refused command's id answers its refusal). 4: ebb_head's row is only
 * the position lock, its position no longer written (EBB__PG_HEAD): an ebb
 * of schema 3 numbering from it must not write beside this one. */
#define SCHEMA_VERSION 4
/* pg_advisory_xact_lock key for migrations: "ebb-schm" in ASCII. */
#define MIGRATION_LOCK "7306920406391828845"

static const char *const schema_v1 =
    "CREATE TABLE ebb_head ("
    "  id integer PRIMARY KEY CHECK (id = 1),"
    "  position bigint NOT NULL);"
    "INSERT INTO ebb_head (id, position) VALUES (1, 0);"
    "CREATE TABLE events ("
    "  position bigint PRIMARY KEY,"
    "  stream text COLLATE \"C\" NOT NULL,"
    "  version bigint NOT NULL CHECK (version >= 1),"
    "  id text COLLATE \"C\" NOT NULL UNIQUE,"
    "  type text COLLATE \"C\" NOT NULL,"
    "  schema bigint NOT NULL DEFAULT 1 CHECK (schema >= 1),"
    "  data text NOT NULL,"
    "  metadata text NOT NULL,"
    "  recorded_at text COLLATE \"C\" NOT NULL,"
    "  category text COLLATE \"C\" NOT NULL,"
    "  UNIQUE (stream, version));"
    "CREATE INDEX events_by_category ON events (category, position);"
    "CREATE INDEX events_by_type ON events (type, position);"
    "CREATE TABLE commands ("
    "  command_id text COLLATE \"C\" PRIMARY KEY,"
    "  stream text COLLATE \"C\" NOT NULL,"
    "  type text COLLATE \"C\" NOT NULL,"
    "  version bigint NOT NULL,"
    "  first_position bigint NOT NULL,"
    "  last_position bigint NOT NULL,"
    "  recorded_at text COLLATE \"C\" NOT NULL);"
    "CREATE TABLE snapshots ("
    "  stream text COLLATE \"C\" NOT NULL,"
    "  fingerprint text COLLATE \"C\" NOT NULL,"
    "  version bigint NOT NULL,"
    "  position bigint NOT NULL,"
    "  recorded_at text COLLATE \"C\" NOT NULL,"
    "  state bytea NOT NULL,"
    "  created_at text COLLATE \"C\" NOT NULL,"
    "  PRIMARY KEY (stream, fingerprint, version));";

/* The lookups' expressions must be these, word for word, to use them. */
static const char *const schema_v2 =
    "CREATE INDEX IF NOT EXISTS events_by_correlation ON events "
    "  (((metadata::jsonb) ->> 'correlation_id'), position);"
    "CREATE INDEX IF NOT EXISTS events_by_causation ON events "
    "  (((metadata::jsonb) ->> 'causation_id'), position);";

/* NULL: accepted; else the refusal as ebb_error_to_json wrote it. */
static const char *const schema_v3 = "ALTER TABLE commands ADD COLUMN IF NOT EXISTS rejection text;";

static const char *const schema_v4 =
    "COMMENT ON COLUMN ebb_head.position IS 'not written since schema 4: the head is "
    "max(events.position); the row is the position lock';";

#define EVENT_COLUMNS "position, stream, version, id, type, schema, data, metadata, recorded_at"

enum {
  S_LOCK_HEAD,
  S_VERSION,
  S_FIND_COMMAND,
  S_READ_FWD,
  S_READ_BACK,
  S_READ_ALL,
  S_READ_ALL_CAT,
  S_READ_ALL_TYPE,
  S_READ_ALL_CAT_TYPE,
  S_READ_RANGE,
  S_HEAD,
  S_SNAP_SAVE,
  S_SNAP_LOAD,
  S_SNAP_LIST,
  S_SNAP_DELETE,
  S_SCHEMA_VERSION,
  S_VERSIONS,
  S_FIND_IDS,
  S_FIND_COMMANDS,
  S_TAIL,
  S_INSERT_MANY_MOVED,
  S_INSERT_COMMANDS_MOVED,
  S_LIST_STREAMS,
  S_READ_FIRST_MANY,
  S_READ_CORRELATION,
  S_READ_CAUSATION,
  S_COUNT
};

static const char *const statements[S_COUNT] = {
    /* The position lock: a row lock, which leaves no row version behind. */
    [S_LOCK_HEAD] = "SELECT 1 FROM ebb_head WHERE id = 1 FOR UPDATE",
    [S_VERSION] = "SELECT version, type FROM events WHERE stream = $1::text "
                  "ORDER BY version DESC LIMIT 1",
    [S_FIND_COMMAND] = "SELECT stream, type, version, first_position, last_position, rejection "
                       "FROM commands WHERE command_id = $1::text",
    [S_READ_FWD] = "SELECT " EVENT_COLUMNS " FROM events WHERE stream = $1::text "
                   "AND version >= $2::bigint ORDER BY version LIMIT $3::bigint",
    [S_READ_BACK] = "SELECT " EVENT_COLUMNS " FROM events WHERE stream = $1::text "
                    "AND version <= $2::bigint ORDER BY version DESC LIMIT $3::bigint",
    [S_READ_ALL] = "SELECT " EVENT_COLUMNS " FROM events WHERE position > $1::bigint "
                   "ORDER BY position LIMIT $2::bigint",
    [S_READ_ALL_CAT] = "SELECT " EVENT_COLUMNS " FROM events WHERE position > $1::bigint "
                       "AND category = $3::text ORDER BY position LIMIT $2::bigint",
    [S_READ_ALL_TYPE] = "SELECT " EVENT_COLUMNS " FROM events WHERE position > $1::bigint "
                        "AND type = $3::text ORDER BY position LIMIT $2::bigint",
    [S_READ_ALL_CAT_TYPE] = "SELECT " EVENT_COLUMNS " FROM events WHERE position > $1::bigint "
                            "AND category = $3::text AND type = $4::text "
                            "ORDER BY position LIMIT $2::bigint",
    [S_READ_RANGE] = "SELECT " EVENT_COLUMNS " FROM events WHERE position BETWEEN $1::bigint "
                     "AND $2::bigint ORDER BY position",
    [S_HEAD] = "SELECT " EBB__PG_HEAD,
    [S_SNAP_SAVE] = "INSERT INTO snapshots (stream, fingerprint, version, position, recorded_at, "
                    "state, created_at) VALUES ($1::text, $2::text, $3::bigint, $4::bigint, "
                    "$5::text, $6::bytea, $7::text) ON CONFLICT (stream, fingerprint, version) "
                    "DO UPDATE SET position = EXCLUDED.position, recorded_at = "
                    "EXCLUDED.recorded_at, state = EXCLUDED.state, created_at = EXCLUDED.created_at",
    [S_SNAP_LOAD] = "SELECT version, position, state FROM snapshots WHERE stream = $1::text AND "
                    "fingerprint = $2::text AND version <= $3::bigint AND recorded_at <= $4::text "
                    "ORDER BY version DESC LIMIT 1",
    [S_SNAP_LIST] = "SELECT stream, version, position, recorded_at, fingerprint, "
                    "octet_length(state), created_at FROM snapshots ORDER BY stream, version",
    [S_SNAP_DELETE] = "DELETE FROM snapshots WHERE ($1::text IS NULL OR stream = $1::text) AND "
                      "($2::text IS NULL OR fingerprint = $2::text) AND "
                      "($3::bigint < 0 OR version = $3::bigint)",
    [S_SCHEMA_VERSION] = "SELECT coalesce(max(version), 0) FROM ebb_schema",
    /* A batch's statements (see "batches" below): whole arrays bound at once. */
    [S_VERSIONS] = "SELECT s.stream, e.version, e.type, e.position FROM unnest($1::text[]) AS "
                   "s(stream) LEFT JOIN LATERAL (SELECT version, type, position FROM events "
                   "WHERE stream = s.stream ORDER BY version DESC LIMIT 1) e ON true",
    [S_FIND_IDS] = "SELECT id, stream, version, position FROM events WHERE id = ANY($1::text[])",
    [S_FIND_COMMANDS] = "SELECT command_id, stream, type, version, first_position, last_position, "
                        "rejection FROM commands WHERE command_id = ANY($1::text[])",
    /* The commit of a batch (see "batches" below): after S_LOCK_HEAD, its
     * rows placed after the head found then, which the statement's snapshot,
     * taken once the lock is held, shows (under the lock since the batch was
     * read, that is where it numbered them: they move by 0). S_TAIL's
     * pg_notify wakes every daemon's watch link (pg_link.c), and the server
     * sends it on COMMIT only. $11: the
     * head the batch was numbered from; $10: the head it numbered up to (the
     * events are in by then: the head less it is how far others moved it
     * meanwhile); $9: where its numbering started (positions at or below it
     * are stored ones, which a command record may name). */
    [S_TAIL] = "SELECT (SELECT " EBB__PG_HEAD "), pg_notify('" EBB__PG_CHANNEL "', current_schema())",
    [S_INSERT_MANY_MOVED] = "INSERT INTO events (position, stream, version, id, type, schema, "
                            "data, metadata, recorded_at, category) SELECT e.p + h.h - $11::bigint, "
                            "e.s, e.v, e.i, e.t, e.sc, e.d, e.m, e.r, e.c FROM "
                            "unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], "
                            "$5::text[], $6::bigint[], $7::text[], $8::text[], $9::text[], "
                            "$10::text[]) AS e(p, s, v, i, t, sc, d, m, r, c), "
                            "(SELECT " EBB__PG_HEAD ") AS h(h)",
    [S_INSERT_COMMANDS_MOVED] = "INSERT INTO commands (command_id, stream, type, version, "
                                "first_position, last_position, recorded_at, rejection) SELECT "
                                "c.i, c.s, c.t, c.v, CASE WHEN c.f > $9::bigint THEN c.f + "
                                "h.h - $10::bigint ELSE c.f END, CASE WHEN c.l > $9::bigint "
                                "THEN c.l + h.h - $10::bigint ELSE c.l END, c.r, c.x FROM "
                                "unnest($1::text[], $2::text[], $3::text[], $4::bigint[], "
                                "$5::bigint[], $6::bigint[], $7::text[], $8::text[]) AS "
                                "c(i, s, t, v, f, l, r, x), (SELECT " EBB__PG_HEAD ") AS h(h)",
    [S_LIST_STREAMS] = "SELECT p.stream, p.v, p.fp, p.lp, e.recorded_at, e.type FROM "
                       "(SELECT stream, max(version) AS v, min(position) AS fp, "
                       "max(position) AS lp FROM events WHERE stream > $1::text AND stream >= $2::text "
                       "AND ($2::text = '' OR left(stream, length($2::text)) = $2::text) "
                       "AND ($3::text IS NULL OR category = $3::text) "
                       "GROUP BY stream ORDER BY stream LIMIT $4::bigint) AS p "
                       "JOIN events AS e ON e.position = p.lp ORDER BY p.stream",
    /* ebb_store_prefetch: each stream's first events, by its index in $1. */
    [S_READ_FIRST_MANY] = "SELECT s.i, e.* FROM unnest($1::text[]) WITH ORDINALITY AS s(name, i) "
                          "CROSS JOIN LATERAL (SELECT " EVENT_COLUMNS " FROM events WHERE "
                          "stream = s.name ORDER BY version LIMIT $2::bigint) AS e "
                          "ORDER BY s.i, e.version",
    [S_READ_CORRELATION] = "SELECT " EVENT_COLUMNS " FROM events WHERE "
                           "((metadata::jsonb) ->> 'correlation_id') = $1::text "
                           "AND position > $2::bigint ORDER BY position LIMIT $3::bigint",
    [S_READ_CAUSATION] = "SELECT " EVENT_COLUMNS " FROM events WHERE "
                         "((metadata::jsonb) ->> 'causation_id') = $1::text "
                         "AND position > $2::bigint ORDER BY position LIMIT $3::bigint",
};

typedef struct pg_batch pg_batch; /* an append transaction, see "append" below */

typedef struct pg_store {
  ebb_store base;
  PGconn *conn;
  int durability, readonly;
  int ready; /* this connection has its settings and prepared statements */
  char state[6]; /* the SQLSTATE of the last failure pg_error saw, or "" */
  pg_batch *batch; /* while an append runs */
} pg_store;

/* ---------------------------------------------------------------- parameters */

#define MAX_PARAMS 11

typedef struct params {
  const char *value[MAX_PARAMS];
  int length[MAX_PARAMS], format[MAX_PARAMS];
  char number[MAX_PARAMS][24];
  int n;
} params;

/* Text (or bytes) with its length, in binary format: passed as is. NULL: SQL NULL. */
static void p_bytes(params *p, const char *s, size_t len) {
  p->value[p->n] = s ? (len ? s : "") : NULL;
  p->length[p->n] = (int)len;
  p->format[p->n] = 1;
  p->n++;
}

static void p_text(params *p, const char *s) {
  p_bytes(p, s, s ? strlen(s) : 0);
}

static void p_int(params *p, int64_t v) {
  snprintf(p->number[p->n], sizeof p->number[0], "%lld", (long long)v);
  p->value[p->n] = p->number[p->n];
  p->length[p->n] = 0;
  p->format[p->n] = 0;
  p->n++;
}

/* ---------------------------------------------------------------- errors */

static void trim(char *msg) {
  size_t n = strlen(msg);
  while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' ')) msg[--n] = '\0';
}

/* Is this failure the server or the connection going away? */
static int is_unavailable(pg_store *s, const PGresult *res) {
  if (PQstatus(s->conn) != CONNECTION_OK) return 1;
  const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
  if (state == NULL) return 1; /* no answer from the server at all */
  return strncmp(state, "08", 2) == 0 ||     /* connection exception */
         strncmp(state, "57P0", 4) == 0 ||   /* admin/crash shutdown, cannot connect now */
         strcmp(state, "25006") == 0;        /* read-only transaction (a standby) */
}

/* Fills err from a failed result (or the connection's message) and frees res. */
static int pg_error(pg_store *s, PGresult *res, ebb_error *err, const char *doing) {
  char msg[768];
  snprintf(msg, sizeof msg, "%s", res && PQresultErrorMessage(res)[0] ? PQresultErrorMessage(res)
                                                                      : PQerrorMessage(s->conn));
  trim(msg);
  const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
  snprintf(s->state, sizeof s->state, "%s", state ? state : "");
  int code = EBB_ESTORE;
  if (is_unavailable(s, res)) code = EBB_EUNAVAIL;
  else if (state && strncmp(state, "40", 2) == 0) code = EBB_EBUSY; /* serialization, deadlock */
  else if (state && strncmp(state, "53", 2) == 0) code = EBB_ENOMEM; /* insufficient resources */
  if (res) PQclear(res);
  if (code == EBB_EUNAVAIL)
    return ebb_error_set(err, code, "%s: the PostgreSQL store is unavailable: %s", doing,
                         msg[0] ? msg : "connection lost");
  return ebb_error_set(err, code, "%s: %s", doing, msg);
}

/* Runs a prepared statement. Returns the result (to PQclear) or NULL with err set. */
static PGresult *run(pg_store *s, int which, const params *p, int binary, ebb_error *err,
                     const char *doing) {
  char name[16];
  snprintf(name, sizeof name, "ebb_%d", which);
  PGresult *res = PQexecPrepared(s->conn, name, p ? p->n : 0, p ? p->value : NULL,
                                 p ? p->length : NULL, p ? p->format : NULL, binary);
  ExecStatusType st = PQresultStatus(res);
  if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) return res;
  pg_error(s, res, err, doing);
  return NULL;
}

/* Runs fixed SQL without values (transaction control, schema). */
static int exec(pg_store *s, const char *sql, ebb_error *err, const char *doing) {
  PGresult *res = PQexec(s->conn, sql);
  ExecStatusType st = PQresultStatus(res);
  if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
    PQclear(res);
    return 0;
  }
  return pg_error(s, res, err, doing);
}

static int64_t get_i64(const PGresult *res, int row, int col) {
  return strtoll(PQgetvalue(res, row, col), NULL, 10);
}

static int64_t get_be64(const PGresult *res, int row, int col) {
  const unsigned char *p = (const unsigned char *)PQgetvalue(res, row, col);
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
  return (int64_t)v;
}

/* ---------------------------------------------------------------- connection */

static void ignore_notice(void *arg, const char *message) {
  (void)arg;
  (void)message;
}

/* Settings and prepared statements of a fresh connection.
 *
 * enable_seqscan = off: every statement here is a look-up or a range read
 * that an index serves. A connection prepares them once, and PostgreSQL
 * caches a generic plan after the first few executions; on a new store the
 * tables are nearly empty then, a sequential scan is the cheapest plan, and
 * it stays cached until an ANALYZE: every append read the whole events table
 * (spec/postgres_plans_spec.lua). Custom plans would also avoid it, at the
 * cost of planning each statement on every execution. */
static int session_setup(pg_store *s, ebb_error *err) {
  char sql[256];
  snprintf(sql, sizeof sql,
           "SET client_encoding = 'UTF8'; SET synchronous_commit = %s; "
           "SET default_transaction_read_only = %s; SET default_transaction_isolation = "
           "'read committed'; SET enable_seqscan = off",
           s->durability == EBB_DURABILITY_FULL ? "on" : "off", s->readonly ? "on" : "off");
  if (exec(s, sql, err, "configuring the PostgreSQL session")) return err->code;
  return 0;
}

static int prepare_all(pg_store *s, ebb_error *err) {
  for (int i = 0; i < S_COUNT; i++) {
    char name[16];
    snprintf(name, sizeof name, "ebb_%d", i);
    PGresult *res = PQprepare(s->conn, name, statements[i], 0, NULL);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) return pg_error(s, res, err, "preparing a statement");
    PQclear(res);
  }
  s->ready = 1;
  return 0;
}

/* Before each call: a working connection outside any transaction. A lost one
 * is reconnected once; failing that, EBB_EUNAVAIL. */
static int ensure(pg_store *s, ebb_error *err) {
  if (s->ready && PQstatus(s->conn) == CONNECTION_OK) {
    PGTransactionStatusType ts = PQtransactionStatus(s->conn);
    if (ts == PQTRANS_IDLE) return 0;
    if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR) {
      if (exec(s, "ROLLBACK", err, "rolling back") == 0) return 0;
      ebb_error_clear(err);
    }
  }
  s->ready = 0;
  PQreset(s->conn);
  if (PQstatus(s->conn) != CONNECTION_OK) {
    char msg[512];
    snprintf(msg, sizeof msg, "%s", PQerrorMessage(s->conn));
    trim(msg);
    return ebb_error_set(err, EBB_EUNAVAIL, "the PostgreSQL store is unavailable: %s", msg);
  }
  if (session_setup(s, err) || prepare_all(s, err)) return err->code;
  return 0;
}

/* Is the connection gone? */
static int lost(pg_store *s) {
  return PQstatus(s->conn) != CONNECTION_OK;
}

/* A statement outside any transaction (a read, or one that may run twice):
 * when the connection turns out to be gone (a server restart since the last
 * call), reconnect and run it once more. Nothing was sent that could have
 * changed anything, so a second try is safe. */
static PGresult *run_alone(pg_store *s, int which, const params *p, int binary, ebb_error *err,
                           const char *doing) {
  if (ensure(s, err)) return NULL;
  PGresult *res = run(s, which, p, binary, err, doing);
  if (res || !lost(s)) return res;
  ebb_error_clear(err);
  if (ensure(s, err)) return NULL;
  return run(s, which, p, binary, err, doing);
}

/* BEGIN, reconnecting once if the connection turns out to be gone. */
static int begin(pg_store *s, ebb_error *err) {
  if (ensure(s, err)) return err->code;
  if (exec(s, "BEGIN", err, "starting a transaction") == 0) return 0;
  if (!lost(s)) return err->code;
  ebb_error_clear(err);
  if (ensure(s, err) || exec(s, "BEGIN", err, "starting a transaction")) return err->code;
  return 0;
}

static int read_schema_version(pg_store *s, int *version, ebb_error *err) {
  PGresult *res = PQexec(s->conn, "SELECT coalesce(max(version), 0) FROM ebb_schema");
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    if (state && strcmp(state, "42P01") == 0) { /* undefined table: no schema yet */
      PQclear(res);
      *version = 0;
      return 0;
    }
    return pg_error(s, res, err, "reading the schema version");
  }
  *version = (int)get_i64(res, 0, 0);
  PQclear(res);
  return 0;
}

/* Creates or upgrades the schema, once, whoever else starts at the same time. */
static int migrate(pg_store *s, ebb_error *err) {
  if (exec(s, "BEGIN", err, "starting the schema migration") ||
      exec(s, "SELECT pg_advisory_xact_lock(" MIGRATION_LOCK ")", err, "locking the schema") ||
      exec(s, "CREATE TABLE IF NOT EXISTS ebb_schema (version integer NOT NULL)", err,
           "creating the schema version table"))
    goto fail;
  int version;
  if (read_schema_version(s, &version, err)) goto fail;
  if (version > SCHEMA_VERSION) {
    ebb_error_set(err, EBB_ESTORE, "the store's schema version %d is newer than this ebb knows (%d)",
                  version, SCHEMA_VERSION);
    goto fail;
  }
  if (version < 1 && (exec(s, schema_v1, err, "creating the schema") ||
                      exec(s, "INSERT INTO ebb_schema (version) VALUES (1)", err,
                           "recording the schema version")))
    goto fail;
  if (version < 2 && (exec(s, schema_v2, err, "adding the correlation and causation indexes") ||
                      exec(s, "INSERT INTO ebb_schema (version) VALUES (2)", err,
                           "recording the schema version")))
    goto fail;
  if (version < 3 && (exec(s, schema_v3, err, "adding the commands' refusals") ||
                      exec(s, "INSERT INTO ebb_schema (version) VALUES (3)", err,
                           "recording the schema version")))
    goto fail;
  if (version < 4 && (exec(s, schema_v4, err, "making the position counter a lock only") ||
                      exec(s, "INSERT INTO ebb_schema (version) VALUES (4)", err,
                           "recording the schema version")))
    goto fail;
  /* Every append locks this row; without it an unlocked batch would commit
   * unserialized (positions then kept unique by the key, but not in order). */
  if (exec(s, "INSERT INTO ebb_head (id, position) VALUES (1, 0) ON CONFLICT (id) DO NOTHING", err,
           "checking the position lock's row"))
    goto fail;
  if (exec(s, "COMMIT", err, "committing the schema")) goto fail;
  return 0;
fail:
  if (PQstatus(s->conn) == CONNECTION_OK) PQclear(PQexec(s->conn, "ROLLBACK"));
  return err->code;
}

static void batch_free(pg_batch *b);

static void pg_close(ebb_store *base) {
  pg_store *s = (pg_store *)base;
  batch_free(s->batch);
  PQfinish(s->conn);
  free(s);
}

static const ebb_store_vtable pg_vtable;

int ebb__store_postgres_open(ebb_store **out, const ebb_store_options *opt, ebb_error *err) {
  *out = NULL;
  pg_store *s = calloc(1, sizeof *s);
  if (s == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory opening the store");
  s->base.vt = &pg_vtable;
  s->durability = opt->durability;
  s->readonly = opt->readonly;
  /* Defaults first: the URI, expanded in place of dbname, overrides them. A
   * connection attempt gives up after 10 s rather than never, and keepalives
   * notice a server that vanished without closing the connection. */
  const char *const keys[] = {"connect_timeout", "keepalives_idle", "keepalives_interval",
                              "keepalives_count", "dbname", NULL};
  const char *const values[] = {"10", "10", "5", "3", opt->uri, NULL};
  s->conn = PQconnectdbParams(keys, values, 1);
  if (s->conn == NULL) {
    free(s);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory connecting to PostgreSQL");
  }
  if (PQstatus(s->conn) != CONNECTION_OK) {
    char msg[512];
    snprintf(msg, sizeof msg, "%s", PQerrorMessage(s->conn));
    trim(msg);
    pg_close(&s->base);
    return ebb_error_set(err, EBB_EUNAVAIL, "cannot connect to the PostgreSQL store: %s", msg);
  }
  PQsetNoticeProcessor(s->conn, ignore_notice, NULL);
  int version = 0;
  if (session_setup(s, err) || (!opt->readonly && migrate(s, err)) ||
      read_schema_version(s, &version, err))
    goto fail;
  if (version < SCHEMA_VERSION) {
    if (version == 0)
      ebb_error_set(err, EBB_ESTORE,
                    "the PostgreSQL database holds no ebb store yet; open it for writing once to "
                    "create it");
    else
      ebb_error_set(err, EBB_ESTORE,
                    "the PostgreSQL store's schema version %d is older than this ebb's (%d); "
                    "open it for writing once to upgrade it",
                    version, SCHEMA_VERSION);
    goto fail;
  }
  if (prepare_all(s, err)) goto fail;
  *out = &s->base;
  return 0;
fail:
  pg_close(&s->base);
  return err->code;
}

/* ---------------------------------------------------------------- append
 *
 * The operations of one append transaction (ebb__append_ops); append.c
 * decides. A batch (one append call, one group commit of the daemon) is two
 * round trips whatever it holds: libpq's pipeline mode sends the last event
 * of every stream the batch names, the stored rows of its event ids and
 * command ids, and the head, all at once, without a lock (tx_begin_unlocked;
 * tx_begin, for a batch decided again, sends BEGIN and the lock first). The
 * requests are then decided from what was read, kept up to date with what
 * the batch writes (tx_write), so that each request sees the ones before it;
 * an idempotent re-send or a conflict is answered from the stored rows read
 * with the rest. The accepted events go into bound arrays, and one pipeline
 * sends BEGIN and the lock, the events (one INSERT through unnest), the
 * command records, the wake-up and COMMIT (tx_commit). */

/* A PostgreSQL binary array (the format array_recv reads) of text or int8. */
typedef struct arr {
  ebb_buf b;
  uint32_t n;
} arr;

static void put32(ebb_buf *b, uint32_t v) {
  unsigned char x[4] = {(unsigned char)(v >> 24), (unsigned char)(v >> 16), (unsigned char)(v >> 8),
                        (unsigned char)v};
  ebb_buf_append(b, x, 4);
}

static void arr_init(arr *a, uint32_t oid) {
  a->b = (ebb_buf)EBB_BUF_INIT;
  a->n = 0;
  put32(&a->b, 1);   /* dimensions */
  put32(&a->b, 0);   /* no NULLs */
  put32(&a->b, oid); /* element type */
  put32(&a->b, 0);   /* length, set by arr_param */
  put32(&a->b, 1);   /* lower bound */
}

static void arr_bytes(arr *a, const char *p, size_t len) {
  put32(&a->b, (uint32_t)len);
  if (len) ebb_buf_append(&a->b, p, len);
  a->n++;
}

static void arr_text(arr *a, const char *p) {
  arr_bytes(a, p, strlen(p));
}

/* A text, or NULL (length -1). */
static void arr_text_or_null(arr *a, const char *p) {
  if (p) {
    arr_text(a, p);
    return;
  }
  put32(&a->b, UINT32_MAX);
  a->n++;
}

static void arr_i64(arr *a, int64_t v) {
  put32(&a->b, 8);
  put32(&a->b, (uint32_t)((uint64_t)v >> 32));
  put32(&a->b, (uint32_t)v);
  a->n++;
}

/* Binds the array as the next parameter (binary); 0 or EBB_ENOMEM. */
static int arr_param(params *p, arr *a) {
  if (a->b.oom || a->b.len < 20) return EBB_ENOMEM;
  unsigned char *d = (unsigned char *)a->b.data;
  d[12] = (unsigned char)(a->n >> 24), d[13] = (unsigned char)(a->n >> 16);
  d[14] = (unsigned char)(a->n >> 8), d[15] = (unsigned char)a->n;
  p_bytes(p, a->b.data, a->b.len);
  return 0;
}

#define OID_TEXT 25
#define OID_INT8 20

typedef struct pipe_item {
  int which;        /* a prepared statement, or -1: sql */
  const char *sql;  /* without parameters (BEGIN, COMMIT) */
  params *p;
  PGresult *res;    /* out: to PQclear */
} pipe_item;

/* Sends the items in one pipeline and reads their results: one round trip.
 * 0 when each succeeded; otherwise the first failure is in err, and every
 * result is freed. A connection left in a state we cannot trust is reset by
 * the next ensure(). */
static int pipeline(pg_store *s, pipe_item *items, size_t n, ebb_error *err) {
  for (size_t i = 0; i < n; i++) items[i].res = NULL;
  if (!PQenterPipelineMode(s->conn)) return pg_error(s, NULL, err, "starting a pipeline");
  int sent = 1;
  for (size_t i = 0; i < n && sent; i++) {
    char name[16];
    snprintf(name, sizeof name, "ebb_%d", items[i].which);
    params *p = items[i].p;
    sent = items[i].which < 0
               ? PQsendQueryParams(s->conn, items[i].sql, 0, NULL, NULL, NULL, NULL, 0)
               : PQsendQueryPrepared(s->conn, name, p ? p->n : 0, p ? p->value : NULL,
                                     p ? p->length : NULL, p ? p->format : NULL, 0);
  }
  if (!sent || !PQpipelineSync(s->conn)) {
    s->ready = 0;
    PQexitPipelineMode(s->conn);
    return pg_error(s, NULL, err, "sending a pipeline");
  }
  int rc = 0;
  for (size_t i = 0; i < n; i++) {
    PGresult *res = PQgetResult(s->conn);
    if (res == NULL) { /* the connection went away */
      if (rc == 0) rc = pg_error(s, NULL, err, "reading a pipeline's results");
      s->ready = 0;
      break;
    }
    ExecStatusType st = PQresultStatus(res);
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) {
      items[i].res = res;
    } else if (st == PGRES_PIPELINE_ABORTED) {
      PQclear(res);
      if (rc == 0) rc = ebb_error_set(err, EBB_ESTORE, "a pipeline was aborted");
    } else if (rc == 0) {
      rc = pg_error(s, res, err, "running a pipeline");
    } else {
      PQclear(res);
    }
    PGresult *end = PQgetResult(s->conn); /* NULL: the end of this query's results */
    if (end) {
      PQclear(end);
      s->ready = 0;
    }
  }
  if (s->ready) {
    PGresult *sync = PQgetResult(s->conn);
    if (sync == NULL || PQresultStatus(sync) != PGRES_PIPELINE_SYNC) s->ready = 0;
    if (sync) PQclear(sync);
  }
  if (!PQexitPipelineMode(s->conn)) s->ready = 0;
  if (rc == 0 && !s->ready) rc = pg_error(s, NULL, err, "reading a pipeline's results");
  if (rc)
    for (size_t i = 0; i < n; i++) {
      if (items[i].res) PQclear(items[i].res);
      items[i].res = NULL;
    }
  return rc;
}

/* A pipeline that writes nothing (reads, or a batch's BEGIN, lock and
 * reads): on a connection gone since the last call (a server restart)
 * nothing was done, so it reconnects and sends it once more, as run_alone
 * does for one statement. */
static int pipeline_alone(pg_store *s, pipe_item *items, size_t n, ebb_error *err) {
  if (ensure(s, err)) return err->code;
  if (pipeline(s, items, n, err) == 0 || !lost(s)) return err->code;
  ebb_error_clear(err);
  if (ensure(s, err)) return err->code;
  return pipeline(s, items, n, err);
}

/* Where an event id is stored, or where this batch writes it. */
typedef struct place {
  const char *stream; /* in a stored row or a request: both outlive the batch */
  int64_t version, position;
} place;

typedef struct command_row {
  const char *stream, *type;
  int64_t version, first_position, position;
  const char *rejection; /* NULL: accepted */
} command_row;

/* An append transaction's view of the store and its writes (see above). */
struct pg_batch {
  ebb_strmap *streams;       /* stream -> ebb__stream_state: every stream the batch names */
  ebb__stream_state *states;
  ebb_strmap *ids;           /* event id -> place: stored, or written by the batch */
  place *places;
  size_t n_places, cap_places;
  ebb_strmap *commands;      /* command id -> command_row: likewise */
  command_row *command_rows;
  size_t n_commands, cap_commands;
  PGresult *stored_ids, *stored_commands; /* the rows places and command_rows point into */
  arr ev[10], cm[8];         /* the rows to insert, column by column */
  int64_t start;             /* the head the batch was read at */
  int unlocked;              /* read by begin_unlocked: commit places the rows */
  int oom;                   /* tx_write ran out of memory: commit fails */
};

static const uint32_t ev_oid[10] = {OID_INT8, OID_TEXT, OID_INT8, OID_TEXT, OID_TEXT,
                                    OID_INT8, OID_TEXT, OID_TEXT, OID_TEXT, OID_TEXT};
static const uint32_t cm_oid[8] = {OID_TEXT, OID_TEXT, OID_TEXT, OID_INT8,
                                   OID_INT8, OID_INT8, OID_TEXT, OID_TEXT};

static void batch_free(pg_batch *b) {
  if (b == NULL) return;
  ebb_strmap_free(b->streams);
  ebb_strmap_free(b->ids);
  ebb_strmap_free(b->commands);
  free(b->states);
  free(b->places);
  free(b->command_rows);
  PQclear(b->stored_ids);
  PQclear(b->stored_commands);
  for (int i = 0; i < 10; i++) ebb_buf_free(&b->ev[i].b);
  for (int i = 0; i < 8; i++) ebb_buf_free(&b->cm[i].b);
  free(b);
}

static place *add_place(pg_batch *b, const char *id, const char *stream, int64_t version,
                        int64_t position) {
  if (b->n_places == b->cap_places) return NULL; /* sized in tx_begin: never */
  place *p = &b->places[b->n_places];
  *p = (place){stream, version, position};
  if (ebb_strmap_put(b->ids, id, p)) return NULL;
  b->n_places++;
  return p;
}

static command_row *add_command(pg_batch *b, const char *id, const command_row *row) {
  if (b->n_commands == b->cap_commands) return NULL;
  command_row *c = &b->command_rows[b->n_commands];
  *c = *row;
  if (ebb_strmap_put(b->commands, id, c)) return NULL;
  b->n_commands++;
  return c;
}

/* Fills b from the first pipeline's results. */
static int batch_read(pg_batch *b, PGresult *versions, size_t n_streams, ebb_error *err) {
  if (PQntuples(versions) != (int)n_streams)
    return ebb_error_set(err, EBB_ESTORE, "reading the streams' versions: %d rows for %zu streams",
                         PQntuples(versions), n_streams);
  for (int row = 0; row < PQntuples(versions); row++) {
    ebb__stream_state *st = &b->states[row];
    if (!PQgetisnull(versions, row, 1)) {
      st->version = get_i64(versions, row, 1);
      st->deleted = strcmp(PQgetvalue(versions, row, 2), EBB_TOMBSTONE) == 0;
      st->position = get_i64(versions, row, 3);
    }
    if (ebb_strmap_put(b->streams, PQgetvalue(versions, row, 0), st)) goto oom;
  }
  PGresult *ids = b->stored_ids;
  for (int row = 0; ids && row < PQntuples(ids); row++)
    if (!add_place(b, PQgetvalue(ids, row, 0), PQgetvalue(ids, row, 1), get_i64(ids, row, 2),
                   get_i64(ids, row, 3)))
      goto oom;
  PGresult *cmds = b->stored_commands;
  for (int row = 0; cmds && row < PQntuples(cmds); row++) {
    command_row c = {PQgetvalue(cmds, row, 1), PQgetvalue(cmds, row, 2), get_i64(cmds, row, 3),
                     get_i64(cmds, row, 4), get_i64(cmds, row, 5),
                     PQgetisnull(cmds, row, 6) ? NULL : PQgetvalue(cmds, row, 6)};
    if (!add_command(b, PQgetvalue(cmds, row, 0), &c)) goto oom;
  }
  return 0;
oom:
  return ebb_error_set(err, EBB_ENOMEM, "out of memory appending");
}

/* BEGIN, the lock, and what deciding the batch needs: one round trip.
 * unlocked: no BEGIN and no lock, the head read last (see begin_unlocked):
 * each statement sees at least what the ones before it saw, and positions
 * are given in commit order, so every stored position the batch reads is at
 * or below that head, and every position it gives is above it. */
static int read_batch(pg_store *s, ebb_append *reqs, size_t n, int unlocked, int64_t *head,
                      ebb_error *err) {
  batch_free(s->batch);
  pg_batch *b = s->batch = calloc(1, sizeof *b);
  if (b == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory appending");
  for (int i = 0; i < 10; i++) arr_init(&b->ev[i], ev_oid[i]);
  for (int i = 0; i < 8; i++) arr_init(&b->cm[i], cm_oid[i]);
  b->streams = ebb_strmap_new();
  b->ids = ebb_strmap_new();
  b->commands = ebb_strmap_new();
  ebb_strmap *named = ebb_strmap_new(); /* the streams put in the array */
  arr streams, idv, cmdv;
  arr_init(&streams, OID_TEXT);
  arr_init(&idv, OID_TEXT);
  arr_init(&cmdv, OID_TEXT);
  int rc = 0;
  size_t n_streams = 0;
  static int one = 1; /* a non-NULL marker value */
  if (b->streams == NULL || b->ids == NULL || b->commands == NULL || named == NULL) goto oom;
  for (size_t i = 0; i < n; i++) {
    ebb_append *r = &reqs[i];
    if (r->err.code) continue;
    if (ebb_strmap_get(named, r->stream) == NULL) {
      if (ebb_strmap_put(named, r->stream, &one)) goto oom;
      arr_text(&streams, r->stream);
      n_streams++;
    }
    for (size_t e = 0; e < r->n; e++) arr_text(&idv, r->events[e].id);
    if (r->command_id) arr_text(&cmdv, r->command_id);
  }
  /* Every id is stored at most once and written by the batch at most once. */
  b->cap_places = 2 * (size_t)idv.n;
  b->cap_commands = 2 * (size_t)cmdv.n;
  b->states = calloc(n_streams ? n_streams : 1, sizeof *b->states);
  b->places = malloc((b->cap_places ? b->cap_places : 1) * sizeof *b->places);
  b->command_rows = malloc((b->cap_commands ? b->cap_commands : 1) * sizeof *b->command_rows);
  if (b->states == NULL || b->places == NULL || b->command_rows == NULL) goto oom;
  params pv = {0}, pi = {0}, pc = {0};
  if (arr_param(&pv, &streams) || arr_param(&pi, &idv) || arr_param(&pc, &cmdv)) goto oom;
  pipe_item items[6];
  size_t k = 0, at_lock = 0, at_head, at_versions, at_ids = 0, at_commands = 0;
  if (!unlocked) {
    items[k++] = (pipe_item){.which = -1, .sql = "BEGIN"};
    at_lock = k, items[k++] = (pipe_item){.which = S_LOCK_HEAD};
    at_head = k, items[k++] = (pipe_item){.which = S_HEAD};
  }
  at_versions = k, items[k++] = (pipe_item){.which = S_VERSIONS, .p = &pv};
  if (idv.n) at_ids = k, items[k++] = (pipe_item){.which = S_FIND_IDS, .p = &pi};
  if (cmdv.n) at_commands = k, items[k++] = (pipe_item){.which = S_FIND_COMMANDS, .p = &pc};
  if (unlocked) at_head = k, items[k++] = (pipe_item){.which = S_HEAD};
  b->unlocked = unlocked;
  if (pipeline_alone(s, items, k, err)) goto done;
  *head = b->start = get_i64(items[at_head].res, 0, 0);
  int locked = !at_lock || PQntuples(items[at_lock].res) == 1;
  if (at_ids) b->stored_ids = items[at_ids].res, items[at_ids].res = NULL;
  if (at_commands) b->stored_commands = items[at_commands].res, items[at_commands].res = NULL;
  rc = batch_read(b, items[at_versions].res, n_streams, err);
  for (size_t i = 0; i < k; i++) PQclear(items[i].res);
  if (rc == 0 && !locked)
    rc = ebb_error_set(err, EBB_ESTORE, "the position lock's row (ebb_head) is missing");
  goto done;
oom:
  rc = ebb_error_set(err, EBB_ENOMEM, "out of memory appending");
done:
  if (rc == 0 && err->code) rc = err->code;
  ebb_strmap_free(named);
  ebb_buf_free(&streams.b);
  ebb_buf_free(&idv.b);
  ebb_buf_free(&cmdv.b);
  return rc;
}

static int tx_begin(ebb_store *base, ebb_append *reqs, size_t n, int64_t *head, ebb_error *err) {
  return read_batch((pg_store *)base, reqs, n, 0, head, err);
}

static int tx_begin_unlocked(ebb_store *base, ebb_append *reqs, size_t n, int64_t *head,
                             ebb_error *err) {
  return read_batch((pg_store *)base, reqs, n, 1, head, err);
}

static int tx_stream(ebb_store *base, const char *stream, int with_position,
                     ebb__stream_state *out, ebb_error *err) {
  const ebb__stream_state *st = ebb_strmap_get(((pg_store *)base)->batch->streams, stream);
  if (st == NULL) return ebb_error_set(err, EBB_ESTORE, "stream %s was not read", stream);
  *out = *st;
  return 0;
}

static int tx_command(ebb_store *base, const char *command_id, ebb_command_record *out,
                      ebb_error *err) {
  const command_row *c = ebb_strmap_get(((pg_store *)base)->batch->commands, command_id);
  if (c == NULL) return 0;
  snprintf(out->stream, sizeof out->stream, "%s", c->stream);
  snprintf(out->type, sizeof out->type, "%s", c->type);
  out->version = c->version;
  out->first_position = c->first_position;
  out->position = c->position;
  out->rejection = c->rejection ? strdup(c->rejection) : NULL;
  if (c->rejection && out->rejection == NULL)
    return ebb_error_set(err, EBB_ENOMEM, "out of memory appending");
  return 1;
}

static int tx_event(ebb_store *base, const char *id, ebb__event_place *out, ebb_error *err) {
  const place *p = ebb_strmap_get(((pg_store *)base)->batch->ids, id);
  if (p == NULL) return 0;
  snprintf(out->stream, sizeof out->stream, "%s", p->stream);
  out->version = p->version;
  out->position = p->position;
  return 1;
}

/* Adds the request's rows to the batch's arrays, and to its view. */
static int tx_write(ebb_store *base, const ebb_append *r, const char *now, ebb_error *err) {
  pg_batch *b = ((pg_store *)base)->batch;
  for (size_t e = 0; e < r->n; e++)
    if (ebb_strmap_get(b->ids, r->events[e].id))
      return ebb_error_set(err, EBB_ECONFLICT, "event id %s is already stored", r->events[e].id),
             EBB__CLASH;
  size_t category_len = ebb_stream_category_len(r->stream);
  for (size_t e = 0; e < r->n; e++) {
    const ebb_event_in *x = &r->events[e];
    int64_t version = r->result.first_version + (int64_t)e;
    int64_t position = r->result.first_position + (int64_t)e;
    arr_i64(&b->ev[0], position);
    arr_text(&b->ev[1], r->stream);
    arr_i64(&b->ev[2], version);
    arr_text(&b->ev[3], x->id);
    arr_text(&b->ev[4], x->type);
    arr_i64(&b->ev[5], x->schema);
    arr_bytes(&b->ev[6], x->data, x->data_len);
    arr_bytes(&b->ev[7], x->metadata, x->metadata_len);
    arr_text(&b->ev[8], x->recorded_at ? x->recorded_at : now);
    arr_bytes(&b->ev[9], r->stream, category_len);
    if (!add_place(b, x->id, r->stream, version, position)) b->oom = 1;
  }
  ebb__stream_state *st = ebb_strmap_get(b->streams, r->stream);
  if (st && r->n) {
    st->version = r->result.version;
    st->position = r->result.position;
    st->deleted = strcmp(r->events[r->n - 1].type, EBB_TOMBSTONE) == 0;
  }
  if (r->command_id) {
    command_row c = {r->stream, r->command_type ? r->command_type : "", r->result.version,
                     r->result.first_position, r->result.position, r->rejection};
    arr_text(&b->cm[0], r->command_id);
    arr_text(&b->cm[1], c.stream);
    arr_text(&b->cm[2], c.type);
    arr_i64(&b->cm[3], c.version);
    arr_i64(&b->cm[4], c.first_position);
    arr_i64(&b->cm[5], c.position);
    arr_text(&b->cm[6], now);
    arr_text_or_null(&b->cm[7], c.rejection);
    if (!add_command(b, r->command_id, &c)) b->oom = 1;
  }
  return 0;
}

/* Writes the batch's rows and COMMIT: one round trip. After read_batch
 * unlocked, the lock is taken there, first: held from then to the
 * commit only, while the next batch, here or on another daemon, is read and
 * decided. Rows then move past what others wrote meanwhile; a unique key
 * they clash on (a stream's version, an event id, a command id) means the
 * batch read something behind: EBB__STALE, and the transaction is undone.
 * A batch read under the lock goes through the same statements: nobody
 * moved the head, so they move its rows by 0. */
static int tx_commit(ebb_store *base, int64_t head, int64_t *moved, ebb_error *err) {
  pg_store *s = (pg_store *)base;
  pg_batch *b = s->batch;
  params pe = {0}, pc = {0};
  int rc = b->oom;
  for (int i = 0; i < 10 && rc == 0; i++) rc = arr_param(&pe, &b->ev[i]);
  for (int i = 0; i < 8 && rc == 0; i++) rc = arr_param(&pc, &b->cm[i]);
  if (rc) return ebb_error_set(err, EBB_ENOMEM, "out of memory appending");
  p_int(&pe, b->start);
  p_int(&pc, b->start);
  p_int(&pc, head);
  *moved = 0;
  pipe_item items[6];
  size_t k = 0, at_tail = 0;
  if (b->unlocked) {
    items[k++] = (pipe_item){.which = -1, .sql = "BEGIN"};
    items[k++] = (pipe_item){.which = S_LOCK_HEAD};
  }
  if (b->ev[0].n) items[k++] = (pipe_item){.which = S_INSERT_MANY_MOVED, .p = &pe};
  if (b->cm[0].n) items[k++] = (pipe_item){.which = S_INSERT_COMMANDS_MOVED, .p = &pc};
  /* Only new events move anything, and wake the watch links. */
  if (b->ev[0].n) at_tail = k, items[k++] = (pipe_item){.which = S_TAIL};
  items[k++] = (pipe_item){.which = -1, .sql = "COMMIT"};
  /* No answer to COMMIT: it may or may not have happened. It is reported
   * failed; a re-send is idempotent by event id and command id. */
  if ((rc = pipeline(s, items, k, err)) == 0) {
    /* COMMIT of a transaction that failed answers ROLLBACK. */
    if (strcmp(PQcmdStatus(items[k - 1].res), "COMMIT") != 0)
      rc = ebb_error_set(err, EBB_ESTORE, "committing: the transaction was rolled back");
    else if (at_tail)
      *moved = get_i64(items[at_tail].res, 0, 0) - head;
    for (size_t i = 0; i < k; i++) PQclear(items[i].res);
  } else if (b->unlocked && strcmp(s->state, "23505") == 0) { /* unique_violation */
    ebb_error_clear(err);
    rc = EBB__STALE;
  }
  if (rc == 0) {
    batch_free(b);
    s->batch = NULL;
  }
  return rc;
}

static void tx_rollback(ebb_store *base) {
  pg_store *s = (pg_store *)base;
  batch_free(s->batch);
  s->batch = NULL;
  if (!lost(s) && PQtransactionStatus(s->conn) != PQTRANS_IDLE) PQclear(PQexec(s->conn, "ROLLBACK"));
}

/* A failed write leaves nothing behind (tx_write checks before it adds), and
 * no statement runs between the two round trips: no savepoints. */
static const ebb__append_ops pg_append_ops = {
    .begin = tx_begin,
    .begin_unlocked = tx_begin_unlocked,
    .stream = tx_stream,
    .command = tx_command,
    .event = tx_event,
    .write = tx_write,
    .commit = tx_commit,
    .rollback = tx_rollback,
};

/* ---------------------------------------------------------------- reads */

/* Pushes row i's EVENT_COLUMNS, from column c on, onto out. */
static int push_event(const PGresult *res, int i, int c, ebb_event_list *out, ebb_error *err) {
  ebb_event ev = {
      .position = get_i64(res, i, c),
      .stream = PQgetvalue(res, i, c + 1),
      .version = get_i64(res, i, c + 2),
      .id = PQgetvalue(res, i, c + 3),
      .type = PQgetvalue(res, i, c + 4),
      .schema = get_i64(res, i, c + 5),
      .data = PQgetvalue(res, i, c + 6),
      .data_len = (size_t)PQgetlength(res, i, c + 6),
      .metadata = PQgetvalue(res, i, c + 7),
      .metadata_len = (size_t)PQgetlength(res, i, c + 7),
      .recorded_at = PQgetvalue(res, i, c + 8),
  };
  if (ebb_event_list_push(out, &ev)) return ebb_error_set(err, EBB_ENOMEM, "out of memory reading events");
  return 0;
}

static int collect(pg_store *s, int which, const params *p, ebb_event_list *out, ebb_error *err) {
  PGresult *res = run_alone(s, which, p, 0, err, "reading events");
  if (res == NULL) return err->code;
  int rows = PQntuples(res), rc = 0;
  for (int i = 0; i < rows && rc == 0; i++) rc = push_event(res, i, 0, out, err);
  PQclear(res);
  return rc;
}

static int pg_read_stream(ebb_store *base, const char *stream, int64_t from, int64_t limit,
                          int backward, ebb_event_list *out, ebb_error *err) {
  params p = {0};
  p_text(&p, stream);
  p_int(&p, backward && from == 0 ? INT64_MAX : from);
  p_int(&p, limit);
  return collect((pg_store *)base, backward ? S_READ_BACK : S_READ_FWD, &p, out, err);
}

static int pg_read_all(ebb_store *base, const ebb_read_all *q, ebb_event_list *out,
                       ebb_error *err) {
  int which = q->category ? (q->type ? S_READ_ALL_CAT_TYPE : S_READ_ALL_CAT)
                          : (q->type ? S_READ_ALL_TYPE : S_READ_ALL);
  params p = {0};
  p_int(&p, q->after);
  p_int(&p, q->limit);
  if (q->category) p_text(&p, q->category);
  if (q->type) p_text(&p, q->type);
  return collect((pg_store *)base, which, &p, out, err);
}

static int pg_read_linked(ebb_store *base, int link, const char *value, int64_t after,
                          int64_t limit, ebb_event_list *out, ebb_error *err) {
  params p = {0};
  p_text(&p, value);
  p_int(&p, after);
  p_int(&p, limit);
  return collect((pg_store *)base,
                 link == EBB_LINK_CORRELATION ? S_READ_CORRELATION : S_READ_CAUSATION, &p, out,
                 err);
}

static int pg_list_streams(ebb_store *base, const ebb_list_streams *q, ebb_stream_fn fn,
                           void *ud, ebb_error *err) {
  pg_store *s = (pg_store *)base;
  params p = {0};
  p_text(&p, q->after ? q->after : "");
  p_text(&p, q->prefix ? q->prefix : "");
  p_text(&p, q->category);
  p_int(&p, q->limit);
  PGresult *res = run_alone(s, S_LIST_STREAMS, &p, 0, err, "listing streams");
  if (res == NULL) return err->code;
  int rows = PQntuples(res);
  for (int i = 0; i < rows; i++) {
    ebb_stream_info info = {
        .stream = PQgetvalue(res, i, 0),
        .version = get_i64(res, i, 1),
        .first_position = get_i64(res, i, 2),
        .last_position = get_i64(res, i, 3),
        .recorded_at = PQgetvalue(res, i, 4),
        .deleted = strcmp(PQgetvalue(res, i, 5), EBB_TOMBSTONE) == 0,
    };
    if (fn(ud, &info) != 0) break;
  }
  PQclear(res);
  return 0;
}

static int pg_read_range(ebb_store *base, int64_t first, int64_t last, ebb_event_list *out,
                         ebb_error *err) {
  params p = {0};
  p_int(&p, first);
  p_int(&p, last);
  return collect((pg_store *)base, S_READ_RANGE, &p, out, err);
}

static int pg_stream_version(ebb_store *base, const char *stream, int64_t *version, int *deleted,
                             ebb_error *err) {
  pg_store *s = (pg_store *)base;
  params p = {0};
  p_text(&p, stream);
  PGresult *res = run_alone(s, S_VERSION, &p, 0, err, "reading a stream's version");
  if (res == NULL) return err->code;
  int found = PQntuples(res) > 0;
  *version = found ? get_i64(res, 0, 0) : 0;
  *deleted = found && strcmp(PQgetvalue(res, 0, 1), EBB_TOMBSTONE) == 0;
  PQclear(res);
  return 0;
}

static int pg_head(ebb_store *base, int64_t *position, ebb_error *err) {
  pg_store *s = (pg_store *)base;
  PGresult *res = run_alone(s, S_HEAD, NULL, 0, err, "reading the head position");
  if (res == NULL) return err->code;
  *position = PQntuples(res) > 0 ? get_i64(res, 0, 0) : 0;
  PQclear(res);
  return 0;
}

static int pg_find_command(ebb_store *base, const char *command_id, ebb_command_record *out,
                           ebb_error *err) {
  pg_store *s = (pg_store *)base;
  params p = {0};
  p_text(&p, command_id);
  PGresult *res = run_alone(s, S_FIND_COMMAND, &p, 0, err, "looking up a command id");
  if (res == NULL) return err->code;
  int found = PQntuples(res) > 0;
  if (found) {
    snprintf(out->stream, sizeof out->stream, "%s", PQgetvalue(res, 0, 0));
    snprintf(out->type, sizeof out->type, "%s", PQgetvalue(res, 0, 1));
    out->version = get_i64(res, 0, 2);
    out->first_position = get_i64(res, 0, 3);
    out->position = get_i64(res, 0, 4);
    out->rejection = PQgetisnull(res, 0, 5) ? NULL : strdup(PQgetvalue(res, 0, 5));
    if (!PQgetisnull(res, 0, 5) && out->rejection == NULL)
      found = ebb_error_set(err, EBB_ENOMEM, "out of memory looking up a command id");
  }
  PQclear(res);
  return found;
}

/* Every item's first events and command id in one round trip, instead of
 * two per command: on a busy daemon, the commands on streams it has not
 * cached that arrive while one such read is out go in the next. */
static int pg_prefetch(ebb_store *base, ebb_prefetch *items, size_t n, int64_t limit,
                       ebb_error *err) {
  pg_store *s = (pg_store *)base;
  arr streams, ids;
  arr_init(&streams, OID_TEXT);
  arr_init(&ids, OID_TEXT);
  size_t *at = malloc((n ? n : 1) * sizeof *at); /* the array's index -> the item's */
  size_t n_streams = 0;
  int rc = 0;
  if (at == NULL) goto oom;
  for (size_t i = 0; i < n; i++) {
    if (items[i].err.code) continue;
    arr_text(&streams, items[i].stream);
    at[n_streams++] = i;
    if (items[i].command_id) arr_text(&ids, items[i].command_id);
  }
  if (n_streams == 0) goto done;
  params ps = {0}, pi = {0};
  if (arr_param(&ps, &streams) || arr_param(&pi, &ids)) goto oom;
  p_int(&ps, limit);
  pipe_item pipe[2] = {{.which = S_READ_FIRST_MANY, .p = &ps}, {.which = S_FIND_COMMANDS, .p = &pi}};
  size_t k = ids.n ? 2 : 1;
  if (pipeline_alone(s, pipe, k, err)) goto done;
  PGresult *ev = pipe[0].res, *cm = k > 1 ? pipe[1].res : NULL;
  for (int r = 0; r < PQntuples(ev) && rc == 0; r++) {
    int64_t i = get_i64(ev, r, 0);
    if (i < 1 || (size_t)i > n_streams) {
      rc = ebb_error_set(err, EBB_ESTORE, "prefetching streams: the server answered for stream %lld of the %zu asked",
                         (long long)i, n_streams);
      break;
    }
    rc = push_event(ev, r, 1, items[at[i - 1]].events, err);
  }
  for (int r = 0; cm && r < PQntuples(cm); r++)
    for (size_t j = 0; j < n_streams; j++) {
      ebb_prefetch *it = &items[at[j]];
      if (it->command_id && strcmp(it->command_id, PQgetvalue(cm, r, 0)) == 0) it->command_known = 1;
    }
  for (size_t j = 0; j < k; j++) PQclear(pipe[j].res);
  goto done;
oom:
  rc = ebb_error_set(err, EBB_ENOMEM, "out of memory reading streams");
done:
  if (rc == 0 && err->code) rc = err->code;
  free(at);
  ebb_buf_free(&streams.b);
  ebb_buf_free(&ids.b);
  return rc;
}

static int pg_schema_version(ebb_store *base, int *version, ebb_error *err) {
  pg_store *s = (pg_store *)base;
  PGresult *res = run_alone(s, S_SCHEMA_VERSION, NULL, 0, err, "reading the schema version");
  if (res == NULL) return err->code;
  *version = (int)get_i64(res, 0, 0);
  PQclear(res);
  return 0;
}

/* ---------------------------------------------------------------- snapshots */

static int pg_snapshot_save(ebb_store *base, const ebb_snapshot *snaps, size_t n, ebb_error *err) {
  pg_store *s = (pg_store *)base;
  char now[EBB_TIME_LEN + 1];
  ebb_clock_format(ebb_clock_now_ms(), now);
  if (begin(s, err)) return err->code;
  for (size_t i = 0; i < n; i++) {
    params p = {0};
    p_text(&p, snaps[i].stream);
    p_text(&p, snaps[i].fingerprint);
    p_int(&p, snaps[i].version);
    p_int(&p, snaps[i].position);
    p_text(&p, snaps[i].recorded_at);
    p_bytes(&p, snaps[i].state ? snaps[i].state : "", snaps[i].state_len);
    p_text(&p, now);
    PGresult *res = run(s, S_SNAP_SAVE, &p, 0, err, "saving a snapshot");
    if (res == NULL) {
      if (!lost(s)) PQclear(PQexec(s->conn, "ROLLBACK"));
      return err->code;
    }
    PQclear(res);
  }
  return exec(s, "COMMIT", err, "committing snapshots");
}

static int pg_snapshot_load(ebb_store *base, const char *stream, const char *fingerprint,
                            int64_t max_version, const char *max_time, int64_t *version,
                            int64_t *position, ebb_buf *state_buf, ebb_error *err) {
  pg_store *s = (pg_store *)base;
  params p = {0};
  p_text(&p, stream);
  p_text(&p, fingerprint);
  p_int(&p, max_version < 0 ? INT64_MAX : max_version);
  p_text(&p, max_time ? max_time : "9999");
  /* Binary results: the state comes back as its bytes, the numbers as int8. */
  PGresult *res = run_alone(s, S_SNAP_LOAD, &p, 1, err, "loading a snapshot");
  if (res == NULL) return err->code;
  int found = 0;
  if (PQntuples(res) > 0) {
    *version = get_be64(res, 0, 0);
    *position = get_be64(res, 0, 1);
    found = ebb_buf_append(state_buf, PQgetvalue(res, 0, 2), (size_t)PQgetlength(res, 0, 2)) == 0
                ? 1
                : EBB_ENOMEM;
  }
  PQclear(res);
  if (found == EBB_ENOMEM) return ebb_error_set(err, EBB_ENOMEM, "out of memory loading a snapshot");
  return found;
}

static int pg_snapshot_list(ebb_store *base, ebb_snapshot_fn fn, void *ud, ebb_error *err) {
  pg_store *s = (pg_store *)base;
  PGresult *res = run_alone(s, S_SNAP_LIST, NULL, 0, err, "listing snapshots");
  if (res == NULL) return err->code;
  int rows = PQntuples(res);
  for (int i = 0; i < rows; i++) {
    ebb_snapshot snap = {
        .stream = PQgetvalue(res, i, 0),
        .version = get_i64(res, i, 1),
        .position = get_i64(res, i, 2),
        .recorded_at = PQgetvalue(res, i, 3),
        .fingerprint = PQgetvalue(res, i, 4),
        .state_len = (size_t)get_i64(res, i, 5),
        .created_at = PQgetvalue(res, i, 6),
    };
    if (fn(ud, &snap) != 0) break;
  }
  PQclear(res);
  return 0;
}

static int pg_snapshot_delete(ebb_store *base, const char *stream, const char *fingerprint,
                              int64_t version, int64_t *deleted, ebb_error *err) {
  pg_store *s = (pg_store *)base;
  params p = {0};
  p_text(&p, stream);
  p_text(&p, fingerprint);
  p_int(&p, version);
  PGresult *res = run_alone(s, S_SNAP_DELETE, &p, 0, err, "deleting snapshots");
  if (res == NULL) return err->code;
  *deleted = strtoll(PQcmdTuples(res), NULL, 10);
  PQclear(res);
  return 0;
}

static const ebb_store_vtable pg_vtable = {
    .name = "postgres",
    .append = &pg_append_ops,
    .read_stream = pg_read_stream,
    .read_all = pg_read_all,
    .read_range = pg_read_range,
    .stream_version = pg_stream_version,
    .head = pg_head,
    .find_command = pg_find_command,
    .prefetch = pg_prefetch,
    .snapshot_save = pg_snapshot_save,
    .snapshot_load = pg_snapshot_load,
    .snapshot_list = pg_snapshot_list,
    .snapshot_delete = pg_snapshot_delete,
    .schema_version = pg_schema_version,
    .list_streams = pg_list_streams,
    .read_linked = pg_read_linked,
    .close = pg_close,
};
