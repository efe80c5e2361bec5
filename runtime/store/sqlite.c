/*
 * store_sqlite.c: the event store on SQLite (one file, WAL). Implements
 * ebb_store_vtable (store.h).
 *
 * Schema: `events` holds every event once, its INTEGER PRIMARY KEY being the
 * global position. Events are never deleted or updated, and an append numbers
 * its events from the last position read under the write lock (BEGIN
 * IMMEDIATE: one writer at a time), so positions are gap-free and ordered by
 * commit. UNIQUE(stream, version) and UNIQUE(id) are enforced by the schema as
 * well. `commands` remembers handled command ids so a retried command is
 * answered, not run again. What an append decides is append.c's.
 *
 * Every statement is prepared once at open and reset after each use.
 */
#include "store_backend.h"

#include <errno.h>
#include <limits.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "clock.h"

/* 1: events, commands. 2: snapshots. 3: the correlation and causation
 * indexes (GET /events?correlation_id=). 4: commands.rejection (a refused
 * command's id answers its refusal). Every statement of the schema is IF NOT
 * EXISTS, so running it again upgrades an older store; what it cannot say
 * that way (a new column) is in migrations. */
#define SCHEMA_VERSION 4

const char *const ebb__sqlite_schema_sql =
    "CREATE TABLE IF NOT EXISTS events ("
    "  position INTEGER PRIMARY KEY,"
    "  stream TEXT NOT NULL,"
    "  version INTEGER NOT NULL CHECK (version >= 1),"
    "  id TEXT NOT NULL UNIQUE,"
    "  type TEXT NOT NULL,"
    "  schema INTEGER NOT NULL DEFAULT 1 CHECK (schema >= 1),"
    "  data TEXT NOT NULL,"
    "  metadata TEXT NOT NULL,"
    "  recorded_at TEXT NOT NULL,"
    "  category TEXT NOT NULL,"
    "  UNIQUE (stream, version));"
    "CREATE INDEX IF NOT EXISTS events_by_category ON events (category, position);"
    "CREATE INDEX IF NOT EXISTS events_by_type ON events (type, position);"
    "CREATE INDEX IF NOT EXISTS events_by_correlation ON events "
    "  (json_extract(metadata, '$.correlation_id'), position);"
    "CREATE INDEX IF NOT EXISTS events_by_causation ON events "
    "  (json_extract(metadata, '$.causation_id'), position);"
    "CREATE TABLE IF NOT EXISTS commands ("
    "  command_id TEXT PRIMARY KEY,"
    "  stream TEXT NOT NULL,"
    "  type TEXT NOT NULL,"
    "  version INTEGER NOT NULL,"
    "  first_position INTEGER NOT NULL,"
    "  last_position INTEGER NOT NULL,"
    "  recorded_at TEXT NOT NULL,"
    "  rejection TEXT) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS snapshots ("
    "  stream TEXT NOT NULL,"
    "  fingerprint TEXT NOT NULL,"
    "  version INTEGER NOT NULL,"
    "  position INTEGER NOT NULL,"
    "  recorded_at TEXT NOT NULL,"
    "  state BLOB NOT NULL,"
    "  created_at TEXT NOT NULL,"
    "  PRIMARY KEY (stream, fingerprint, version)) WITHOUT ROWID;";

#define EVENT_COLUMNS "position, stream, version, id, type, schema, data, metadata, recorded_at"

enum {
  S_BEGIN,
  S_COMMIT,
  S_ROLLBACK,
  S_SAVEPOINT,
  S_RELEASE,
  S_ROLLBACK_TO,
  S_VERSION,
  S_LAST_EVENT,
  S_INSERT,
  S_FIND_ID,
  S_FIND_COMMAND,
  S_INSERT_COMMAND,
  S_INSERT_REFUSAL,
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
  S_LIST_STREAMS,
  S_READ_CORRELATION,
  S_READ_CAUSATION,
  S_COUNT
};

