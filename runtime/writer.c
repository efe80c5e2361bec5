/*
 * writer.c: group commit on a thread of its own (see writer.h).
 *
 * Two queues cross the threads, both guarded by one mutex: `in` (submitted,
 * not yet taken) and `out` (written, not yet reported). The thread sleeps on
 * a condition variable while `in` is empty; the loop learns of finished
 * batches through a uv_async_t. Whatever arrived while a commit was running
 * goes into the next one, so batches grow exactly when the disk is the
 * bottleneck and stay at one request when it is not.
 *
 * The loop does not hand each write over as it is submitted: it gathers
 * what one turn of the loop submits (`soon`, loop thread only) and hands it
 * over at once from an idle callback, the next thing the loop runs. Woken
 * per write, the thread would commit the first write of a turn alone while
 * the loop was still deciding the rest: one lock and one wake-up per turn
 * instead of per write, and batches as large as what the loop had to give.
 *
 * Storage failures. A commit that fails as a whole (disk full, I/O error)
 * fails every request of its batch with storage_error, and the writer
 * reopens its store handle, discarding whatever SQLite believed of the file;
 * the next batch tries again, so writes resume when space comes back. An
 * fsync that fails is different: the kernel may have dropped the pages it
 * could not write and will report success for the next fsync (PostgreSQL's
 * 2018 "fsyncgate"), so nothing written since can be trusted to be on disk.
 * The writer then never commits again: every later write fails with
 * `unavailable`, and /health says why (ebb_writer_health), until ebb is
 * restarted and SQLite's recovery reads back what the disk really holds.
 */
#include "writer.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "log.h"

#define MAX_BATCH 1024
/* The store's commits do not checkpoint (manual_checkpoints): the thread
 * does, after reporting a batch once the WAL holds CHECKPOINT_PAGES not yet
 * copied, or after IDLE_MS without work. Answers never wait for a checkpoint,
 * and a larger WAL lets a page written by many commits be copied once. */
#define CHECKPOINT_PAGES 8192
#define IDLE_MS 200
/* A turn that submits this many hands them over without waiting for its
 * end, so the thread can start committing while the loop decides the rest. */
#define HANDOVER_MAX 32

const double ebb_writer_batch_bounds[EBB_WRITER_BATCH_BUCKETS] = {1, 2, 4, 8, 16, 32, 64, 256};
const double ebb_writer_time_bounds[EBB_WRITER_TIME_BUCKETS] = {0.0001, 0.00025, 0.0005, 0.001,
                                                                0.0025, 0.005,   0.01,   0.025,
                                                                0.05,   0.1};

struct ebb_writer {
  uv_loop_t *loop;
  uv_async_t async;
  uv_idle_t handover; /* runs once per turn of the loop while `soon` holds writes */
  ebb_write *soon_head, *soon_tail; /* submitted this turn (loop thread only) */
  size_t n_soon;
  ebb_store *store;
  ebb_writer_done done;
  ebb_writer_reported reported;
  void *ud;
  pthread_t thread;
  int started;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  ebb_write *in_head, *in_tail;
  ebb_write *out_head, *out_tail;
  size_t pending; /* submitted, not yet reported (loop thread only) */
  int stopping;
  ebb_writer_stats stats; /* under mu */
  ebb_append *batch;      /* the thread's scratch copies of the requests */
  ebb_store_options so;   /* to reopen the store; so.dir is ours */
  int health;             /* enum ebb_writer_health, under mu */
  char reason[1536];      /* why, when health is not OK; under mu */
};

static void set_health(ebb_writer *w, int health, const char *why, const char *detail) {
  pthread_mutex_lock(&w->mu);
  int changed = w->health != health;
  w->health = health;
  snprintf(w->reason, sizeof w->reason, "%s%s", why, detail);
  pthread_mutex_unlock(&w->mu);
  /* Once per change, not once per failed batch. */
  if (changed)
    ebb_log(health == EBB_WRITER_STOPPED ? EBB_LOG_ERROR : EBB_LOG_WARN,
            health == EBB_WRITER_STOPPED ? "store failed: writes stopped" : "store commit failed",
            "reason", why, "detail", detail, NULL);
}

/* After a commit failed as a whole: drop the handle and open a new one, so
 * nothing SQLite cached of the failed transaction survives. */
