/*
 * store_backend.h: what the store's backends (sqlite.c, postgres.c and its
 * pg_link.c, in this folder) give store.c and each other, never seen by the
 * store's callers. store.c opens a backend by name through
 * a table of these constructors; each backend implements ebb_store_vtable
 * (store.h) and uses store.h's argument checks, never the reverse.
 */
#ifndef EBB_STORE_BACKEND_H
#define EBB_STORE_BACKEND_H

#include "store.h"

/* The constructors. opt has been checked by ebb_store_open. */
int ebb__store_sqlite_open(ebb_store **out, const ebb_store_options *opt, ebb_error *err);
int ebb__store_postgres_open(ebb_store **out, const ebb_store_options *opt, ebb_error *err);
/* The channel every PostgreSQL append notifies on commit (its payload: the
 * store's schema, so stores in other schemas of one database ignore it). */
#define EBB__PG_CHANNEL "ebb_events"
/* The link constructor of a shared backend (pg_link.c; see ebb_store_link_new). */
int ebb__store_postgres_link_new(ebb_store_link **out, const char *uri, int kind, ebb_error *err);
/* Every link starts with this: the backend's operations on it. */
typedef struct ebb_store_link_vtable {
  int (*start)(ebb_store_link *, ebb_error *err);
  int (*fd)(const ebb_store_link *);
  int (*wants)(const ebb_store_link *);
  int (*up)(const ebb_store_link *);
  int (*step)(ebb_store_link *, ebb_store_link_news *news, ebb_error *err);
  void (*free)(ebb_store_link *);
} ebb_store_link_vtable;
struct ebb_store_link {
  const ebb_store_link_vtable *vt;
};

/* The SQLite backend's schema (the benchmark's raw-SQLite baseline uses it too). */
extern const char *const ebb__sqlite_schema_sql;
/* The fsync-timing VFS the SQLite backend opens with (sync_vfs.c). */
const char *ebb__sync_vfs_name(void);

#endif
