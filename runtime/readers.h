/*
 * readers.h: a pool of read-only runtimes for the daemon's read routes, so
 * that reading the store (and folding, and upcasting) runs on libuv's
 * thread pool instead of the loop, which must never wait for the disk.
 *
 * A runtime belongs to one thread at a time: a worker takes one, uses it,
 * and gives it back (the mutex orders the handoffs). Runtimes are opened on
 * demand, one per concurrent reader at most, without a state cache (the
 * loop's runtime commits; a reader's cache could not know), loading
 * snapshots but never taking or writing any.
 */
#ifndef EBB_READERS_H
#define EBB_READERS_H

#include "error.h"
#include "runtime.h"

typedef struct ebb_readers ebb_readers;

/* ro is copied (its strings too); cache_size and snapshots_read_only are overridden. */
int ebb_readers_new(ebb_readers **out, const ebb_runtime_options *ro, ebb_error *err);
/* Any thread: a runtime for this thread's exclusive use until given back. */
ebb_runtime *ebb_readers_take(ebb_readers *r, ebb_error *err);
void ebb_readers_give(ebb_readers *r, ebb_runtime *rt);
/* The modules changed: runtimes opened before are closed instead of reused. */
void ebb_readers_reload(ebb_readers *r);
void ebb_readers_free(ebb_readers *r); /* NULL-safe; every runtime must have been given back */

#endif
