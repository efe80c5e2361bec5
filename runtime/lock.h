/*
 * lock.h: one daemon per data directory.
 *
 * A daemon (`ebb serve`) holds <data_dir>/ebb.lock with flock(LOCK_EX) for
 * as long as it runs, and keeps one line of JSON in the file saying who it
 * is and where it listens:
 *
 *   {"pid":123,"url":"http://127.0.0.1:7070","started_at":"2026-...Z"}
 *
 * The lock, not the file's content, is the truth: the kernel drops it when
 * the holder dies, however it dies, so a stale line left by a crashed daemon
 * never blocks anyone. The content only serves the messages that tell the
 * user which process holds the directory and which --url reaches it.
 *
 * flock locks belong to an open file description: a second acquire in the
 * same process, on its own open of the file, fails with EBB_EBUSY like one
 * from another process.
 */
#ifndef EBB_LOCK_H
#define EBB_LOCK_H

#include <stddef.h>

#include "error.h"

typedef struct ebb_lock ebb_lock;

#define EBB_LOCK_FILE "ebb.lock"

/* Takes the daemon lock of data_dir (which must exist: the caller creates
 * it). The file is created if needed and kept open, close-on-exec, for the
 * life of the lock; its content is replaced by holder_json (one line, no
 * newline in it; written as given, plus a newline).
 * Returns 0 with *out set; EBB_EBUSY when another process (or another
 * acquire in this one) holds it, with a message naming the holder read from
 * the file, e.g. "data directory /x is held by ebb serve (pid 123,
 * http://127.0.0.1:7070, since 2026-...Z): stop it, or use --url
 * http://127.0.0.1:7070 to go through it" (or "... is held by another
 * process" when the line cannot be read); EBB_EBADREQ for a holder_json with
 * a newline; EBB_ESTORE for a file-system failure. */
int ebb_lock_acquire(ebb_lock **out, const char *data_dir, const char *holder_json,
                     ebb_error *err);

/* Rewrites the holder line (e.g. once the port is known). 0, EBB_EBADREQ or
 * EBB_ESTORE; on failure the lock is still held. */
int ebb_lock_update(ebb_lock *l, const char *holder_json, ebb_error *err);

/* Empties the holder line, unlocks and closes. The file stays: removing it
 * would race with a new holder that has opened it but not yet locked it.
 * NULL-safe. */
void ebb_lock_release(ebb_lock *l);

/* Is data_dir held by a daemon right now? Never creates the lock file.
 * Returns 0: no (or there is no lock file); 1: yes, and *holder (when holder
 * is not NULL) is the holder's line, malloc'd (caller frees; "" when the
 * holder has not written it yet); EBB_ESTORE (or EBB_ENOMEM) on failure.
 * A probe takes a shared lock for an instant; ebb_lock_acquire retries
 * briefly so that a probe never makes it fail. */
int ebb_lock_probe(const char *data_dir, char **holder, ebb_error *err);

/* Writes into buf (always NUL-terminated when len > 0) the message a command
 * prints when it refuses to write into a held directory, from the holder's
 * line: "data directory /x is held by ebb serve (pid N, URL, since T): use
 * --url URL to go through it". Missing parts are left out; an unreadable
 * line gives "data directory /x is held by another process". */
void ebb_lock_describe(const char *data_dir, const char *holder_json, char *buf, size_t len);

#endif