static const char *const statements[S_COUNT] = {
    [S_BEGIN] = "BEGIN IMMEDIATE",
    [S_COMMIT] = "COMMIT",
    [S_ROLLBACK] = "ROLLBACK",
    [S_SAVEPOINT] = "SAVEPOINT request",
    [S_RELEASE] = "RELEASE request",
    [S_ROLLBACK_TO] = "ROLLBACK TO request",
    [S_VERSION] = "SELECT version, type FROM events WHERE stream = ?1 ORDER BY version DESC LIMIT 1",
    [S_LAST_EVENT] = "SELECT version, type, position FROM events WHERE stream = ?1 "
                     "ORDER BY version DESC LIMIT 1",
    /* The position is SQLite's rowid choice, the last one + 1: see tx_write. */
    [S_INSERT] = "INSERT INTO events (stream, version, id, type, schema, data, metadata, "
                 "recorded_at, category) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    [S_FIND_ID] = "SELECT stream, version, position FROM events WHERE id = ?1",
    [S_FIND_COMMAND] = "SELECT stream, type, version, first_position, last_position, rejection "
                       "FROM commands WHERE command_id = ?1",
    [S_INSERT_COMMAND] = "INSERT INTO commands (command_id, stream, type, version, "
                         "first_position, last_position, recorded_at) "
                         "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    /* Its own statement, so that an accepted command costs what it did. */
    [S_INSERT_REFUSAL] = "INSERT INTO commands (command_id, stream, type, version, "
                         "first_position, last_position, recorded_at, rejection) "
                         "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    [S_READ_FWD] = "SELECT " EVENT_COLUMNS " FROM events WHERE stream = ?1 AND version >= ?2 "
                   "ORDER BY version LIMIT ?3",
    [S_READ_BACK] = "SELECT " EVENT_COLUMNS " FROM events WHERE stream = ?1 AND version <= ?2 "
                    "ORDER BY version DESC LIMIT ?3",
    [S_READ_ALL] = "SELECT " EVENT_COLUMNS " FROM events WHERE position > ?1 "
                   "ORDER BY position LIMIT ?2",
    [S_READ_ALL_CAT] = "SELECT " EVENT_COLUMNS " FROM events WHERE position > ?1 "
                       "AND category = ?3 ORDER BY position LIMIT ?2",
    [S_READ_ALL_TYPE] = "SELECT " EVENT_COLUMNS " FROM events WHERE position > ?1 "
                        "AND type = ?4 ORDER BY position LIMIT ?2",
    [S_READ_ALL_CAT_TYPE] = "SELECT " EVENT_COLUMNS " FROM events WHERE position > ?1 "
                            "AND category = ?3 AND type = ?4 ORDER BY position LIMIT ?2",
    [S_READ_RANGE] = "SELECT " EVENT_COLUMNS " FROM events WHERE position BETWEEN ?1 AND ?2 "
                     "ORDER BY position",
    [S_HEAD] = "SELECT max(position) FROM events",
    [S_SNAP_SAVE] = "INSERT OR REPLACE INTO snapshots (stream, fingerprint, version, position, "
                    "recorded_at, state, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    [S_SNAP_LOAD] = "SELECT version, position, state FROM snapshots WHERE stream = ?1 AND "
                    "fingerprint = ?2 AND version <= ?3 AND recorded_at <= ?4 "
                    "ORDER BY version DESC LIMIT 1",
    [S_SNAP_LIST] = "SELECT stream, version, position, recorded_at, fingerprint, length(state), "
                    "created_at FROM snapshots ORDER BY stream, version",
    [S_SNAP_DELETE] = "DELETE FROM snapshots WHERE (?1 IS NULL OR stream = ?1) AND "
                      "(?2 IS NULL OR fingerprint = ?2) AND (?3 < 0 OR version = ?3)",
    /* A page of streams from the (stream, version) index, then each one's
     * last event for its time and tombstone. */
    [S_LIST_STREAMS] = "SELECT p.stream, p.v, p.fp, p.lp, e.recorded_at, e.type FROM "
                       "(SELECT stream, max(version) AS v, min(position) AS fp, "
                       "max(position) AS lp FROM events WHERE stream > ?1 AND stream >= ?2 "
                       "AND (?3 IS NULL OR stream < ?3) AND (?4 IS NULL OR category = ?4) "
                       "GROUP BY stream ORDER BY stream LIMIT ?5) AS p "
                       "JOIN events AS e ON e.position = p.lp ORDER BY p.stream",
    /* The expressions are the indexes' own, word for word: SQLite uses an
     * expression index only for the same expression. */
    [S_READ_CORRELATION] = "SELECT " EVENT_COLUMNS " FROM events WHERE "
                           "json_extract(metadata, '$.correlation_id') = ?1 AND position > ?2 "
                           "ORDER BY position LIMIT ?3",
    [S_READ_CAUSATION] = "SELECT " EVENT_COLUMNS " FROM events WHERE "
                         "json_extract(metadata, '$.causation_id') = ?1 AND position > ?2 "
                         "ORDER BY position LIMIT ?3",
};

typedef struct sqlite_store {
  ebb_store base;
  sqlite3 *db;
  sqlite3_stmt *stmt[S_COUNT];
  int64_t wal_pages;  /* with manual checkpoints: the WAL's frames after the last commit */
  int64_t backfilled; /* of which the last checkpoint copied into the database */
  uint64_t sync_failures; /* the process's failed store fsyncs when this handle opened */
  /* The last position as of this handle's last commit, and the database's
   * data version then (SQLITE_FCNTL_DATA_VERSION: it changes with every
   * commit of any connection): while the version is the same, an append need
   * not read the head. */
  int head_known;
  int64_t head;
  unsigned head_version;
} sqlite_store;