static void reopen(ebb_writer *w) {
  ebb_store_close(w->store);
  w->store = NULL;
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_store_open(&w->store, &w->so, &err) != 0) {
    /* A server that cannot be reached now (PostgreSQL restarting) may be
     * back for the next batch, which opens the store again first. */
    if (err.code == EBB_EUNAVAIL)
      set_health(w, EBB_WRITER_FAILING, "the store is unavailable: ", err.message);
    else
      set_health(w, EBB_WRITER_STOPPED, "the store cannot be reopened after a failed commit: ",
                 err.message);
  }
  ebb_error_clear(&err);
}

static void stop_after_failed_sync(ebb_writer *w) {
  set_health(w, EBB_WRITER_STOPPED,
             "an fsync of the store failed: what was written since the last good fsync may "
             "not be on disk, so no more writes are taken; restart ebb once the disk is checked",
             "");
}

/* Fails a batch that the store will not take (health STOPPED). */
static void refuse_batch(ebb_writer *w, ebb_write *first) {
  char reason[sizeof w->reason];
  pthread_mutex_lock(&w->mu);
  snprintf(reason, sizeof reason, "%s", w->reason);
  pthread_mutex_unlock(&w->mu);
  for (ebb_write *x = first; x; x = x->next) {
    if (x->req) {
      memset(&x->req->result, 0, sizeof x->req->result);
      ebb_error_clear(&x->req->err);
      ebb_error_set(&x->req->err, EBB_EUNAVAIL, "not written: %s", reason);
    }
    if (x->snapshots) {
      ebb_snapshot_batch_free(x->snapshots);
      x->snapshots = NULL;
    }
  }
}

static void push(ebb_write **head, ebb_write **tail, ebb_write *w) {
  w->next = NULL;
  if (*tail) (*tail)->next = w;
  else *head = w;
  *tail = w;
}

/* Counts v in the first bucket whose bound it does not exceed (hist[n]: above all). */
static void count(uint64_t *hist, const double *bounds, size_t n, double v) {
  size_t i = 0;
  while (i < n && v > bounds[i]) i++;
  hist[i]++;
}

/* Commits one batch: the requests in one transaction, then the snapshots. */
static void write_batch(ebb_writer *w, ebb_write *first) {
  pthread_mutex_lock(&w->mu);
  int stopped = w->health == EBB_WRITER_STOPPED;
  pthread_mutex_unlock(&w->mu);
  if (!stopped && w->store == NULL) reopen(w);
  if (stopped || w->store == NULL) {
    refuse_batch(w, first);
    return;
  }
  uint64_t sync_failures = ebb__store_sync_failures();
  size_t n = 0, events = 0;
  for (ebb_write *x = first; x; x = x->next)
    if (x->req) {
      w->batch[n++] = *x->req;
      events += x->req->n;
    }
  uint64_t t0 = ebb_clock_mono_ns();
  int failed = 0;
  if (n) {
    ebb_error err;
    ebb_error_init(&err);
    failed = ebb_store_append(w->store, w->batch, n, &err) != 0;
    if (failed) {
      set_health(w, EBB_WRITER_FAILING, "the last commit failed: ", err.message);
    } else {
      pthread_mutex_lock(&w->mu);
      if (w->health == EBB_WRITER_FAILING) w->health = EBB_WRITER_OK, w->reason[0] = '\0';
      pthread_mutex_unlock(&w->mu);
    }
    ebb_error_clear(&err);
    size_t i = 0;
    for (ebb_write *x = first; x; x = x->next)
      if (x->req) {
        x->req->result = w->batch[i].result;
        x->req->err = w->batch[i].err; /* details, if any, move with it */
        i++;
      }
  }
  double secs = (double)(ebb_clock_mono_ns() - t0) / 1e9;
  uint64_t snaps = 0;
  for (ebb_write *x = first; x; x = x->next)
    if (x->snapshots) {
      ebb_error err;
      ebb_error_init(&err);
      /* Snapshots can always be taken again: a failed write only drops them. */
      if (ebb_snapshot_batch_write(x->snapshots, w->store, &err) == 0)
        snaps += ebb_snapshot_batch_size(x->snapshots);
      ebb_error_clear(&err);
      ebb_snapshot_batch_free(x->snapshots);
      x->snapshots = NULL;
    }
  if (ebb__store_sync_failures() != sync_failures) {
    /* Never retried, never trusted: see the top of this file. A commit that
     * succeeded had its own fsync succeed, so its answers stand. */
    stop_after_failed_sync(w);
  } else if (failed) {
    reopen(w);
  }
  pthread_mutex_lock(&w->mu);
  if (n) {
    w->stats.batches++;
    w->stats.requests += n;
    w->stats.events += failed ? 0 : events;
    w->stats.failed_batches += failed;
    count(w->stats.batch_hist, ebb_writer_batch_bounds, EBB_WRITER_BATCH_BUCKETS, (double)n);
    count(w->stats.commit_hist, ebb_writer_time_bounds, EBB_WRITER_TIME_BUCKETS, secs);
    w->stats.commit_seconds += secs;
  }
  w->stats.snapshots += snaps;
  pthread_mutex_unlock(&w->mu);
}

