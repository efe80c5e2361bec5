/*
 * store_backend.h: what the store's backends (sqlite.c, postgres.c and its
 * pg_link.c, in this folder) give store.c, append.c and each other, never
 * seen by the store's callers. store.c opens a backend by name through
 * a table of these constructors; each backend implements ebb_store_vtable
 * (store.h) and uses store.h's argument checks, never the reverse. An append
 * is decided above the backends, in append.c, from what the backend's append
 * transaction shows it (ebb__append_ops).
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
/* The last committed position, read by the store and its watch links alike:
 * positions are given under one lock in commit order, so the largest one a
 * snapshot shows is its head (a backward step of the primary key's index).
 * Since schema 4 no counter is written: a row updated at every commit piled
 * up dead versions that every reader walked through while any snapshot in
 * the cluster was older than them (a pg_dump, a long report). */
#define EBB__PG_HEAD "coalesce(max(position), 0) FROM events"
/* The link constructor of a shared backend (pg_link.c; see ebb_store_link_new). */
int ebb__store_postgres_link_new(ebb_store_link **out, const char *uri, int kind, ebb_error *err);
/* Every link starts with this: the backend's operations on it. */
typedef struct ebb_store_link_vtable {
  int (*start)(ebb_store_link *, ebb_error *err);
  int (*fd)(const ebb_store_link *);
  int (*wants)(const ebb_store_link *);
  int (*up)(const ebb_store_link *);
  int (*step)(ebb_store_link *, ebb_store_link_news *news, ebb_error *err);
  int (*retry)(ebb_store_link *, ebb_error *err);
  void (*free)(ebb_store_link *);
} ebb_store_link_vtable;
struct ebb_store_link {
  const ebb_store_link_vtable *vt;
};

/* ---------------------------------------------------------------- appends
 *
 * What an append decides (expected versions, deleted streams, command-id
 * dedupe, idempotent re-sends, positions, atomic batches, every error it
 * answers) is written once, in append.c; a backend gives it these operations
 * on one append transaction (ebb_store_vtable.append). Lookups see what the
 * transaction wrote so far. Request-level failures go to the err given (the
 * request's own); 0 or < 0 unless said otherwise. */

/* A stream as the transaction sees it: its last event. */
typedef struct ebb__stream_state {
  int64_t version;  /* 0: no such stream */
  int64_t position; /* of its last event (0: none); may be left 0 unless asked for */
  int deleted;      /* its last event is a tombstone */
} ebb__stream_state;

/* Where an event id is stored. */
typedef struct ebb__event_place {
  char stream[EBB_MAX_NAME + 1];
  int64_t version, position;
} ebb__event_place;

/* write's answer when one of the request's event ids is stored already. */
#define EBB__CLASH 1
/* commit's answer after begin_unlocked when what was read turned out behind
 * (another writer wrote a stream, an event id or a command id of the batch
 * in between): nothing was written, and the batch is decided again, locked. */
#define EBB__STALE 2

typedef struct ebb__append_ops {
  /* Opens the transaction, holding the store's write lock until it ends, and
   * gives the last position. The batch is given so that a backend can read
   * what deciding it needs at once (requests with err set are not decided).
   * On failure the driver still calls rollback. */
  int (*begin)(ebb_store *, ebb_append *reqs, size_t n, int64_t *head, ebb_error *err);
  /* NULL, or as begin but without the lock: reads what deciding the batch
   * needs as of some moment, and the last position after it. Versions only
   * grow and what is stored is never changed, so the reads may be behind but
   * never wrong; commit then takes the lock, places the events after the
   * position it finds, and answers EBB__STALE if any stream, event id or
   * command id it writes was written in between. A writer that holds the
   * lock only from that point to its commit lets another writer read and
   * decide meanwhile. */
  int (*begin_unlocked)(ebb_store *, ebb_append *reqs, size_t n, int64_t *head, ebb_error *err);
  /* with_position: out->position is wanted (a request without events answers it). */
  int (*stream)(ebb_store *, const char *stream, int with_position, ebb__stream_state *out,
                ebb_error *err);
  /* 1 with *out filled when the command id is recorded (out->rejection a
   * malloc'd copy or NULL), 0 when not. */
  int (*command)(ebb_store *, const char *command_id, ebb_command_record *out, ebb_error *err);
  /* 1 with *out filled when the event id is stored, 0 when not. */
  int (*event)(ebb_store *, const char *id, ebb__event_place *out, ebb_error *err);
  /* Writes an accepted request: event i at version r->result.first_version + i
   * and position r->result.first_position + i, and its command record (version
   * r->result.version, positions r->result.first_position and .position,
   * and r->rejection: NULL for an accepted command). 0,
   * EBB__CLASH (err says what clashed), or < 0. What a failed write left in
   * the transaction is undone by release, or by the rollback of the whole
   * batch when it is the only request. */
  int (*write)(ebb_store *, const ebb_append *r, const char *now, ebb_error *err);
  /* NULL when a failed write leaves nothing behind. Otherwise: before and
   * after each write of a batch of several requests; undo: the write failed.
   * A failure here is the transaction's. */
  int (*savepoint)(ebb_store *, ebb_error *err);
  int (*release)(ebb_store *, int undo, ebb_error *err);
  /* NULL, or 1 when a request's failure took the transaction with it. */
  int (*lost)(ebb_store *);
  /* Makes the batch durable; head: the last position now used. *moved: after
   * begin_unlocked, how far the store's head had moved since: every position
   * the batch gave past begin's head is that much further (0 after begin). */
  int (*commit)(ebb_store *, int64_t head, int64_t *moved, ebb_error *err);
  /* Ends the transaction without writing, whatever state it is in. */
  void (*rollback)(ebb_store *);
} ebb__append_ops;

/* Decides and writes a batch through s->vt->append (see ebb_store_append and
 * ebb_store_append_atomic; the requests have been checked). */
int ebb__append_run(ebb_store *s, ebb_append *reqs, size_t n, int atomic, ebb_error *err);

/* The SQLite backend's schema (the benchmark's raw-SQLite baseline uses it too). */
extern const char *const ebb__sqlite_schema_sql;
/* The fsync-timing VFS the SQLite backend opens with (sync_vfs.c). */
const char *ebb__sync_vfs_name(void);

#endif