static int db_error(sqlite_store *s, ebb_error *err, const char *doing) {
  int rc = sqlite3_extended_errcode(s->db);
  int code = (rc & 0xFF) == SQLITE_BUSY || (rc & 0xFF) == SQLITE_LOCKED ? EBB_EBUSY
             : (rc & 0xFF) == SQLITE_NOMEM                              ? EBB_ENOMEM
                                                                        : EBB_ESTORE;
  return ebb_error_set(err, code, "%s: %s", doing, sqlite3_errmsg(s->db));
}

/* Runs a statement that returns no rows. */
static int run(sqlite_store *s, int which, ebb_error *err, const char *doing) {
  sqlite3_stmt *st = s->stmt[which];
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  if (rc != SQLITE_DONE) return db_error(s, err, doing);
  return 0;
}

static void bind_text(sqlite3_stmt *st, int i, const char *s) {
  if (s) sqlite3_bind_text(st, i, s, -1, SQLITE_STATIC);
  else sqlite3_bind_null(st, i);
}

/* ---------------------------------------------------------------- open / close */

static int make_dirs(const char *dir, ebb_error *err) {
  char path[4096];
  size_t n = strlen(dir);
  if (n >= sizeof path) return ebb_error_set(err, EBB_EBADREQ, "data directory path is too long");
  memcpy(path, dir, n + 1);
  for (size_t i = 1; i <= n; i++) {
    if (path[i] != '/' && path[i] != '\0') continue;
    char c = path[i];
    path[i] = '\0';
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
      return ebb_error_set(err, EBB_ESTORE, "cannot create data directory %s: %s", path,
                           strerror(errno));
    path[i] = c;
  }
  struct stat st;
  if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
    return ebb_error_set(err, EBB_ESTORE, "%s is not a directory", dir);
  return 0;
}

static void sqlite_close(ebb_store *base) {
  sqlite_store *s = (sqlite_store *)base;
  for (int i = 0; i < S_COUNT; i++) sqlite3_finalize(s->stmt[i]);
  /* The last handle to close checkpoints the WAL into the database. Not
   * after an fsync failed since this one opened: the WAL may have lost
   * pages the WAL index still counts, so it is left for the next open to
   * check. (The count is the process's: a failure in another store only
   * leaves this WAL for the next open, which loses nothing.) */
  if (s->db && ebb__store_sync_failures() != s->sync_failures)
    sqlite3_db_config(s->db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, (int *)NULL);
  sqlite3_close(s->db);
  free(s);
}

static int exec(sqlite_store *s, const char *sql, ebb_error *err, const char *doing) {
  char *msg = NULL;
  if (sqlite3_exec(s->db, sql, NULL, NULL, &msg) != SQLITE_OK) {
    ebb_error_set(err, EBB_ESTORE, "%s: %s", doing, msg ? msg : "unknown error");
    sqlite3_free(msg);
    return EBB_ESTORE;
  }
  return 0;
}

static int setup_schema(sqlite_store *s, ebb_error *err) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(s->db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK)
    return db_error(s, err, "reading the schema version");
  int version = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int(st, 0) : 0;
  sqlite3_finalize(st);
  if (version > SCHEMA_VERSION)
    return ebb_error_set(err, EBB_ESTORE,
                         "the store's schema version %d is newer than this ebb knows (%d)", version,
                         SCHEMA_VERSION);
  if (version == SCHEMA_VERSION) return 0;
  /* Read again under the write lock: another process may have upgraded the
   * store meanwhile, and a column cannot be added twice. */
  if (exec(s, "BEGIN IMMEDIATE", err, "creating the schema")) return err->code;
  if (sqlite3_prepare_v2(s->db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK) {
    db_error(s, err, "reading the schema version");
    goto fail;
  }
  version = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int(st, 0) : 0;
  sqlite3_finalize(st);
  if (version >= SCHEMA_VERSION) return exec(s, "COMMIT", err, "creating the schema");
  /* commands.rejection (4), unless the table has it: made new with it, or
   * labelled older than it is. */
  int add_rejection = 0;
  if (sqlite3_prepare_v2(s->db,
                         "SELECT count(*) = 1 FROM sqlite_master WHERE name = 'commands' AND NOT "
                         "EXISTS (SELECT 1 FROM pragma_table_info('commands') WHERE name = "
                         "'rejection')",
                         -1, &st, NULL) != SQLITE_OK) {
    db_error(s, err, "reading the schema");
    goto fail;
  }
  if (sqlite3_step(st) == SQLITE_ROW) add_rejection = sqlite3_column_int(st, 0);
  sqlite3_finalize(st);
  char sql[4096];
  snprintf(sql, sizeof sql, "%s %s PRAGMA user_version = %d; COMMIT;", ebb__sqlite_schema_sql,
           add_rejection ? "ALTER TABLE commands ADD COLUMN rejection TEXT;" : "", SCHEMA_VERSION);
  if (exec(s, sql, err, "creating the schema")) goto fail;
  return 0;
fail:
  sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
  return err->code;
}

