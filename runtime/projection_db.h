/*
 * projection_db.h: the `db` handle that projection modules see, a Lua
 * userdata over one SQLite connection to the projection's read model.
 *
 * This file owns what sandboxed Lua may do with that database: run SQL of
 * its own with bound parameters, on its own tables, and nothing else. The
 * runner (projection.c) owns the connection, its transactions and its
 * checkpoint tables (`_ebb_*`); the handle only borrows the connection.
 *
 * Lua methods (Lua raises on every failure; messages start with the method,
 * e.g. `db:exec: no such table: orderz (in "INSERT INTO orderz ...")`):
 *
 *   db:exec(sql, ...)   runs one statement; returns the rows it changed
 *                       (0 for anything but INSERT/UPDATE/DELETE). A text
 *                       of several statements runs them all, in order, when
 *                       there are no parameters (setup's CREATE TABLE ...;
 *                       CREATE INDEX ...), and returns the sum.
 *   db:row(sql, ...)    the first row as {column = value}, or nil
 *   db:rows(sql, ...)   every row, as an array (ebb's JSON array metatable:
 *                       encodes as [] when empty); more than
 *                       EBB_PROJDB_MAX_ROWS rows raise (use LIMIT)
 *   db:value(sql, ...)  the first column of the first row; nil when there is
 *                       no row or the value is NULL
 *
 * Parameters, one per `?`/`?NNN`/`:name` slot of the statement (with
 * ?NNN the count is the largest NNN), bound by position: integer -> INTEGER,
 * float -> REAL, string -> TEXT (with its length, so NUL bytes are kept;
 * a string that is not valid UTF-8 is bound as a BLOB, so its bytes come
 * back exactly and SQLite never holds malformed TEXT), boolean -> 1/0,
 * nil or the JSON null -> NULL. Anything else, and a wrong number of
 * parameters, raises. Columns come back as: INTEGER -> integer, REAL ->
 * float, TEXT and BLOB -> string, NULL -> the JSON null (ebb_json_push_null)
 * in row tables, so that a result encoded as JSON keeps the key. When two
 * columns share a name, the last one wins.
 *
 * What the handle refuses, for the statements it prepares (the message says
 * what and why, e.g. `db:exec: not authorized: projections may not use
 * ATTACH: ...`): ATTACH/DETACH and any database but main and temp; PRAGMA,
 * except the read-only table_info, table_xinfo, index_list, index_info,
 * index_xinfo, foreign_key_list and data_version (which FTS5 uses); BEGIN,
 * COMMIT, ROLLBACK, SAVEPOINT, RELEASE (the runner owns transactions);
 * VACUUM; any read, write, creation, renaming to, or drop of a table, view,
 * index or trigger whose name starts with `_ebb_` (any case); the SQL
 * functions load_extension and fts3_tokenizer. In EBB_PROJDB_READ mode, also
 * everything but reading: a query may only SELECT (and use the pragmas above).
 * These checks run when SQLite prepares the statement, including the
 * re-preparations it does by itself after a schema change.
 *
 * Prepared statements are cached by SQL text and mode (at most
 * EBB_PROJDB_CACHE, least recently used first out) and reset and unbound
 * after every call, also when a call raises.
 */
#ifndef EBB_PROJECTION_DB_H
#define EBB_PROJECTION_DB_H

#include <lua.h>
#include <sqlite3.h>

#include "error.h"

typedef struct ebb_projdb ebb_projdb;

enum {
  EBB_PROJDB_WRITE = 0, /* handlers and setup: reads and writes to the projection's own tables */
  EBB_PROJDB_READ = 1   /* queries: reads only */
};

#define EBB_PROJDB_CACHE 64        /* prepared statements kept per handle */
#define EBB_PROJDB_MAX_ROWS 100000 /* rows one db:rows call may return */

/* Wraps db, an open connection that stays the caller's (never closed here),
 * as a handle in `mode`, pushes its Lua userdata and sets *out (out may be
 * NULL).
 *
 * The handle lives inside the userdata: *out is valid while the userdata is
 * reachable from Lua, so keep a reference to it (the registry) for as long
 * as you use *out. A collected handle closes itself.
 *
 * The handle installs its authorizer on db (sqlite3_set_authorizer, which
 * replaces any other, and makes SQLite prepare the connection's statements
 * again on their next step, once) and removes it when closed, so: one open
 * handle per connection at a time (close the old one before pushing a new
 * one, also from another Lua state), and do not set an authorizer of your
 * own on db. The authorizer only restricts statements prepared and run
 * through the handle; the caller's own statements on db are unaffected.
 *
 * Lua code cannot close a borrowed handle: it has no db:close(), and its
 * __close does nothing (a handler's `local d <close> = db` must not break
 * the runner's next batch).
 *
 * Returns 0. Like luaL_check*, it raises on misuse (db NULL, an unknown
 * mode, db already having an open handle made in this Lua state) and on a
 * memory error: call it in protected mode. */
int ebb_projdb_push(lua_State *L, sqlite3 *db, int mode, ebb_projdb **out);

/* Opens the database at path (":memory:" allowed; created if missing) and
 * pushes a handle that owns its connection: it is closed with the handle
 * (db:close(), __close, __gc or ebb_projdb_close), and the handle has, for
 * specs and tools, db:begin(), db:commit() and db:rollback(), which run
 * unrestricted. Returns 0, or EBB_ESTORE with a message and nothing pushed
 * when the file cannot be opened; raises on a memory error and an unknown
 * mode. */
int ebb_projdb_open(lua_State *L, const char *path, int mode, ebb_projdb **out, ebb_error *err);

/* What later statements may do: EBB_PROJDB_WRITE or EBB_PROJDB_READ (any
 * other value is taken as READ). Statements cached in one mode are never
 * used in the other. NULL-safe. */
void ebb_projdb_set_mode(ebb_projdb *h, int mode);

/* Finalizes the cached statements and removes the authorizer from the
 * connection (and closes it, for a handle from ebb_projdb_open). The
 * userdata stays, but its every method then raises "this db handle is
 * closed". Harmless twice and on NULL; call it before closing a borrowed
 * connection. Not from inside a db method (it is never re-entered). */
void ebb_projdb_close(ebb_projdb *h);

/* The connection of an open handle (NULL once closed), for statements of
 * the caller's own: they are not restricted (see ebb_projdb_push). */
sqlite3 *ebb_projdb_connection(const ebb_projdb *h);

/* 1 if the handle is closed (by ebb_projdb_close or, for an owned handle,
 * by Lua), else 0. NULL counts as closed. */
int ebb_projdb_closed(const ebb_projdb *h);

#endif