/* WAL pages a checkpoint would copy, with w->mu held: none once the store
 * failed (after a failed fsync the WAL's pages are not to be trusted, so
 * they are never copied into the database) or has no handle. */
static int64_t pages_to_copy(ebb_writer *w) {
  if (w->store == NULL || w->health == EBB_WRITER_STOPPED) return 0;
  return ebb_store_wal_pages(w->store);
}

/* With w->mu held; returns with it held. */
static void checkpoint(ebb_writer *w) {
  pthread_mutex_unlock(&w->mu);
  ebb_error err;
  ebb_error_init(&err);
  uint64_t sync_failures = ebb__store_sync_failures();
  /* A checkpoint that fails for another reason loses nothing (the WAL keeps
   * it all): it is tried again later. */
  ebb_store_checkpoint(w->store, &err);
  ebb_error_clear(&err);
  /* But a failed fsync, of the WAL or of the database, is the same as in a
   * commit: what it covered may be gone, and a retry that succeeds would
   * copy whatever the WAL now holds into the database. */
  if (ebb__store_sync_failures() != sync_failures) stop_after_failed_sync(w);
  pthread_mutex_lock(&w->mu);
}

static void *writer_main(void *arg) {
  ebb_writer *w = arg;
  pthread_mutex_lock(&w->mu);
  for (;;) {
    while (w->in_head == NULL && !w->stopping) {
      if (pages_to_copy(w) == 0) {
        pthread_cond_wait(&w->cv, &w->mu);
        continue;
      }
      struct timespec until;
      clock_gettime(CLOCK_REALTIME, &until);
      until.tv_nsec += IDLE_MS * 1000000L;
      if (until.tv_nsec >= 1000000000L) until.tv_sec++, until.tv_nsec -= 1000000000L;
      if (pthread_cond_timedwait(&w->cv, &w->mu, &until) == ETIMEDOUT && w->in_head == NULL &&
          pages_to_copy(w) > 0)
        checkpoint(w);
    }
    if (w->in_head == NULL) break; /* stopping, and nothing left */
    /* Take up to MAX_BATCH requests; the rest waits for the next commit. */
    ebb_write *first = w->in_head, *last = first;
    size_t n = last->req != NULL;
    while (last->next && n + (last->next->req != NULL) <= MAX_BATCH) {
      last = last->next;
      n += last->req != NULL;
    }
    w->in_head = last->next;
    if (w->in_head == NULL) w->in_tail = NULL;
    last->next = NULL;
    pthread_mutex_unlock(&w->mu);
    write_batch(w, first);
    pthread_mutex_lock(&w->mu);
    if (w->out_tail) w->out_tail->next = first;
    else w->out_head = first;
    w->out_tail = last;
    uv_async_send(&w->async);
    if (pages_to_copy(w) >= CHECKPOINT_PAGES) checkpoint(w);
  }
  pthread_mutex_unlock(&w->mu);
  return NULL;
}

/* Loop thread: reports finished writes in order. */
static void report(ebb_writer *w) {
  pthread_mutex_lock(&w->mu);
  ebb_write *x = w->out_head;
  w->out_head = w->out_tail = NULL;
  pthread_mutex_unlock(&w->mu);
  if (x == NULL) return;
  while (x) {
    ebb_write *next = x->next;
    x->next = NULL;
    w->pending--;
    w->done(w->ud, x);
    x = next;
  }
  if (w->reported) w->reported(w->ud);
}