static const ebb_store_vtable sqlite_vtable;

static int on_wal(void *ud, sqlite3 *db, const char *name, int pages) {
  (void)db;
  (void)name;
  sqlite_store *s = ud;
  if (pages < s->backfilled) s->backfilled = 0; /* the WAL started over */
  s->wal_pages = pages;
  return SQLITE_OK;
}

static int64_t sqlite_wal_pages(ebb_store *base) {
  sqlite_store *s = (sqlite_store *)base;
  return s->wal_pages - s->backfilled;
}

static int sqlite_checkpoint(ebb_store *base, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  int log = 0, done = 0;
  int rc = sqlite3_wal_checkpoint_v2(s->db, NULL, SQLITE_CHECKPOINT_PASSIVE, &log, &done);
  /* Busy: another connection is checkpointing; the next call catches up. */
  if (rc != SQLITE_OK && rc != SQLITE_BUSY) return db_error(s, err, "checkpointing the WAL");
  /* Frames a reader still used stay for the next checkpoint; the WAL
   * starts over at a commit once all of it is copied. */
  if (rc == SQLITE_OK && done >= 0) s->backfilled = done;
  return 0;
}

int ebb__store_sqlite_open(ebb_store **out, const ebb_store_options *opt, ebb_error *err) {
  *out = NULL;
  if (!opt->readonly && make_dirs(opt->dir, err)) return err->code;
  char path[4200];
  snprintf(path, sizeof path, "%s/events.db", opt->dir);
  sqlite_store *s = calloc(1, sizeof *s);
  if (s == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory opening the store");
  s->base.vt = &sqlite_vtable;
  s->sync_failures = ebb__store_sync_failures();
  int flags = opt->readonly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE;
  if (sqlite3_open_v2(path, &s->db, flags | SQLITE_OPEN_NOMUTEX, ebb__sync_vfs_name()) !=
      SQLITE_OK) {
    ebb_error_set(err, EBB_ESTORE, "cannot open %s: %s", path,
                  s->db ? sqlite3_errmsg(s->db) : "out of memory");
    sqlite_close(&s->base);
    return EBB_ESTORE;
  }
  sqlite3_busy_timeout(s->db, 10000);
  /* page_size first: it only takes effect on a store not yet created (an
   * older store keeps its 4096). Every commit writes each page it touched
   * whole to the WAL, and each event touches one page of the (stream,
   * version) index at a place of its own: with 1 KB pages an event costs
   * about 3 KB written (WAL and checkpoint) instead of about 10 KB. */
  char pragmas[256];
  snprintf(pragmas, sizeof pragmas,
           "PRAGMA page_size = 1024; PRAGMA locking_mode = %s; PRAGMA journal_mode = WAL; "
           "PRAGMA synchronous = %s;",
           opt->exclusive ? "EXCLUSIVE" : "NORMAL",
           opt->durability == EBB_DURABILITY_FULL ? "FULL" : "NORMAL");
  if (exec(s, pragmas, err, "configuring the store") ||
      (!opt->readonly && setup_schema(s, err))) {
    sqlite_close(&s->base);
    return err->code;
  }
  /* Replaces SQLite's own hook, the one that checkpoints after a commit
   * once the WAL holds 1000 pages. */
  if (opt->manual_checkpoints) sqlite3_wal_hook(s->db, on_wal, s);
  for (int i = 0; i < S_COUNT; i++) {
    if (sqlite3_prepare_v3(s->db, statements[i], -1, SQLITE_PREPARE_PERSISTENT, &s->stmt[i],
                           NULL) != SQLITE_OK) {
      db_error(s, err, "preparing a statement");
      sqlite_close(&s->base);
      return err->code;
    }
  }
  *out = &s->base;
  return 0;
}

/* ---------------------------------------------------------------- append
 *
 * The operations of one append transaction (ebb__append_ops); append.c
 * decides. BEGIN IMMEDIATE takes the write lock, so the stream versions, ids
 * and commands read inside are the ones the writes will meet. */

/* with_position: its last event's position too (a statement of its own, since
 * reading it costs a little in every append). */
static int stream_state(sqlite_store *s, const char *stream, int with_position,
                        ebb__stream_state *out, ebb_error *err) {
  sqlite3_stmt *st = s->stmt[with_position ? S_LAST_EVENT : S_VERSION];
  bind_text(st, 1, stream);
  int rc = sqlite3_step(st);
  memset(out, 0, sizeof *out);
  if (rc == SQLITE_ROW) {
    out->version = sqlite3_column_int64(st, 0);
    out->deleted = strcmp((const char *)sqlite3_column_text(st, 1), EBB_TOMBSTONE) == 0;
    if (with_position) out->position = sqlite3_column_int64(st, 2);
  }
  sqlite3_reset(st);
  if (rc != SQLITE_ROW && rc != SQLITE_DONE) return db_error(s, err, "reading a stream's version");
  return 0;
}

static int find_command(sqlite_store *s, const char *command_id, ebb_command_record *out,
                        ebb_error *err) {
  sqlite3_stmt *st = s->stmt[S_FIND_COMMAND];
  bind_text(st, 1, command_id);
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) {
    snprintf(out->stream, sizeof out->stream, "%s", (const char *)sqlite3_column_text(st, 0));
    snprintf(out->type, sizeof out->type, "%s", (const char *)sqlite3_column_text(st, 1));
    out->version = sqlite3_column_int64(st, 2);
    out->first_position = sqlite3_column_int64(st, 3);
    out->position = sqlite3_column_int64(st, 4);
    const char *rejection = (const char *)sqlite3_column_text(st, 5);
    out->rejection = rejection ? strdup(rejection) : NULL;
    if (rejection && out->rejection == NULL) {
      sqlite3_reset(st);
      return ebb_error_set(err, EBB_ENOMEM, "out of memory looking up a command id");
    }
  }
  sqlite3_reset(st);
  if (rc == SQLITE_ROW) return 1;
  if (rc == SQLITE_DONE) return 0;
  return db_error(s, err, "looking up a command id");
}

