/*
 * projection.h: the projection host. One thread runs every projection
 * module of a directory: each builds its read model, an SQLite file of its
 * own, from the events in global order, in batches whose read-model writes
 * and new checkpoint commit in one transaction, so every event takes effect
 * exactly once, across crashes.
 *
 * The host owns its thread, a store connection for reading (with the
 * aggregate modules loaded for upcasting), one sandboxed Lua state per
 * projection and the read-model connections. The daemon's loop talks to it
 * through this interface only: it tells the host how far the store has
 * committed, asks it to rescan the directory, queues queries and controls
 * whose answers come back on the loop, and reads a published copy of every
 * projection's status.
 *
 * Read models live in DATA/projections/NAME/: one database per built
 * version, and a file `current` naming the one that answers queries.
 */
#ifndef EBB_PROJECTION_H
#define EBB_PROJECTION_H

#include <stdint.h>
#include <uv.h>

#include "buf.h"
#include "error.h"

typedef struct ebb_projections ebb_projections;

typedef struct ebb_projections_options {
  uv_loop_t *loop;
  const char *data_dir;
  const char *store;           /* NULL: SQLite in data_dir; else a PostgreSQL URI */
  const char *projections_dir;
  const char *aggregates_dir;  /* for upcasting */
  const char *lua_dir;         /* NULL: the built-in default */
  size_t memory_limit;         /* per projection; 0: the sandbox default */
  int64_t instruction_budget;  /* per batch of events or query; 0: the sandbox default */
  int64_t batch;               /* events per transaction; 0: 1000 */
  void (*on_progress)(void *ud); /* on the loop, after positions or states changed */
  void *ud;
} ebb_projections_options;

/* Loads every module of the directory and starts the thread, which catches
 * up from the checkpoints. A module that fails to load is reported in the
 * status (and the log), not an error here. */
int ebb_projections_start(ebb_projections **out, const ebb_projections_options *opt,
                          ebb_error *err);
/* Stops the thread after the batch in progress (read models are consistent
 * at every commit) and frees everything once the loop ran the close
 * callback. Pending queries are answered 503. NULL-safe. */
void ebb_projections_stop(ebb_projections *h);

/* Loop: events are committed up to position `head`. */
void ebb_projections_notify(ebb_projections *h, int64_t head);
/* Loop: the directory changed; the host rescans it (changed, added and
 * removed modules) on its thread. */
void ebb_projections_rescan(ebb_projections *h);

/* The answer to a query or a control, on the loop: an HTTP status and a
 * malloc'd JSON body that the callee owns. */
typedef void (*ebb_projection_answer)(void *ud, int status, char *body);

/* Runs queries[query](db, args) of the projection's active read model with
 * args (a JSON object text); answers 200 with the result as JSON, 404 for
 * an unknown projection or query, 500 for a query error, 503 while only a
 * rebuild exists. */
void ebb_projections_query(ebb_projections *h, const char *name, const char *query,
                           const char *args_json, ebb_projection_answer cb, void *ud);
/* action: "retry" (resume a faulted projection), "skip" (skip the event it
 * faulted on, recorded in its read model, and resume), "rebuild" (a
 * blue/green rebuild from position 0). Answers 200 with the status. */
void ebb_projections_control(ebb_projections *h, const char *name, const char *action,
                             ebb_projection_answer cb, void *ud);

/* The published status, as JSON: of every projection (an array) when name
 * is NULL, else of one ({...}; returns 0 if there is none). */
int ebb_projections_status(ebb_projections *h, const char *name, ebb_buf *out);
/* The position of a projection's active read model (-1: no such
 * projection, or none that answers yet). */
int64_t ebb_projections_position(ebb_projections *h, const char *name);
/* Prometheus lines for /metrics. */
void ebb_projections_metrics(ebb_projections *h, ebb_buf *out);

/* For `ebb check`: loads and validates every module of the directory, and
 * runs its setup on a scratch in-memory database (no read model is
 * touched). Appends one line per problem to report and, if names is not
 * NULL, the JSON strings of the good ones (comma-separated); returns the
 * number of problems. */
int ebb_projections_check(const char *projections_dir, const char *lua_dir, ebb_buf *report,
                          ebb_buf *names);

#endif
