/*
 * reactor_db.c: DATA/reactors.db, where reactors keep what must survive a
 * crash (see reactor.h): one checkpoint row per reactor with its fingerprint,
 * the pending schedules, the positions an operator skipped, and the commands
 * recorded as rejected. An SQLite file beside the store, synced as the store
 * is; every statement is prepared with bound parameters.
 */
#define _GNU_SOURCE /* asprintf, vasprintf */
#include "reactor_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"

static const char *schema_sql =
    "CREATE TABLE IF NOT EXISTS reactor_checkpoint (name TEXT PRIMARY KEY, position INTEGER NOT "
    "NULL, event_position INTEGER, event_id TEXT, updated_at TEXT NOT NULL);"
    "CREATE TABLE IF NOT EXISTS reactor_skipped (name TEXT NOT NULL, position INTEGER NOT NULL, "
    "error TEXT, skipped_at TEXT NOT NULL, PRIMARY KEY (name, position));"
    "CREATE TABLE IF NOT EXISTS reactor_schedules (name TEXT NOT NULL, key TEXT NOT NULL, "
    "fire_at_ms INTEGER NOT NULL, aggregate TEXT NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL, "
    "data TEXT NOT NULL, command_id TEXT NOT NULL, event_id TEXT, created_at TEXT NOT NULL, "
    "event_position INTEGER, PRIMARY KEY (name, key));"
    "CREATE INDEX IF NOT EXISTS reactor_schedules_at ON reactor_schedules (fire_at_ms);"
    "CREATE TABLE IF NOT EXISTS reactor_rejections (name TEXT NOT NULL, position INTEGER, "
    "command_id TEXT NOT NULL, aggregate TEXT, id TEXT, type TEXT, error TEXT, at TEXT NOT NULL);";

int ebb__rdb_exec(sqlite3 *db, const char *sql, char **msg) {
  char *e = NULL;
  int rc = sqlite3_exec(db, sql, NULL, NULL, &e);
  if (rc != SQLITE_OK && msg) *msg = ebb_strdupf("%s", e ? e : sqlite3_errstr(rc));
  sqlite3_free(e);
  return rc == SQLITE_OK ? 0 : -1;
}

