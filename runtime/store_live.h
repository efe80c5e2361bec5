/*
 * store_live.h: a daemon's live view of a store that other processes write
 * too (PostgreSQL): the watch and leader links of store.h driven on the
 * daemon's libuv loop, reconnected with backoff, with their state for
 * /health and /metrics.
 *
 * on_head is called (on the loop) with the store's head after every commit
 * any process made, and after every reconnect: the same path the daemon
 * takes for its own writer's reports. on_leader is called when this daemon
 * becomes the leader (1) or stops being it (0): singleton work (reactors,
 * the NATS publisher) starts and stops there, and asks ebb_live_leader
 * before each piece of it.
 *
 * For a store of one process (SQLite) ebb_live_start gives NULL: there is
 * nothing to watch, and the daemon is always the leader (ebb_live_leader
 * answers 1 for NULL).
 */
#ifndef EBB_STORE_LIVE_H
#define EBB_STORE_LIVE_H

#include <stdint.h>
#include <uv.h>

#include "error.h"

typedef struct ebb_live ebb_live;

typedef struct ebb_live_options {
  uv_loop_t *loop;
  const char *store;                       /* the store setting (a URI) */
  void (*on_head)(void *ud, int64_t head); /* NULL: none */
  void (*on_leader)(void *ud, int leader); /* NULL: none */
  void *ud;
} ebb_live_options;

typedef struct ebb_live_status {
  int connected;         /* the watch link is up */
  int leader;
  uint64_t reconnects;   /* links that broke and were started again */
  uint64_t wakeups;      /* heads read after a notification or reconnect */
  char error[1024];       /* the last failure of a link ("" when none since it came up) */
} ebb_live_status;

/* Starts connecting both links; *out NULL when the store is not shared. */
int ebb_live_start(ebb_live **out, const ebb_live_options *opt, ebb_error *err);
/* Drops the links (and the leader lock); the memory goes with the loop's close callbacks. NULL-safe. */
void ebb_live_stop(ebb_live *l);
/* 1 while this daemon holds the leader lock; 1 for NULL (a store of one process). */
int ebb_live_leader(const ebb_live *l);
/* NULL l: connected, leader. */
void ebb_live_status_get(const ebb_live *l, ebb_live_status *out);

#endif
