/*
 * reactor_internal.h: what the reactor host's four files share (internal):
 * reactor.c (following, issuing, life cycle, status), reactor_schedule.c
 * (firing schedules, and compensating a refused one),
 * reactor_module.c (the Lua side: loading and validating a module, running
 * its handlers, reading the commands and schedules they make) and
 * reactor_db.c (DATA/reactors.db: checkpoints, schedules, skipped positions,
 * recorded rejections).
 */
#ifndef EBB_REACTOR_INTERNAL_H
#define EBB_REACTOR_INTERNAL_H

#include <lua.h>
#include <sqlite3.h>
#include <stdint.h>
#include <uv.h>

#include "buf.h"
#include "error.h"
#include "follower.h"
#include "reactor.h"
#include "sandbox.h"

enum { ST_CATCHING_UP = EBB_FOLLOW_CATCHING_UP, ST_LIVE = EBB_FOLLOW_LIVE,
       ST_FAULTED = EBB_FOLLOW_FAULTED, ST_STOPPED = EBB_FOLLOW_STOPPED };

/* ---------------------------------------------------------------- types */

typedef struct reactor reactor;
typedef struct work work;
struct firing;

/* A command to issue, and where it stands. */
typedef struct rcommand {
  work *w;                    /* the work it belongs to (NULL: a schedule's, not issued as such) */
  char *aggregate, *id, *type, *data; /* data: JSON object text */
  char *command_id;
  int state;                  /* C_PENDING, C_FLIGHT, C_RETRY, C_DONE */
  int index;                  /* in the event's list (compensations: their parent's) */
  int attempts;
} rcommand;
/* C_PENDING: not issued yet (new, or held behind an earlier command to the
 * same aggregate); C_RETRY: failed, waiting for the backoff to issue again. */
enum { C_PENDING, C_FLIGHT, C_RETRY, C_DONE };

typedef struct schedop {
  char *key;
  int64_t at_ms;              /* < 0: a cancel */
  rcommand cmd;
} schedop;

typedef struct rejection {
  char *command_id, *aggregate, *id, *type, *error;
} rejection;

/* What one event's handlers asked for (or, for a fired schedule that was
 * rejected, what rejected[type] asked for). */
struct work {
  reactor *r;
  struct firing *fi;          /* a fired schedule's compensations, or NULL */
  const ebb_event *e;
  rcommand **cmds;
  size_t n_cmds;
  schedop *ops;
  size_t n_ops;
  rejection *rej;
  size_t n_rej;
  int n_made;                 /* commands made so far (their indexes) */
  const char *parent_id;      /* a compensation's: the rejected command's id */
  char *correlation_id;       /* the event's, or NULL: it starts a chain */
  int faulted;                /* its rejected handler failed, or a command was malformed */
};

struct reactor {
  struct ebb_reactors *h;
  char *name, *path;
  uint64_t code_hash;
  ebb_sandbox *sb;
  int module_ref;
  ebb_follower f;
  int64_t written;            /* the checkpoint last written */
  int state;
  char *fault;
  int64_t fault_position;
  char *load_error;
  uint64_t load_failures, reloads;
  int loaded_once;
  ebb_follower_batch batch;
  int have_batch;
  /* The pipeline: works[i] is what the handler of the batch's event i asked
   * for. Events [done, at) are handled and not yet checkpointed; their
   * commands are in flight, held or answered. */
  work *works;
  size_t at;                  /* the next event of the batch to handle */
  size_t done;                /* events checkpointed (their works cleared) */
  size_t flying;              /* commands issued and not answered (its firings' too) */
  size_t waiting;             /* commands waiting for the backoff to be issued again */
  uv_timer_t retry;
  int64_t backoff_ms;
  char *retry_error;
  uint64_t issued, rejected, events_total, retries;
  char *last_rejection;
  int seen, removed;
  int tainted;                /* its Lua state was killed: load the code again before it runs */
  int64_t written_ms;         /* when the checkpoint was last written */
  int rearm;                  /* idle again: arm the schedule timer once caught up */
  char *fault_key;            /* the fault is a schedule's (its rejected handler failed): its key */
  struct reactor *link;
};

/* A fired schedule in flight: its command, then, if rejected with a
 * rejected[type] handler, the compensations in w (with the event that set
 * the schedule, read back from the store, in ev). */
