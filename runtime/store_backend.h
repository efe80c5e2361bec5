/*
 * store_backend.h: what the store's backends give store.c and each other,
 * never seen by the store's callers. store.c opens a backend by name through
 * a table of these constructors; each backend implements ebb_store_vtable
 * (store.h) and uses store.h's argument checks, never the reverse.
 */
#ifndef EBB_STORE_BACKEND_H
#define EBB_STORE_BACKEND_H

#include "store.h"

/* The constructors. opt has been checked by ebb_store_open. */
int ebb__store_sqlite_open(ebb_store **out, const ebb_store_options *opt, ebb_error *err);
int ebb__store_postgres_open(ebb_store **out, const ebb_store_options *opt, ebb_error *err);

/* The SQLite backend's schema (the benchmark's raw-SQLite baseline uses it too). */
extern const char *const ebb__sqlite_schema_sql;
/* The fsync-timing VFS the SQLite backend opens with (sync_vfs.c). */
const char *ebb__sync_vfs_name(void);

#endif