static int tx_begin(ebb_store *base, ebb_append *reqs, size_t n, int64_t *head, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  if (run(s, S_BEGIN, err, "starting a transaction")) return err->code;
  unsigned version;
  if (s->head_known &&
      sqlite3_file_control(s->db, NULL, SQLITE_FCNTL_DATA_VERSION, &version) == SQLITE_OK &&
      version == s->head_version) {
    *head = s->head;
    return 0;
  }
  s->head_known = 0;
  sqlite3_stmt *st = s->stmt[S_HEAD];
  int rc = sqlite3_step(st);
  *head = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
  sqlite3_reset(st);
  if (rc != SQLITE_ROW) return db_error(s, err, "reading the head position");
  return 0;
}

static int tx_stream(ebb_store *base, const char *stream, int with_position,
                     ebb__stream_state *out, ebb_error *err) {
  return stream_state((sqlite_store *)base, stream, with_position, out, err);
}

static int tx_command(ebb_store *base, const char *command_id, ebb_command_record *out,
                      ebb_error *err) {
  return find_command((sqlite_store *)base, command_id, out, err);
}

static int tx_event(ebb_store *base, const char *id, ebb__event_place *out, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  sqlite3_stmt *st = s->stmt[S_FIND_ID];
  bind_text(st, 1, id);
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) {
    snprintf(out->stream, sizeof out->stream, "%s", (const char *)sqlite3_column_text(st, 0));
    out->version = sqlite3_column_int64(st, 1);
    out->position = sqlite3_column_int64(st, 2);
  }
  sqlite3_reset(st);
  if (rc == SQLITE_ROW) return 1;
  if (rc == SQLITE_DONE) return 0;
  return db_error(s, err, "looking up an event id");
}

static int tx_write(ebb_store *base, const ebb_append *r, const char *now, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  size_t category_len = ebb_stream_category_len(r->stream);
  sqlite3_stmt *st = s->stmt[S_INSERT];
  for (size_t i = 0; i < r->n; i++) {
    const ebb_event_in *e = &r->events[i];
    sqlite3_bind_text(st, 1, r->stream, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, r->result.first_version + (int64_t)i);
    sqlite3_bind_text(st, 3, e->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, e->type, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, e->schema);
    sqlite3_bind_text(st, 6, e->data, (int)e->data_len, SQLITE_STATIC);
    sqlite3_bind_text(st, 7, e->metadata, (int)e->metadata_len, SQLITE_STATIC);
    sqlite3_bind_text(st, 8, e->recorded_at ? e->recorded_at : now, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 9, r->stream, (int)category_len, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc != SQLITE_DONE) {
      db_error(s, err, "appending an event");
      /* Only the id can clash: the version was checked in this transaction. */
      return (rc & 0xFF) == SQLITE_CONSTRAINT ? EBB__CLASH : err->code;
    }
    /* SQLite numbers a row after the table's last one, as append.c did
     * (letting it costs less than giving the position). */
    int64_t position = sqlite3_last_insert_rowid(s->db);
    if (position != r->result.first_position + (int64_t)i) {
      s->head_known = 0;
      return ebb_error_set(err, EBB_ESTORE,
                           "appending an event: it got position %lld instead of %lld", (long long)position,
                           (long long)(r->result.first_position + (int64_t)i));
    }
  }
  if (r->command_id) {
    int which = r->rejection ? S_INSERT_REFUSAL : S_INSERT_COMMAND;
    st = s->stmt[which];
    bind_text(st, 1, r->command_id);
    bind_text(st, 2, r->stream);
    bind_text(st, 3, r->command_type ? r->command_type : "");
    sqlite3_bind_int64(st, 4, r->result.version);
    sqlite3_bind_int64(st, 5, r->result.first_position);
    sqlite3_bind_int64(st, 6, r->result.position);
    bind_text(st, 7, now);
    if (r->rejection) bind_text(st, 8, r->rejection);
    if (run(s, which, err, "recording a command id")) return err->code;
  }
  return 0;
}