static void on_async(uv_async_t *a) {
  report(a->data);
}

int ebb_writer_start(ebb_writer **out, uv_loop_t *loop, const ebb_store_options *so,
                     ebb_writer_done done, ebb_writer_reported reported, void *ud,
                     ebb_error *err) {
  *out = NULL;
  ebb_writer *w = calloc(1, sizeof *w);
  if (w == NULL || (w->batch = calloc(MAX_BATCH, sizeof *w->batch)) == NULL) {
    free(w);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  }
  w->loop = loop;
  w->done = done;
  w->reported = reported;
  w->ud = ud;
  w->so = *so;
  w->so.manual_checkpoints = 1;
  if ((w->so.dir = strdup(so->dir)) == NULL) {
    free(w->batch);
    free(w);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  }
  if (ebb_store_open(&w->store, &w->so, err) != 0) {
    free((char *)w->so.dir);
    free(w->batch);
    free(w);
    return err->code;
  }
  pthread_mutex_init(&w->mu, NULL);
  pthread_cond_init(&w->cv, NULL);
  uv_async_init(loop, &w->async, on_async);
  w->async.data = w;
  uv_idle_init(loop, &w->handover);
  w->handover.data = w;
  if (pthread_create(&w->thread, NULL, writer_main, w) != 0) {
    ebb_error_set(err, EBB_ENOMEM, "cannot start the writer thread");
    ebb_writer_stop(w);
    return err->code;
  }
  w->started = 1;
  *out = w;
  return 0;
}

/* Loop thread: moves what this turn submitted into the thread's queue. */
static void hand_over(ebb_writer *w) {
  uv_idle_stop(&w->handover);
  if (w->soon_head == NULL) return;
  pthread_mutex_lock(&w->mu);
  if (w->in_tail) w->in_tail->next = w->soon_head;
  else w->in_head = w->soon_head;
  w->in_tail = w->soon_tail;
  pthread_cond_signal(&w->cv);
  pthread_mutex_unlock(&w->mu);
  w->soon_head = w->soon_tail = NULL;
  w->n_soon = 0;
}

static void on_handover(uv_idle_t *h) {
  hand_over(h->data);
}

void ebb_writer_submit(ebb_writer *w, ebb_write *write) {
  if (w->soon_head == NULL) uv_idle_start(&w->handover, on_handover);
  push(&w->soon_head, &w->soon_tail, write);
  w->pending++;
  if (++w->n_soon >= HANDOVER_MAX) hand_over(w);
}

size_t ebb_writer_pending(const ebb_writer *w) {
  return w->pending;
}

void ebb_writer_stats_get(ebb_writer *w, ebb_writer_stats *out) {
  pthread_mutex_lock(&w->mu);
  *out = w->stats;
  pthread_mutex_unlock(&w->mu);
  ebb_store_sync_stats(&out->syncs, &out->sync_seconds);
}

int ebb_writer_health(ebb_writer *w, char *reason, size_t size) {
  pthread_mutex_lock(&w->mu);
  int health = w->health;
  snprintf(reason, size, "%s", w->reason);
  pthread_mutex_unlock(&w->mu);
  return health;
}

static void on_close(uv_handle_t *h) {
  ebb_writer *w = h->data;
  free((char *)w->so.dir);
  free(w->batch);
  free(w);
}

static void on_handover_close(uv_handle_t *h) {
  ebb_writer *w = h->data;
  uv_close((uv_handle_t *)&w->async, on_close);
}

void ebb_writer_stop(ebb_writer *w) {
  if (w == NULL) return;
  if (w->started) {
    hand_over(w); /* this turn's writes, which the thread writes before it stops */
    pthread_mutex_lock(&w->mu);
    w->stopping = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    report(w); /* what the last batches wrote */
  }
  ebb_store_close(w->store);
  w->store = NULL;
  pthread_cond_destroy(&w->cv);
  pthread_mutex_destroy(&w->mu);
  uv_close((uv_handle_t *)&w->handover, on_handover_close);
}
