/*
 * reactor.h: the reactor host. Reactors are Lua modules in reactors/ that
 * turn events into commands: "when an order is confirmed, charge its
 * account; if the charge is refused, cancel the order". Each follows the
 * global order with the same follower as projections (follower.h), runs on
 * the daemon's loop in a sandbox of its own, and issues the commands its
 * handlers return through the daemon's command pipeline, exactly as HTTP
 * commands go.
 *
 * Exactly once: every command a reactor issues carries a command id made
 * from the reactor's name, the triggering event's id and the command's index
 * (a schedule's from its key), so a redelivery after a crash is answered
 * from the store and never applied twice. The checkpoint moves past an event
 * only once all its commands (and those of the events before it) are
 * committed or recorded as rejected, in one transaction with the schedules
 * their handlers set or cancelled. Events are handled ahead of the checkpoint
 * (a batch at most), so that their commands share the daemon's group commits.
 *
 * Where that state lives: DATA/reactors.db, an SQLite file beside the store,
 * synced as the store is (durability full: fsync at every commit). One row
 * per reactor holds its checkpoint and fingerprint; schedules, skipped
 * positions and recorded rejections have a table each.
 *
 * The host owns the modules' sandboxes, that database, a timer for the
 * earliest schedule, a retry timer per reactor, and a watch on the
 * directory (hot reload: a broken edit keeps the old code running).
 */
#ifndef EBB_REACTOR_H
#define EBB_REACTOR_H

#include <stdint.h>
#include <uv.h>

#include "buf.h"
#include "error.h"
#include "runtime.h"

typedef struct ebb_reactors ebb_reactors;

/* The outcome of an issued command, on the loop: err->code 0 (committed, or
 * answered from the store) or the command's error. */
typedef void (*ebb_reactor_issued)(void *ud, const ebb_error *err);
/* Issues a command through the host's pipeline; done runs exactly once. */
typedef void (*ebb_reactor_issue_fn)(void *issue_ud, const ebb_command *cmd,
                                     ebb_reactor_issued done, void *ud);

typedef struct ebb_reactors_options {
  uv_loop_t *loop;
  ebb_runtime *rt;             /* the loop's runtime: reads the store and upcasts */
  const char *data_dir;
  const char *reactors_dir;
  const char *lua_dir;         /* NULL: the built-in default */
  int durability;              /* enum ebb_durability: how reactors.db syncs */
  size_t memory_limit;         /* per reactor; 0: the sandbox default */
  int64_t instruction_budget;  /* per handler call; 0: the sandbox default */
  ebb_reactor_issue_fn issue;
  void *issue_ud;
} ebb_reactors_options;

/* Opens DATA/reactors.db, loads every module and starts following. A module
 * that fails to load is reported in its status, not an error here. */
int ebb_reactors_start(ebb_reactors **out, const ebb_reactors_options *opt, ebb_error *err);
/* Stops issuing; frees everything once the commands in flight have been
 * answered (the daemon answers them all when its writer stops). NULL-safe. */
void ebb_reactors_stop(ebb_reactors *h);

/* The leader hook. Reactors run only while active: with one daemon on a
 * store (SQLite) it is always; with several daemons on one PostgreSQL store
 * the holder of the store's leader lock makes its reactors active and the
 * others inactive. Starts active. */
void ebb_reactors_set_active(ebb_reactors *h, int active);

/* Events are committed up to position head. */
void ebb_reactors_notify(ebb_reactors *h, int64_t head);
/* The directory changed: reload changed modules, add new ones, drop removed ones. */
void ebb_reactors_rescan(ebb_reactors *h);

/* Status JSON: of every reactor (an array) when name is NULL, else of one
 * (returns 0 if there is none). */
int ebb_reactors_status(ebb_reactors *h, const char *name, ebb_buf *out);
/* The pending schedules of a reactor as a JSON array; 0 if there is no such reactor. */
int ebb_reactors_schedules(ebb_reactors *h, const char *name, ebb_buf *out);
/* "retry" or "skip" a faulted reactor: an HTTP status and its body (the
 * status, or an error). */
int ebb_reactors_control(ebb_reactors *h, const char *name, const char *action, ebb_buf *out);
/* Prometheus lines for /metrics. */
void ebb_reactors_metrics(ebb_reactors *h, ebb_buf *out);

/* For `ebb check`: loads and validates every module of the directory. One
 * line per problem in report, the good ones' names as JSON strings
 * (comma-separated) in names if not NULL; returns the number of problems. */
int ebb_reactors_check(const char *reactors_dir, const char *lua_dir, ebb_buf *report,
                       ebb_buf *names);

#endif