int ebb__rdb_run(ebb_reactors *h, const char *sql, const char *types, ...) {
  sqlite3_stmt *st = NULL;
  int cached = 0;
  for (size_t i = 0; i < h->n_stmts && !cached; i++)
    if (h->stmts[i].sql == sql) st = h->stmts[i].st, cached = 1;
  if (!cached) {
    if (sqlite3_prepare_v3(h->db, sql, -1, SQLITE_PREPARE_PERSISTENT, &st, NULL) != SQLITE_OK)
      return -1;
    if (h->n_stmts < sizeof h->stmts / sizeof h->stmts[0]) {
      h->stmts[h->n_stmts].sql = sql;
      h->stmts[h->n_stmts++].st = st;
      cached = 1;
    }
  }
  va_list ap;
  va_start(ap, types);
  for (int i = 0; types[i]; i++) {
    if (types[i] == 't') sqlite3_bind_text(st, i + 1, va_arg(ap, const char *), -1, SQLITE_TRANSIENT);
    else if (types[i] == 'i') sqlite3_bind_int64(st, i + 1, va_arg(ap, int64_t));
    else sqlite3_bind_null(st, i + 1);
  }
  va_end(ap);
  int rc = sqlite3_step(st);
  if (cached) {
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
  } else {
    sqlite3_finalize(st);
  }
  return rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

void ebb__rdb_close(ebb_reactors *h) {
  for (size_t i = 0; i < h->n_stmts; i++) sqlite3_finalize(h->stmts[i].st);
  h->n_stmts = 0;
  sqlite3_close(h->db);
  h->db = NULL;
}

int ebb__rdb_write_checkpoint(reactor *r) {
  char now[EBB_TIME_LEN + 1];
  ebb_clock_format(ebb_clock_now_ms(), now);
  return ebb__rdb_run(r->h,
                 "INSERT INTO reactor_checkpoint (name, position, event_position, event_id, "
                 "updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET position = "
                 "excluded.position, event_position = excluded.event_position, event_id = "
                 "excluded.event_id, updated_at = excluded.updated_at",
                 "tiitt", r->name, r->f.position, r->f.mark_position, r->f.mark_id, now);
}

int ebb__rdb_read_checkpoint(reactor *r) {
  sqlite3_stmt *st;
  int found = 0;
  r->f.position = r->f.mark_position = 0;
  r->f.mark_id[0] = '\0';
  if (sqlite3_prepare_v2(r->h->db, "SELECT position, event_position, event_id FROM "
                         "reactor_checkpoint WHERE name = ?", -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, r->name, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) {
      found = 1;
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
  return found;
}

int64_t ebb__rdb_count_schedules(sqlite3 *db, const char *name) {
  sqlite3_stmt *st;
  int64_t n = 0;
  if (sqlite3_prepare_v2(db, "SELECT count(*) FROM reactor_schedules WHERE name = ?", -1, &st,
                         NULL) != SQLITE_OK)
    return 0;
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  if (sqlite3_step(st) == SQLITE_ROW) n = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return n;
}


static int has_column(sqlite3 *db, const char *table, const char *column) {
  sqlite3_stmt *st;
  int found = 0;
  if (sqlite3_prepare_v2(db, "SELECT 1 FROM pragma_table_info(?) WHERE name = ?", -1, &st, NULL) !=
      SQLITE_OK)
    return 0;
  sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, column, -1, SQLITE_STATIC);
  found = sqlite3_step(st) == SQLITE_ROW;
  sqlite3_finalize(st);
  return found;
}

int ebb__rdb_open(sqlite3 **db, const char *data_dir, int durability, ebb_error *err) {
  char *path = NULL, *msg = NULL;
  if (asprintf(&path, "%s/reactors.db", data_dir) < 0)
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  if (sqlite3_open_v2(path, db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) != SQLITE_OK) {
    ebb_error_set(err, EBB_ESTORE, "cannot open %s: %s", path,
                  *db ? sqlite3_errmsg(*db) : "out of memory");
    goto fail;
  }
  sqlite3_busy_timeout(*db, 5000);
  /* As durable as the store: what it records decides whether a command is
   * issued again (harmless: the store answers) or a schedule is lost (not). */
  if (ebb__rdb_exec(*db, durability == EBB_DURABILITY_FULL
                             ? "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                             : "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                    &msg) != 0 ||
      ebb__rdb_exec(*db, schema_sql, &msg) != 0) {
    ebb_error_set(err, EBB_ESTORE, "%s: %s", path, msg ? msg : "cannot set up");
    goto fail;
  }
  /* A file from before event_position (the event a rejected schedule's
   * handler gets is read back at it): the column, empty for old rows. */
  if (!has_column(*db, "reactor_schedules", "event_position") &&
      ebb__rdb_exec(*db, "ALTER TABLE reactor_schedules ADD COLUMN event_position INTEGER", &msg) != 0) {
    ebb_error_set(err, EBB_ESTORE, "%s: %s", path, msg ? msg : "cannot set up");
    goto fail;
  }
  free(path);
  return 0;
fail:
  free(msg);
  free(path);
  sqlite3_close(*db);
  *db = NULL;
  return err->code;
}

static void json_str_or_null(ebb_buf *b, const char *s) {
  if (s) ebb_buf_json_string(b, s, strlen(s));
  else ebb_buf_puts(b, "null");
}

void ebb__rdb_schedules_json(sqlite3 *db, const char *name, ebb_buf *out) {
  sqlite3_stmt *st;
  ebb_buf_putc(out, '[');
  if (sqlite3_prepare_v2(db, "SELECT key, fire_at_ms, aggregate, id, type, data, command_id, "
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
}

