/*
 * daemon.h: `ebb serve`, the daemon: one process owning one data directory,
 * serving the HTTP API of README.md on a libuv loop.
 *
 * Threads: the loop thread parses requests, runs Lua (decides commands,
 * folds state, upcasts) and reads the store; the writer thread (writer.h)
 * commits. Commands for one stream queue behind each other, so each is
 * decided on the state its predecessor committed; commands for different
 * streams are decided while earlier ones are being committed, and their
 * appends share commits.
 *
 * This header is the daemon's internal interface between daemon.c (life
 * cycle and routes), sse.c (subscriptions) and metrics.c; the public entry
 * point is ebb_daemon_run.
 */
#ifndef EBB_DAEMON_H
#define EBB_DAEMON_H

#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "error.h"
#include "http.h"
#include "lock.h"
#include "notify.h"
#include "projection.h"
#include "publisher.h"
#include "reactor.h"
#include "readers.h"
#include "runtime.h"
#include "store_live.h"
#include "strmap.h"
#include "writer.h"

/* Runs the daemon until SIGTERM or SIGINT has drained it. 0 after a clean
 * shutdown; otherwise an EBB_E* code with err filled (cannot start). */
int ebb_daemon_run(const ebb_config *cfg, ebb_error *err);

/* ---------------------------------------------------------------- internal */

enum { ROUTE_COMMANDS, ROUTE_APPEND, ROUTE_STREAM, ROUTE_EVENTS, ROUTE_SUBSCRIBE, ROUTE_AGGREGATE,
       ROUTE_HEALTH, ROUTE_METRICS, ROUTE_PROJECTIONS, ROUTE_QUERY, ROUTE_PROJECTION_CONTROL,
       ROUTE_REACTORS, ROUTE_STREAMS, ROUTE_MODULES, ROUTE_CONSOLE, ROUTE_OTHER, N_ROUTES };
extern const char *const ebb__route_names[N_ROUTES];

#define N_STATUS_SLOTS 24

typedef struct ebb_metrics {
  uint64_t requests[N_ROUTES][N_STATUS_SLOTS]; /* by route and status (see status slots) */
  int statuses[N_STATUS_SLOTS];                /* the status each slot counts (0: free) */
  uint64_t commands[16];                       /* by result: 0 ok, else -code */
  uint64_t events_appended;
  uint64_t sse_events_sent, sse_overflows;
  uint64_t reloads, reload_failures;
} ebb_metrics;

typedef struct ebb_subscriber ebb_subscriber;

typedef struct ebb_daemon {
  const ebb_config *cfg;
  uv_loop_t loop;
  ebb_http_server *http;
  ebb_runtime *rt;
  ebb_readers *readers;         /* runtimes for the read routes, on libuv's thread pool */
  int remote_store;             /* reads are round trips (PostgreSQL): commands prefetch */
  struct job *pre_head, *pre_tail; /* commands waiting for the next prefetch batch */
  struct prefetch_batch *pre_batches; /* EBB_PREFETCH_BATCHES, each idle or out */
  size_t reads;                 /* read routes running there */
  ebb_writer *writer;
  ebb_projections *projections;
  ebb_reactors *reactors;
  ebb_live *live;               /* a shared store's watch and leader links; NULL: not shared */
  ebb_publisher *publisher;     /* NULL without the nats setting */
  uv_fs_event_t watch;          /* the projections directory */
  int watching;
  uv_timer_t rescan_timer;      /* debounces a burst of file events into one rescan */
  struct pquery *parked;        /* queries waiting for their after= position */
  ebb_lock *lock;
  uv_signal_t sigterm, sigint, sighup;
  uv_timer_t heartbeat, pump_timer, shutdown_timer;
  uv_idle_t pump_idle;
  ebb_notifier notifier;        /* systemd's READY=1, STATUS=, STOPPING=1, WATCHDOG=1 */
  int pump_scheduled;
  ebb_strmap *queues;           /* stream -> struct stream_queue: commands waiting their turn */
  size_t jobs;                  /* commands and appends accepted and not yet answered */
  struct job *spare_jobs;       /* answered jobs kept for reuse */
  size_t n_spare_jobs;
  ebb_subscriber *subscribers;  /* a list */
  size_t n_subscribers;
  int draining, stopped;
  int64_t final_deadline_ms;
  int64_t head;                 /* the last committed position known to the loop */
  int64_t notified_head;        /* the head subscribers and projections were last told of */
  int64_t started_ms;
  char url[300];
  void *parser;                 /* lua_State for parsing request bodies */
  ebb_metrics m;
} ebb_daemon;

/* The JSON error body for an ebb_error, and its HTTP status. */
int ebb__status_of(int code);
void ebb__error_json(const ebb_error *err, ebb_buf *out);

/* sse.c */
void ebb__sse_start(ebb_daemon *d, ebb_http_conn *c, const char *query, int64_t after,
                    const char *category, const char *type);
void ebb__sse_pump(ebb_daemon *d);          /* delivers what was committed since */
void ebb__sse_heartbeat(ebb_daemon *d);
void ebb__sse_close_all(ebb_daemon *d, const char *why);

/* console.c: GET / (a redirect) and GET /console/... (the page's files). Returns the status answered. */
int ebb__console_serve(ebb_http_conn *c, const ebb_http_request *req);
/* browse.c: the body of GET /streams; of GET /modules. */
int ebb__streams_json(ebb_store *s, const ebb_list_streams *q, ebb_buf *out, ebb_error *err);
void ebb__modules_json(ebb_daemon *d, ebb_buf *out);

/* metrics.c */
void ebb__metrics_count_request(ebb_metrics *m, int route, int status);
void ebb__metrics_render(ebb_daemon *d, ebb_buf *out);

#endif
