/*
 * writer.h: the daemon's one writer, a thread that owns a store handle of
 * its own and commits for everyone (group commit).
 *
 * The loop thread submits writes; the thread takes everything queued since
 * its last commit and appends it in one transaction (each request in its own
 * savepoint, so one request's failure fails only that request), so at `full`
 * durability a batch costs one fsync however many commands it carries. Then
 * it writes any snapshots handed with the batch, in a transaction of their
 * own, and reports every write back on the loop thread, in submission order,
 * through the done callback. The loop never waits for the disk.
 */
#ifndef EBB_WRITER_H
#define EBB_WRITER_H

#include <stdint.h>
#include <uv.h>

#include "error.h"
#include "runtime.h"
#include "store.h"

typedef struct ebb_writer ebb_writer;

typedef struct ebb_write {
  ebb_append *req;                /* NULL: nothing to append (a snapshot-only write) */
  ebb_snapshot_batch *snapshots;  /* NULL or snapshots to write after the batch; the writer
                                     frees them */
  void *ud;                       /* the submitter's */
  struct ebb_write *next;         /* the writer's */
} ebb_write;

/* Called on the loop thread for every write once it is committed (or failed:
 * see req->err), in submission order. The write is the submitter's again. */
typedef void (*ebb_writer_done)(void *ud, ebb_write *w);
/* Called on the loop thread after the done callbacks of everything the
 * writer had finished when the loop woke (one or more batches): the place
 * for work due once per commit rather than once per write, such as waking
 * whoever follows the head. NULL: none. */
typedef void (*ebb_writer_reported)(void *ud);

/* Bucket upper bounds (events per batch) of the batch size histogram. */
#define EBB_WRITER_BATCH_BUCKETS 8
extern const double ebb_writer_batch_bounds[EBB_WRITER_BATCH_BUCKETS];
#define EBB_WRITER_TIME_BUCKETS 10
extern const double ebb_writer_time_bounds[EBB_WRITER_TIME_BUCKETS]; /* seconds */

typedef struct ebb_writer_stats {
  uint64_t batches, requests, events, failed_batches, snapshots;
  uint64_t batch_hist[EBB_WRITER_BATCH_BUCKETS + 1]; /* requests per batch; last: +Inf */
  uint64_t commit_hist[EBB_WRITER_TIME_BUCKETS + 1];
  double commit_seconds;        /* sum of commit times (begin to durable) */
  uint64_t syncs;               /* fsyncs the store issued (see ebb_store_sync_stats) */
  double sync_seconds;
} ebb_writer_stats;

/* Opens a store handle on so->dir and starts the thread. done and reported run on loop. */
int ebb_writer_start(ebb_writer **out, uv_loop_t *loop, const ebb_store_options *so,
                     ebb_writer_done done, ebb_writer_reported reported, void *ud,
                     ebb_error *err);
/* Queues a write (loop thread). */
void ebb_writer_submit(ebb_writer *w, ebb_write *write);
/* Writes queued but not yet reported. */
size_t ebb_writer_pending(const ebb_writer *w);
void ebb_writer_stats_get(ebb_writer *w, ebb_writer_stats *out);
enum ebb_writer_health {
  EBB_WRITER_OK = 0,
  EBB_WRITER_FAILING = 1, /* the last commit failed (e.g. disk full); writes are still tried */
  EBB_WRITER_STOPPED = 2  /* an fsync failed: no write is taken again until a restart */
};
/* The writer's state, and why when it is not OK (any thread). */
int ebb_writer_health(ebb_writer *w, char *reason, size_t size);
/* Writes and reports everything submitted, stops the thread, closes its
 * store; the writer's memory goes once the loop has run its close callback.
 * No done callback runs after it returns except for writes submitted
 * before it: those are all reported before it returns. NULL-safe. */
void ebb_writer_stop(ebb_writer *w);

#endif