typedef struct firing {
  struct ebb_reactors *h;
  char *name, *key, *event_id;
  int64_t event_position;     /* 0: unknown (a row older than the column) */
  rcommand cmd;
  int rejected;               /* the command was rejected: compensating (w) */
  char *error;                /* the rejection's message */
  ebb_event_list ev;
  work w;
  struct firing *link;
} firing;

struct ebb_reactors {
  ebb_reactors_options o;
  /* ebb__rdb_run's prepared statements, by the address of their SQL text (a
   * literal): the checkpoint is written for every batch of answers. */
  struct {
    const char *sql;
    sqlite3_stmt *st;
  } stmts[16];
  size_t n_stmts;
  char *reactors_dir, *lua_dir;
  sqlite3 *db;
  reactor *list;
  int64_t head;
  int active, stopping;
  size_t in_flight;           /* commands issued and not answered (all reactors) */
  uv_idle_t pump;
  int pumping;
  uv_timer_t sched_timer, rescan_timer;
  uv_fs_event_t watch;
  int watching;
  int handles;                /* uv handles still open */
  firing *firings;
  uint64_t fired;
};

/* reactor.c: what the schedules share with the pipeline */
void ebb__reactors_pump(ebb_reactors *h);           /* a turn of the pump, soon */
void ebb__reactors_maybe_free(ebb_reactors *h);     /* frees a stopping host once idle */
reactor *ebb__reactor_find(ebb_reactors *h, const char *name);
int ebb__reactor_retryable(int code);               /* an error that trying again may cure */
int ebb__work_done(const work *w);                  /* every command answered */
/* Handled events waiting for their checkpoint. */
int ebb__reactor_pending(const reactor *r);
/* Issues the pending commands of ws[0..n) that no earlier unanswered command
 * to the same aggregate holds back. */
void ebb__reactor_issue_works(reactor *r, work *ws, size_t n);
/* Faults the reactor at the event at position (key: the schedule's whose
 * rejected handler failed); the earliest fault stays. Takes message. */
void ebb__reactor_fault_at(reactor *r, int64_t position, const char *key, char *message);

/* reactor_schedule.c */
void ebb__reactors_arm(ebb_reactors *h);            /* the timer for the earliest due */
void ebb__reactors_firings(ebb_reactors *h);        /* compensating firings: issue, finish */
void ebb__reactor_drop_firings(ebb_reactors *h, reactor *r); /* a reactor that goes away */
void ebb__firing_free(firing *fi);

/* reactor_module.c */
void ebb__rcommand_clear(rcommand *c);
void ebb__work_clear(work *w);
/* The message of the sandbox's failed call (popped); malloc'd. */
char *ebb__reactor_call_error(ebb_sandbox *sb);
/* A new sandbox with the module file loaded and validated (its `from` into
 * f, its table referenced by *module_ref, start = "now" into *start_now),
 * or NULL with *msg. */
ebb_sandbox *ebb__reactor_load_module(const char *dir, const char *lua_dir, size_t memory_limit,
                                      int64_t budget, const char *name, const char *path,
                                      ebb_follower *f, int *module_ref, int *start_now,
                                      char **msg);
/* lua_CFunctions for ebb_sandbox_call: on[e.type](e, ctx) with argument the
 * work; rejected[type](cmd, err, e, ctx) with arguments the work, the
 * command and the ebb_error, returning whether there is such a handler
 * (its commands get ids "<the command's id>/r<k>"). */
int ebb__reactor_l_on(lua_State *L);
int ebb__reactor_l_rejected(lua_State *L);

/* reactor_db.c */
int ebb__rdb_open(sqlite3 **db, const char *data_dir, int durability, ebb_error *err);
int ebb__rdb_exec(sqlite3 *db, const char *sql, char **msg);
/* One statement with arguments by `types`: 't' text, 'i' int64, 'n' NULL. 0 or
 * -1. sql must be text that outlives h (a literal): it is prepared once. */
int ebb__rdb_run(ebb_reactors *h, const char *sql, const char *types, ...);
/* Finalizes those statements and closes h->db. */
void ebb__rdb_close(ebb_reactors *h);
int ebb__rdb_write_checkpoint(reactor *r);
/* Reads the checkpoint and skipped positions: 1 if it has a checkpoint, 0 if
 * not (from 0). */
int ebb__rdb_read_checkpoint(reactor *r);
int64_t ebb__rdb_count_schedules(sqlite3 *db, const char *name);
void ebb__rdb_schedules_json(sqlite3 *db, const char *name, ebb_buf *out);

#endif