static int tx_savepoint(ebb_store *base, ebb_error *err) {
  return run((sqlite_store *)base, S_SAVEPOINT, err, "starting a savepoint");
}

static int tx_release(ebb_store *base, int undo, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  if (undo && run(s, S_ROLLBACK_TO, err, "rolling back a savepoint")) return err->code;
  return run(s, S_RELEASE, err, "releasing a savepoint");
}

/* Some errors (a full disk, I/O, out of memory) make SQLite roll the whole
 * transaction back on its own. */
static int tx_lost(ebb_store *base) {
  return sqlite3_get_autocommit(((sqlite_store *)base)->db);
}

static int tx_commit(ebb_store *base, int64_t head, int64_t *moved, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  *moved = 0;
  s->head_known = 0;
  if (run(s, S_COMMIT, err, "committing")) return err->code;
  s->head = head;
  s->head_known = sqlite3_file_control(s->db, NULL, SQLITE_FCNTL_DATA_VERSION,
                                       &s->head_version) == SQLITE_OK;
  return 0;
}

static void tx_rollback(ebb_store *base) {
  sqlite_store *s = (sqlite_store *)base;
  if (!sqlite3_get_autocommit(s->db)) run(s, S_ROLLBACK, NULL, "rolling back");
}

static const ebb__append_ops sqlite_append_ops = {
    .begin = tx_begin,
    .stream = tx_stream,
    .command = tx_command,
    .event = tx_event,
    .write = tx_write,
    .savepoint = tx_savepoint,
    .release = tx_release,
    .lost = tx_lost,
    .commit = tx_commit,
    .rollback = tx_rollback,
};

/* ---------------------------------------------------------------- reads */

/* max_bytes: 0, or stop once the events read hold that many bytes (see ebb_read_all). */
static int collect(sqlite_store *s, sqlite3_stmt *st, size_t max_bytes, ebb_event_list *out,
                   ebb_error *err) {
  int rc;
  size_t bytes = 0;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    ebb_event ev = {
        .position = sqlite3_column_int64(st, 0),
        .stream = (char *)sqlite3_column_text(st, 1),
        .version = sqlite3_column_int64(st, 2),
        .id = (char *)sqlite3_column_text(st, 3),
        .type = (char *)sqlite3_column_text(st, 4),
        .schema = sqlite3_column_int64(st, 5),
        .data = (char *)sqlite3_column_text(st, 6),
        .data_len = (size_t)sqlite3_column_bytes(st, 6),
        .metadata = (char *)sqlite3_column_text(st, 7),
        .metadata_len = (size_t)sqlite3_column_bytes(st, 7),
        .recorded_at = (char *)sqlite3_column_text(st, 8),
    };
    if (!ev.stream || !ev.id || !ev.type || !ev.data || !ev.metadata || !ev.recorded_at) {
      sqlite3_reset(st);
      return db_error(s, err, "reading an event");
    }
    if (ebb_event_list_push(out, &ev)) {
      sqlite3_reset(st);
      return ebb_error_set(err, EBB_ENOMEM, "out of memory reading events");
    }
    bytes += ev.data_len + ev.metadata_len;
    if (max_bytes && bytes >= max_bytes) {
      rc = SQLITE_DONE;
      break;
    }
  }
  sqlite3_reset(st);
  if (rc != SQLITE_DONE) return db_error(s, err, "reading events");
  return 0;
}

static int sqlite_read_stream(ebb_store *base, const char *stream, int64_t from, int64_t limit,
                              int backward, ebb_event_list *out, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  sqlite3_stmt *st = s->stmt[backward ? S_READ_BACK : S_READ_FWD];
  bind_text(st, 1, stream);
  sqlite3_bind_int64(st, 2, backward && from == 0 ? INT64_MAX : from);
  sqlite3_bind_int64(st, 3, limit);
  return collect(s, st, 0, out, err);
}

static int sqlite_read_all(ebb_store *base, const ebb_read_all *q, ebb_event_list *out,
                           ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  int which = q->category ? (q->type ? S_READ_ALL_CAT_TYPE : S_READ_ALL_CAT)
                          : (q->type ? S_READ_ALL_TYPE : S_READ_ALL);
  sqlite3_stmt *st = s->stmt[which];
  sqlite3_bind_int64(st, 1, q->after);
  sqlite3_bind_int64(st, 2, q->limit);
  if (q->category) bind_text(st, 3, q->category);
  if (q->type) bind_text(st, 4, q->type);
  return collect(s, st, q->max_bytes, out, err);
}

static int sqlite_read_linked(ebb_store *base, int link, const char *value, int64_t after,
                              int64_t limit, ebb_event_list *out, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  sqlite3_stmt *st = s->stmt[link == EBB_LINK_CORRELATION ? S_READ_CORRELATION : S_READ_CAUSATION];
  bind_text(st, 1, value);
  sqlite3_bind_int64(st, 2, after);
  sqlite3_bind_int64(st, 3, limit);
  return collect(s, st, 0, out, err);
}

static int sqlite_list_streams(ebb_store *base, const ebb_list_streams *q, ebb_stream_fn fn,
                               void *ud, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  sqlite3_stmt *st = s->stmt[S_LIST_STREAMS];
  /* Names starting with the prefix are those in [prefix, prefix with its
   * last byte raised): a range of the index. Valid UTF-8 never holds 0xFF. */
  char end[EBB_MAX_NAME + 1];
  size_t n = q->prefix ? strlen(q->prefix) : 0;
  if (n) {
    memcpy(end, q->prefix, n + 1);
    end[n - 1] = (char)((unsigned char)end[n - 1] + 1);
  }
  bind_text(st, 1, q->after ? q->after : "");
  bind_text(st, 2, q->prefix ? q->prefix : "");
  bind_text(st, 3, n ? end : NULL);
  bind_text(st, 4, q->category);
  sqlite3_bind_int64(st, 5, q->limit);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    const char *type = (const char *)sqlite3_column_text(st, 5);
    ebb_stream_info info = {
        .stream = (const char *)sqlite3_column_text(st, 0),
        .version = sqlite3_column_int64(st, 1),
        .first_position = sqlite3_column_int64(st, 2),
        .last_position = sqlite3_column_int64(st, 3),
        .recorded_at = (const char *)sqlite3_column_text(st, 4),
        .deleted = type && strcmp(type, EBB_TOMBSTONE) == 0,
    };
    if (!info.stream || !info.recorded_at || !type) {
      rc = SQLITE_NOMEM;
      break;
    }
    if (fn(ud, &info) != 0) {
      rc = SQLITE_DONE;
      break;
    }
  }
  sqlite3_reset(st);
  if (rc != SQLITE_DONE) return db_error(s, err, "listing streams");
  return 0;
}

static int sqlite_read_range(ebb_store *base, int64_t first, int64_t last, ebb_event_list *out,
                             ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  sqlite3_stmt *st = s->stmt[S_READ_RANGE];
  sqlite3_bind_int64(st, 1, first);
  sqlite3_bind_int64(st, 2, last);
  return collect(s, st, 0, out, err);
}

static int sqlite_stream_version(ebb_store *base, const char *stream, int64_t *version,
                                 int *deleted, ebb_error *err) {
  ebb__stream_state st;
  int rc = stream_state((sqlite_store *)base, stream, 0, &st, err);
  *version = st.version;
  *deleted = st.deleted;
  return rc;
}

static int sqlite_head(ebb_store *base, int64_t *position, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  sqlite3_stmt *st = s->stmt[S_HEAD];
  int rc = sqlite3_step(st);
  *position = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
  sqlite3_reset(st);
  if (rc != SQLITE_ROW) return db_error(s, err, "reading the head position");
  return 0;
}

static int sqlite_find_command(ebb_store *base, const char *command_id, ebb_command_record *out,
                               ebb_error *err) {
  return find_command((sqlite_store *)base, command_id, out, err);
}

/* ---------------------------------------------------------------- snapshots */

static int sqlite_snapshot_save(ebb_store *base, const ebb_snapshot *snaps, size_t n,
                                ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  char now[EBB_TIME_LEN + 1];
  ebb_clock_format(ebb_clock_now_ms(), now);
  if (run(s, S_BEGIN, err, "starting a transaction")) return err->code;
  sqlite3_stmt *st = s->stmt[S_SNAP_SAVE];
  for (size_t i = 0; i < n; i++) {
    bind_text(st, 1, snaps[i].stream);
    bind_text(st, 2, snaps[i].fingerprint);
    sqlite3_bind_int64(st, 3, snaps[i].version);
    sqlite3_bind_int64(st, 4, snaps[i].position);
    bind_text(st, 5, snaps[i].recorded_at);
    sqlite3_bind_blob64(st, 6, snaps[i].state, snaps[i].state_len, SQLITE_STATIC);
    bind_text(st, 7, now);
    if (run(s, S_SNAP_SAVE, err, "saving a snapshot")) {
      sqlite3_step(s->stmt[S_ROLLBACK]);
      sqlite3_reset(s->stmt[S_ROLLBACK]);
      return err->code;
    }
  }
  return run(s, S_COMMIT, err, "committing snapshots");
}

static int sqlite_snapshot_load(ebb_store *base, const char *stream, const char *fingerprint,
                                int64_t max_version, const char *max_time, int64_t *version,
                                int64_t *position, ebb_buf *state_buf, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  sqlite3_stmt *st = s->stmt[S_SNAP_LOAD];
  bind_text(st, 1, stream);
  bind_text(st, 2, fingerprint);
  sqlite3_bind_int64(st, 3, max_version < 0 ? INT64_MAX : max_version);
  bind_text(st, 4, max_time ? max_time : "9999");
  int rc = sqlite3_step(st);
  int found = 0;
  if (rc == SQLITE_ROW) {
    *version = sqlite3_column_int64(st, 0);
    *position = sqlite3_column_int64(st, 1);
    const void *blob = sqlite3_column_blob(st, 2);
    int len = sqlite3_column_bytes(st, 2);
    found = ebb_buf_append(state_buf, blob, (size_t)len) == 0 ? 1 : EBB_ENOMEM;
  }
  sqlite3_reset(st);
  if (found == EBB_ENOMEM) return ebb_error_set(err, EBB_ENOMEM, "out of memory loading a snapshot");
  if (rc != SQLITE_ROW && rc != SQLITE_DONE) return db_error(s, err, "loading a snapshot");
  return found;
}

static int sqlite_snapshot_list(ebb_store *base, ebb_snapshot_fn fn, void *ud, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  sqlite3_stmt *st = s->stmt[S_SNAP_LIST];
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    ebb_snapshot snap = {
        .stream = (const char *)sqlite3_column_text(st, 0),
        .version = sqlite3_column_int64(st, 1),
        .position = sqlite3_column_int64(st, 2),
        .recorded_at = (const char *)sqlite3_column_text(st, 3),
        .fingerprint = (const char *)sqlite3_column_text(st, 4),
        .state_len = (size_t)sqlite3_column_int64(st, 5),
        .created_at = (const char *)sqlite3_column_text(st, 6),
    };
    if (fn(ud, &snap) != 0) break;
  }
  sqlite3_reset(st);
  if (rc != SQLITE_ROW && rc != SQLITE_DONE) return db_error(s, err, "listing snapshots");
  return 0;
}

static int sqlite_snapshot_delete(ebb_store *base, const char *stream, const char *fingerprint,
                                  int64_t version, int64_t *deleted, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  sqlite3_stmt *st = s->stmt[S_SNAP_DELETE];
  bind_text(st, 1, stream);
  bind_text(st, 2, fingerprint);
  sqlite3_bind_int64(st, 3, version);
  if (run(s, S_SNAP_DELETE, err, "deleting snapshots")) return err->code;
  *deleted = sqlite3_changes64(s->db);
  return 0;
}

static int sqlite_schema_version(ebb_store *base, int *version, ebb_error *err) {
  sqlite_store *s = (sqlite_store *)base;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(s->db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK)
    return db_error(s, err, "reading the schema version");
  int rc = sqlite3_step(st);
  *version = rc == SQLITE_ROW ? sqlite3_column_int(st, 0) : 0;
  sqlite3_finalize(st);
  if (rc != SQLITE_ROW) return db_error(s, err, "reading the schema version");
  return 0;
}

static const ebb_store_vtable sqlite_vtable = {
    .name = "sqlite",
    .append = &sqlite_append_ops,
    .read_stream = sqlite_read_stream,
    .read_all = sqlite_read_all,
    .read_range = sqlite_read_range,
    .stream_version = sqlite_stream_version,
    .head = sqlite_head,
    .find_command = sqlite_find_command,
    .snapshot_save = sqlite_snapshot_save,
    .snapshot_load = sqlite_snapshot_load,
    .snapshot_list = sqlite_snapshot_list,
    .snapshot_delete = sqlite_snapshot_delete,
    .schema_version = sqlite_schema_version,
    .list_streams = sqlite_list_streams,
    .read_linked = sqlite_read_linked,
    .close = sqlite_close,
    .wal_pages = sqlite_wal_pages,
    .checkpoint = sqlite_checkpoint,
};
