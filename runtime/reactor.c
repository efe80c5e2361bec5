/*
 * reactor.c: the reactor host (see reactor.h): following, issuing, firing
 * schedules, the life cycle and the status. The Lua side is in
 * reactor_module.c, the durable state in reactor_db.c.
 *
 * Everything runs on the daemon's loop. A reactor works one event at a time:
 * its follower reads a batch after the checkpoint; for each event the
 * handler runs (one sandboxed call) and returns commands, and may set or
 * cancel schedules; the commands go into the daemon's pipeline all at once
 * (commands for one stream keep their order there). When every command is
 * answered (committed, or rejected and compensated or recorded) the
 * checkpoint moves to the event, with its schedule changes, in one
 * transaction of reactors.db. Events whose handler did nothing move the
 * checkpoint in memory; it is written at most once a second and when the
 * reactor has caught up.
 *
 * Failures: a rejection goes to rejected[type], whose commands are issued in
 * turn, or is recorded; a script_error, storage failure or shutdown answer is
 * retried with backoff (the same command id, so nothing happens twice); a
 * handler error, a command the pipeline refuses as malformed, or a store that
 * cannot be read faults the reactor at the event until retry or skip.
 *
 * Schedules fire through one libuv timer armed for the earliest; a fired
 * schedule's command carries the id made when it was set, and the row goes
 * once the command is answered, so a crash in between fires it again and the
 * store answers the repeat.
 */
#define _GNU_SOURCE /* asprintf */
#include "reactor_internal.h"
#include "paths.h"

#include <lauxlib.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "log.h"
#include "module_dir.h"

#define BATCH 100               /* events read at once */
#define EVENTS_PER_TURN 200     /* handler calls per loop turn, so requests interleave */
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 30000

static void schedule_pump(ebb_reactors *h);
static void arm_schedules(ebb_reactors *h);
static void maybe_free(ebb_reactors *h);

/* ---------------------------------------------------------------- faults */

static void set_fault(reactor *r, int64_t position, char *message) {
  free(r->fault);
  r->fault = message ? message : ebb_strdupf("error");
  r->fault_position = position;
  r->state = ST_FAULTED;
  char pos[32];
  snprintf(pos, sizeof pos, "%lld", (long long)position);
  ebb_log(EBB_LOG_ERROR, "reactor faulted", "reactor", r->name, "#position", pos, "error",
          r->fault, NULL);
}

static void drop_batch(reactor *r) {
  if (r->have_batch) ebb_follower_batch_free(&r->batch);
  r->have_batch = 0;
  r->at = 0;
}

/* ---------------------------------------------------------------- issuing */

static void issue(reactor *r, rcommand *c);

/* Is the error one that goes away by trying again? */
static int retryable(int code) {
  return code == EBB_ESCRIPT || code == EBB_ESTORE || code == EBB_EUNAVAIL || code == EBB_EBUSY ||
         code == EBB_ENOMEM || code == EBB_ETIMEOUT || code == EBB_EVERSION;
}

static void on_retry(uv_timer_t *t) {
  reactor *r = t->data;
  if (r->h->stopping || !r->busy) return;
  for (size_t i = 0; i < r->w.n_cmds; i++)
    if (r->w.cmds[i]->state == C_PENDING) issue(r, r->w.cmds[i]);
}

/* The event's work is done: its checkpoint, schedule changes and recorded
 * rejections in one transaction. */
static int commit_event(reactor *r) {
  ebb_reactors *h = r->h;
  work *w = &r->w;
  char now[EBB_TIME_LEN + 1];
  ebb_clock_format(ebb_clock_now_ms(), now);
  char *msg = NULL;
  int64_t saved_pos = r->f.position, saved_mark = r->f.mark_position;
  char saved_id[sizeof r->f.mark_id];
  memcpy(saved_id, r->f.mark_id, sizeof saved_id);
  if (ebb__rdb_exec(h->db, "BEGIN IMMEDIATE", &msg) != 0) goto fail;
  for (size_t i = 0; i < w->n_ops; i++) {
    schedop *op = &w->ops[i];
    int rc = op->at_ms < 0
                 ? ebb__rdb_run(h->db, "DELETE FROM reactor_schedules WHERE name = ? AND key = ?", "tt",
                           r->name, op->key)
                 : ebb__rdb_run(h->db,
                           "INSERT OR REPLACE INTO reactor_schedules (name, key, fire_at_ms, "
                           "aggregate, id, type, data, command_id, event_id, created_at) VALUES "
                           "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           "ttitttttt" "t", r->name, op->key, op->at_ms, op->cmd.aggregate,
                           op->cmd.id, op->cmd.type, op->cmd.data, op->cmd.command_id, w->e->id,
                           now);
    if (rc != 0) goto fail;
  }
  for (size_t i = 0; i < w->n_rej; i++)
    if (ebb__rdb_run(h->db,
                "INSERT INTO reactor_rejections (name, position, command_id, aggregate, id, type, "
                "error, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                "titttttt", r->name, w->e->position, w->rej[i].command_id, w->rej[i].aggregate,
                w->rej[i].id, w->rej[i].type, w->rej[i].error, now) != 0)
      goto fail;
  r->f.position = w->e->position;
  ebb_follower_mark(&r->f, w->e);
  if (ebb__rdb_write_checkpoint(r) != 0 || ebb__rdb_exec(h->db, "COMMIT", &msg) != 0) goto fail;
  r->written = r->f.position;
  if (w->n_ops) arm_schedules(h);
  return 0;
fail:
  if (msg == NULL) msg = ebb_strdupf("reactors.db: %s", sqlite3_errmsg(h->db));
  ebb__rdb_exec(h->db, "ROLLBACK", NULL);
  r->f.position = saved_pos;
  r->f.mark_position = saved_mark;
  memcpy(r->f.mark_id, saved_id, sizeof saved_id);
  set_fault(r, w->e->position, ebb_strdupf("cannot store the checkpoint: %s", msg));
  free(msg);
  return -1;
}

/* All commands answered? Then the event is done. */
static void maybe_done(reactor *r) {
  if (!r->busy) return; /* finished already (an answer that came at once) */
  r->rearm = 1;
  for (size_t i = 0; i < r->w.n_cmds; i++)
    if (r->w.cmds[i]->state != C_DONE) return;
  r->busy = 0;
  r->backoff_ms = 0;
  free(r->retry_error);
  r->retry_error = NULL;
  if (r->removed || r->h->stopping) {
    ebb__work_clear(&r->w);
    return;
  }
  if (r->state != ST_FAULTED && commit_event(r) == 0) {
    r->events_total++;
    r->at++;
  }
  ebb__work_clear(&r->w);
  schedule_pump(r->h);
}

static void free_reactor(reactor *r);

static void on_issued(void *ud, const ebb_error *err) {
  rcommand *c = ud;
  reactor *r = c->r;
  ebb_reactors *h = r->h;
  h->in_flight--;
  c->state = C_DONE;
  if (r->removed || h->stopping) {
    int idle = 1;
    for (size_t i = 0; i < r->w.n_cmds; i++) idle &= r->w.cmds[i]->state != C_FLIGHT;
    if (idle && r->removed) {
      r->busy = 0;
      free_reactor(r);
    }
    maybe_free(h);
    return;
  }
  if (err->code == 0) {
    r->issued++;
  } else if (err->code == EBB_EREJECTED || err->code == EBB_EDELETED) {
    r->rejected++;
    free(r->last_rejection);
    r->last_rejection = ebb_strdupf("%s %s on %s %s: %s", c->command_id, c->type, c->aggregate, c->id,
                             err->message);
    /* rejected[type] compensates with commands of its own; else recorded. */
    lua_State *L = ebb_sandbox_state(r->sb);
    lua_pushcfunction(L, ebb__reactor_l_rejected);
    lua_pushlightuserdata(L, &r->w);
    lua_pushlightuserdata(L, c);
    lua_pushlightuserdata(L, (void *)err);
    size_t before = r->w.n_cmds;
    if (ebb_sandbox_call(r->sb, 3, 1) != LUA_OK) {
      r->tainted = ebb_sandbox_killed(r->sb) != NULL;
      char *m = ebb__reactor_call_error(r->sb);
      set_fault(r, r->w.e->position, ebb_strdupf("event %lld (%s in %s): rejected.%s: %s",
                                         (long long)r->w.e->position, r->w.e->type,
                                         r->w.e->stream, c->type, m ? m : "error"));
      free(m);
    } else {
      int handled = lua_toboolean(L, -1);
      lua_pop(L, 1);
      if (!handled) {
        rejection *p = realloc(r->w.rej, (r->w.n_rej + 1) * sizeof *p);
        if (p) {
          r->w.rej = p;
          p[r->w.n_rej++] = (rejection){strdup(c->command_id), strdup(c->aggregate),
                                        strdup(c->id), strdup(c->type), strdup(err->message)};
        }
      }
      for (size_t i = before; i < r->w.n_cmds; i++)
        if (r->w.cmds[i]->state == C_PENDING) issue(r, r->w.cmds[i]);
    }
  } else if (retryable(err->code)) {
    c->state = C_PENDING;
    c->attempts++;
    r->retries++;
    free(r->retry_error);
    r->retry_error = ebb_strdupf("%s %s: %s", c->command_id, ebb_error_name(err->code), err->message);
    r->backoff_ms = r->backoff_ms ? r->backoff_ms * 2 : BACKOFF_MIN_MS;
    if (r->backoff_ms > BACKOFF_MAX_MS) r->backoff_ms = BACKOFF_MAX_MS;
    ebb_log(EBB_LOG_WARN, "reactor command failed; retrying with backoff", "reactor", r->name,
            "command_id", c->command_id, "error", err->message, NULL);
    uv_timer_start(&r->retry, on_retry, (uint64_t)r->backoff_ms, 0);
    return;
  } else {
    /* Malformed, unknown aggregate or command, a command id taken: the
     * handler is wrong, not the moment. */
    set_fault(r, r->w.e->position,
              ebb_strdupf("event %lld (%s in %s): command %s (%s on %s %s) failed: %s: %s",
                   (long long)r->w.e->position, r->w.e->type, r->w.e->stream, c->command_id,
                   c->type, c->aggregate, c->id, ebb_error_name(err->code), err->message));
  }
  maybe_done(r);
}

static void issue(reactor *r, rcommand *c) {
  ebb_reactors *h = r->h;
  const ebb_event *e = r->w.e;
  /* correlation: the event's (or, at the start of a chain, the event itself);
   * causation: the event. */
  ebb_buf meta = EBB_BUF_INIT;
  ebb_buf_puts(&meta, "{\"correlation_id\":");
  const char *corr = r->w.correlation_id ? r->w.correlation_id : e->id;
  ebb_buf_json_string(&meta, corr, strlen(corr));
  ebb_buf_puts(&meta, ",\"causation_id\":");
  ebb_buf_json_string(&meta, e->id, strlen(e->id));
  ebb_buf_puts(&meta, ",\"reactor\":");
  ebb_buf_json_string(&meta, r->name, strlen(r->name));
  ebb_buf_putc(&meta, '}');
  ebb_command cmd = {.aggregate = c->aggregate, .id = c->id, .type = c->type, .data = c->data,
                     .data_len = strlen(c->data), .metadata = ebb_buf_cstr(&meta),
                     .metadata_len = meta.len, .command_id = c->command_id};
  c->state = C_FLIGHT;
  r->busy = 1;
  h->in_flight++;
  h->o.issue(h->o.issue_ud, &cmd, on_issued, c);
  ebb_buf_free(&meta);
}

/* ---------------------------------------------------------------- following */

/* Runs the handler of the batch's current event. 1: commands are in flight
 * (wait), 0: done with it, -1: faulted. */
static int handle_event(reactor *r) {
  const ebb_event *e = &r->batch.events.items[r->at];
  ebb__work_clear(&r->w);
  r->w.r = r;
  r->w.e = e;
  lua_State *L = ebb_sandbox_state(r->sb);
  lua_pushcfunction(L, ebb__reactor_l_on);
  lua_pushlightuserdata(L, &r->w);
  if (ebb_sandbox_call(r->sb, 1, 0) != LUA_OK) {
    r->tainted = ebb_sandbox_killed(r->sb) != NULL;
    char *m = ebb__reactor_call_error(r->sb);
    set_fault(r, e->position, ebb_strdupf("event %lld (%s in %s): %s", (long long)e->position, e->type,
                                   e->stream, m ? m : "error"));
    free(m);
    ebb__work_clear(&r->w);
    return -1;
  }
  if (r->w.n_cmds == 0) {
    if (r->w.n_ops == 0) {
      /* Nothing to make durable: the checkpoint moves in memory. */
      r->f.position = e->position;
      ebb_follower_mark(&r->f, e);
      r->events_total++;
      r->at++;
      ebb__work_clear(&r->w);
      return 0;
    }
    int rc = commit_event(r);
    if (rc == 0) {
      r->events_total++;
      r->at++;
    }
    ebb__work_clear(&r->w);
    return rc;
  }
  /* An answer may come at once (a rejection, a command id the store
   * knows) and add compensations, which that answer issues itself: only
   * the pending ones go out here. */
  for (size_t i = 0; i < r->w.n_cmds; i++)
    if (r->w.cmds[i]->state == C_PENDING) issue(r, r->w.cmds[i]);
  /* Every answer may have come back at once (a command id answered from the store). */
  return r->busy ? 1 : r->state == ST_FAULTED ? -1 : 0;
}

/* Writes a checkpoint that moved past events the reactor did nothing for.
 * Losing it costs only running those handlers again (they issued nothing),
 * so it is written at most once a second while events flow, and when the
 * reactor has caught up. */
static void lazy_checkpoint(reactor *r, int caught_up) {
  int64_t now = ebb_clock_now_ms();
  if (r->written == r->f.position || (!caught_up && now - r->written_ms < 1000)) return;
  if (ebb__rdb_write_checkpoint(r) == 0) {
    r->written = r->f.position;
    r->written_ms = now;
  }
}

/* Works the reactor until it waits for answers, is done, or used its turn. */
static void advance(reactor *r, int *budget) {
  ebb_reactors *h = r->h;
  while (*budget > 0 && !r->busy && r->sb && r->state != ST_FAULTED && r->state != ST_STOPPED) {
    if (!r->have_batch) {
      if (r->f.position >= h->head) {
        lazy_checkpoint(r, 1);
        if (r->state != ST_LIVE || r->rearm) {
          /* Caught up: its due schedules may fire now. */
          r->state = ST_LIVE;
          r->rearm = 0;
          arm_schedules(h);
        }
        return;
      }
      ebb_error err;
      ebb_error_init(&err);
      int rc = ebb_follower_read(&r->f, h->o.rt, h->head, BATCH, &r->batch, &err);
      if (rc < 0) {
        set_fault(r, rc == -2 && r->batch.events.n ? r->batch.events.items[0].position
                                                  : r->f.position + 1,
                  rc == -1 ? ebb_strdupf("cannot read the events after position %lld: %s",
                                  (long long)r->f.position, err.message)
                           : ebb_strdupf("%s", err.message));
        ebb_follower_batch_free(&r->batch);
        ebb_error_clear(&err);
        return;
      }
      if (rc == 0) {
        ebb_follower_batch_free(&r->batch);
        continue;
      }
      r->have_batch = 1;
      r->at = 0;
      if (h->head - r->f.position > BATCH) r->state = ST_CATCHING_UP;
    }
    if (r->at < r->batch.n) {
      (*budget)--;
      if (handle_event(r) != 0) return; /* in flight, or faulted */
      continue;
    }
    /* The batch is through: the checkpoint goes to where the follower read. */
    const ebb_event *bad = r->batch.bad;
    if (bad) {
      char *why = ebb_strdupf("event %lld (%s in %s): %s", (long long)bad->position, bad->type,
                       bad->stream, bad->upcast_error);
      r->f.position = r->batch.checkpoint;
      drop_batch(r);
      if (ebb__rdb_write_checkpoint(r) == 0) r->written = r->f.position;
      set_fault(r, r->f.position + 1, why);
      return;
    }
    r->f.position = r->batch.checkpoint;
    drop_batch(r);
    lazy_checkpoint(r, 0);
  }
}

static void on_pump(uv_idle_t *idle) {
  ebb_reactors *h = idle->data;
  uv_idle_stop(idle);
  h->pumping = 0;
  if (h->stopping || !h->active) return;
  int budget = EVENTS_PER_TURN;
  for (reactor *r = h->list; r; r = r->link) advance(r, &budget);
  if (budget <= 0) schedule_pump(h);
}

static void schedule_pump(ebb_reactors *h) {
  if (h->pumping || h->stopping || !h->active) return;
  h->pumping = 1;
  uv_idle_start(&h->pump, on_pump);
}

/* ---------------------------------------------------------------- schedules */

static void on_fired(void *ud, const ebb_error *err) {
  firing *fi = ud;
  ebb_reactors *h = fi->h;
  h->in_flight--;
  for (firing **pp = &h->firings; *pp; pp = &(*pp)->link)
    if (*pp == fi) {
      *pp = fi->link;
      break;
    }
  if (!h->stopping) {
    reactor *r = h->list;
    while (r && strcmp(r->name, fi->name) != 0) r = r->link;
    if (retryable(err->code)) {
      if (r) {
        r->retries++;
        free(r->retry_error);
        r->retry_error = ebb_strdupf("schedule %s: %s: %s", fi->key, ebb_error_name(err->code),
                              err->message);
      }
      /* The row stays: the timer fires it again after a pause. */
      ebb__rdb_run(h->db, "UPDATE reactor_schedules SET fire_at_ms = ? WHERE name = ? AND key = ?",
              "itt", ebb_clock_now_ms() + 1000, fi->name, fi->key);
    } else {
      char now[EBB_TIME_LEN + 1];
      ebb_clock_format(ebb_clock_now_ms(), now);
      ebb__rdb_exec(h->db, "BEGIN IMMEDIATE", NULL);
      if (err->code != 0)
        ebb__rdb_run(h->db,
                "INSERT INTO reactor_rejections (name, position, command_id, aggregate, id, "
                "type, error, at) VALUES (?, NULL, ?, ?, ?, ?, ?, ?)",
                "ttttttt", fi->name, fi->cmd.command_id, fi->cmd.aggregate, fi->cmd.id,
                fi->cmd.type, err->message, now);
      ebb__rdb_run(h->db, "DELETE FROM reactor_schedules WHERE name = ? AND key = ? AND command_id = ?",
              "ttt", fi->name, fi->key, fi->cmd.command_id);
      ebb__rdb_exec(h->db, "COMMIT", NULL);
      if (r && err->code == 0) r->issued++;
      if (r && err->code != 0) {
        r->rejected++;
        free(r->last_rejection);
        r->last_rejection = ebb_strdupf("%s %s on %s %s: %s", fi->cmd.command_id, fi->cmd.type,
                                 fi->cmd.aggregate, fi->cmd.id, err->message);
      }
      h->fired++;
    }
    arm_schedules(h);
  }
  free(fi->name);
  free(fi->key);
  ebb__rcommand_clear(&fi->cmd);
  free(fi);
  maybe_free(h);
}

static int in_flight(ebb_reactors *h, const char *name, const char *key) {
  for (firing *fi = h->firings; fi; fi = fi->link)
    if (strcmp(fi->name, name) == 0 && strcmp(fi->key, key) == 0) return 1;
  return 0;
}

/* A schedule fires only while its reactor is caught up and idle: an event it
 * has still to handle (committed while the daemon was down, say) may cancel
 * it. A removed reactor's schedules wait for it to come back. */
static int may_fire(ebb_reactors *h, const char *name, const char *key) {
  if (in_flight(h, name, key)) return 0;
  reactor *r = h->list;
  while (r && strcmp(r->name, name) != 0) r = r->link;
  return r && r->state == ST_LIVE && !r->busy;
}

static void on_sched_timer(uv_timer_t *t) {
  ebb_reactors *h = t->data;
  if (h->stopping || !h->active) return;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(h->db, "SELECT name, key, aggregate, id, type, data, command_id FROM "
                         "reactor_schedules WHERE fire_at_ms <= ? ORDER BY fire_at_ms", -1, &st,
                         NULL) != SQLITE_OK)
    return;
  sqlite3_bind_int64(st, 1, ebb_clock_now_ms());
  firing *due = NULL;
  while (sqlite3_step(st) == SQLITE_ROW) {
    const char *name = (const char *)sqlite3_column_text(st, 0);
    const char *key = (const char *)sqlite3_column_text(st, 1);
    if (!may_fire(h, name, key)) continue;
    firing *fi = calloc(1, sizeof *fi);
    if (fi == NULL) break;
    fi->h = h;
    fi->name = strdup(name);
    fi->key = strdup(key);
    fi->cmd.aggregate = strdup((const char *)sqlite3_column_text(st, 2));
    fi->cmd.id = strdup((const char *)sqlite3_column_text(st, 3));
    fi->cmd.type = strdup((const char *)sqlite3_column_text(st, 4));
    fi->cmd.data = strdup((const char *)sqlite3_column_text(st, 5));
    fi->cmd.command_id = strdup((const char *)sqlite3_column_text(st, 6));
    fi->link = due;
    due = fi;
  }
  sqlite3_finalize(st);
  while (due) {
    firing *fi = due;
    due = fi->link;
    fi->link = h->firings;
    h->firings = fi;
    ebb_buf m = EBB_BUF_INIT;
    ebb_buf_puts(&m, "{\"reactor\":");
    ebb_buf_json_string(&m, fi->name, strlen(fi->name));
    ebb_buf_puts(&m, ",\"schedule\":");
    ebb_buf_json_string(&m, fi->key, strlen(fi->key));
    ebb_buf_putc(&m, '}');
    ebb_command cmd = {.aggregate = fi->cmd.aggregate, .id = fi->cmd.id, .type = fi->cmd.type,
                       .data = fi->cmd.data, .data_len = strlen(fi->cmd.data),
                       .metadata = ebb_buf_cstr(&m), .metadata_len = m.len,
                       .command_id = fi->cmd.command_id};
    h->in_flight++;
    h->o.issue(h->o.issue_ud, &cmd, on_fired, fi);
    ebb_buf_free(&m);
  }
  arm_schedules(h);
}

/* Arms the timer for the earliest schedule not in flight (due ones: now). */
static void arm_schedules(ebb_reactors *h) {
  if (h->stopping) return;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(h->db, "SELECT name, key, fire_at_ms FROM reactor_schedules ORDER BY "
                         "fire_at_ms", -1, &st, NULL) != SQLITE_OK)
    return;
  int64_t next = -1;
  while (sqlite3_step(st) == SQLITE_ROW) {
    if (!may_fire(h, (const char *)sqlite3_column_text(st, 0),
                  (const char *)sqlite3_column_text(st, 1)))
      continue;
    next = sqlite3_column_int64(st, 2);
    break;
  }
  sqlite3_finalize(st);
  uv_timer_stop(&h->sched_timer);
  if (next < 0) return;
  int64_t wait = next - ebb_clock_now_ms();
  uv_timer_start(&h->sched_timer, on_sched_timer, wait > 0 ? (uint64_t)wait : 0, 0);
}

static void load_reactor(ebb_reactors *h, reactor *r) {
  char *msg = NULL;
  ebb_follower nf = {0};
  int ref = LUA_NOREF, start_now = 0;
  ebb_sandbox *sb = ebb__reactor_load_module(h->reactors_dir, h->lua_dir, h->o.memory_limit,
                                h->o.instruction_budget, r->name, r->path, &nf, &ref,
                                             &start_now, &msg);
  if (sb == NULL) {
    ebb_follower_clear(&nf);
    r->load_failures++;
    free(r->load_error);
    r->load_error = msg ? msg : ebb_strdupf("cannot load %s", r->path);
    ebb_log(EBB_LOG_ERROR, "reactor failed to load; what ran before stays", "reactor", r->name,
            "error", r->load_error, NULL);
    if (r->sb == NULL) r->state = ST_STOPPED;
    return;
  }
  /* The new code takes over where the old one is: checkpoint and skipped stay. */
  ebb_sandbox_free(r->sb);
  r->sb = sb;
  r->module_ref = ref;
  for (size_t i = 0; i < r->f.n_from; i++) free(r->f.from[i]);
  free(r->f.from);
  r->f.from = nf.from;
  r->f.n_from = nf.n_from;
  free(nf.skipped);
  if (!r->busy) drop_batch(r); /* read again with the new `from` */
  free(r->load_error);
  r->load_error = NULL;
  if (r->loaded_once) {
    r->reloads++;
    ebb_log(EBB_LOG_INFO, "reactor reloaded", "reactor", r->name, NULL);
  } else {
    int known = ebb__rdb_read_checkpoint(r);
    int64_t head = 0;
    ebb_error err;
    ebb_error_init(&err);
    int have_head = ebb_store_head(ebb_runtime_store(h->o.rt), &head, &err) == 0;
    if (!known && start_now && have_head) {
      /* start = "now": the history before its first run is not its to react to. */
      r->f.position = head;
      if (ebb__rdb_write_checkpoint(r) == 0) r->written = head;
    } else if (have_head && r->f.position > head) {
      /* The store lost its last events (restored, or commits lost in an OS
       * crash at durability normal): what it holds up to its head was
       * handled, and what comes at the reused positions is new. */
      char a[32], b[32];
      snprintf(a, sizeof a, "%lld", (long long)r->f.position);
      snprintf(b, sizeof b, "%lld", (long long)head);
      ebb_log(EBB_LOG_WARN, "reactor checkpoint is past the store's head: resuming at the head",
              "reactor", r->name, "#checkpoint", a, "#head", b, NULL);
      r->f.position = head;
      r->f.mark_position = 0;
      r->f.mark_id[0] = '\0';
      if (ebb__rdb_write_checkpoint(r) == 0) r->written = head;
    }
    ebb_error_clear(&err);
    char *why = ebb_follower_ahead(&r->f, ebb_runtime_store(h->o.rt), "the reactor");
    if (why) {
      /* Other events hold the positions it saw: which of them it handled is
       * unknown, and reacting again from 0 would issue commands for events
       * long handled. An operator decides (skip moves past the event). */
      set_fault(r, r->f.position, why);
    }
  }
  r->loaded_once = 1;
  if (r->state == ST_STOPPED) r->state = ST_CATCHING_UP;
}

static void close_free(uv_handle_t *handle) {
  free(handle->data);
}

static void free_reactor(reactor *r) {
  drop_batch(r);
  ebb__work_clear(&r->w);
  ebb_sandbox_free(r->sb);
  ebb_follower_clear(&r->f);
  free(r->name);
  free(r->path);
  free(r->fault);
  free(r->load_error);
  free(r->retry_error);
  free(r->last_rejection);
  uv_timer_stop(&r->retry);
  r->retry.data = r;
  uv_close((uv_handle_t *)&r->retry, close_free);
}

/* One NAME.lua of the directory: new or changed code is (re)loaded. */
static void scan_one(void *ud, const char *name, const char *path) {
  ebb_reactors *h = ud;
  uint64_t hash = EBB_FNV1A_INIT;
  if (ebb_file_hash(path, &hash)) return; /* gone or unreadable: the next scan sees it */
  reactor *r = h->list;
  while (r && strcmp(r->name, name) != 0) r = r->link;
  if (r == NULL) {
    if ((r = calloc(1, sizeof *r)) == NULL) return;
    if ((r->name = strdup(name)) == NULL || (r->path = strdup(path)) == NULL) {
      free(r->name);
      free(r);
      return;
    }
    r->h = h;
    r->w.r = r;
    r->module_ref = LUA_NOREF;
    r->state = ST_STOPPED;
    uv_timer_init(h->o.loop, &r->retry);
    r->retry.data = r;
    r->link = h->list;
    h->list = r;
    r->code_hash = hash;
    load_reactor(h, r);
  } else if (r->code_hash != hash || r->sb == NULL) {
    r->code_hash = hash;
    load_reactor(h, r);
  }
  r->seen = 1;
}

static void scan(ebb_reactors *h) {
  for (reactor *r = h->list; r; r = r->link) r->seen = 0;
  ebb_module_dir_each(h->reactors_dir, scan_one, h);
  for (reactor **pp = &h->list; *pp;) {
    reactor *r = *pp;
    if (r->seen) {
      pp = &r->link;
      continue;
    }
    /* Removed: its checkpoint and schedules stay, so putting it back resumes. */
    ebb_log(EBB_LOG_INFO, "reactor removed", "reactor", r->name, NULL);
    *pp = r->link;
    int flying = 0;
    for (size_t i = 0; i < r->w.n_cmds; i++) flying |= r->w.cmds[i]->state == C_FLIGHT;
    if (flying) r->removed = 1; /* freed when its last answer comes */
    else free_reactor(r);
  }
  schedule_pump(h);
}

/* ---------------------------------------------------------------- life cycle */

static void on_rescan_timer(uv_timer_t *t) {
  ebb_reactors_rescan(t->data);
}

static void on_dir_changed(uv_fs_event_t *w, const char *file, int events, int status) {
  (void)file;
  (void)events;
  (void)status;
  ebb_reactors *h = w->data;
  /* Editors write in several steps: one rescan once the burst is over. */
  uv_timer_start(&h->rescan_timer, on_rescan_timer, 100, 0);
}

int ebb_reactors_start(ebb_reactors **out, const ebb_reactors_options *opt, ebb_error *err) {
  *out = NULL;
  ebb_reactors *h = calloc(1, sizeof *h);
  if (h == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  h->o = *opt;
  h->active = 1;
  h->reactors_dir = strdup(opt->reactors_dir);
  h->lua_dir = strdup(opt->lua_dir ? opt->lua_dir : ebb_paths_lua_dir());
  if (!h->reactors_dir || !h->lua_dir) {
    ebb_error_set(err, EBB_ENOMEM, "out of memory");
    goto fail;
  }
  if (ebb__rdb_open(&h->db, opt->data_dir, opt->durability, err) != 0) goto fail;
  if (ebb_store_head(ebb_runtime_store(opt->rt), &h->head, err) != 0) goto fail;
  uv_idle_init(opt->loop, &h->pump);
  uv_timer_init(opt->loop, &h->sched_timer);
  uv_timer_init(opt->loop, &h->rescan_timer);
  h->pump.data = h->sched_timer.data = h->rescan_timer.data = h;
  h->handles = 3;
  if (uv_fs_event_init(opt->loop, &h->watch) == 0) {
    h->watch.data = h;
    h->watching = 1;
    h->handles++;
    if (uv_fs_event_start(&h->watch, on_dir_changed, h->reactors_dir, 0) != 0)
      ebb_log(EBB_LOG_WARN, "cannot watch the reactors directory: edits need SIGHUP", "dir",
              h->reactors_dir, NULL);
  }
  scan(h);
  arm_schedules(h);
  *out = h;
  return 0;
fail:
  if (h->db) sqlite3_close(h->db);
  free(h->reactors_dir);
  free(h->lua_dir);
  free(h);
  return err->code;
}

static void on_handle_closed(uv_handle_t *handle) {
  ebb_reactors *h = handle->data;
  if (--h->handles == 0) {
    free(h->reactors_dir);
    free(h->lua_dir);
    free(h);
  }
}

/* Frees the host once it is stopping and no answer is outstanding. */
static void maybe_free(ebb_reactors *h) {
  if (!h->stopping || h->in_flight > 0 || h->db == NULL) return;
  while (h->list) {
    reactor *r = h->list;
    h->list = r->link;
    free_reactor(r);
  }
  sqlite3_close(h->db);
  h->db = NULL;
  uv_close((uv_handle_t *)&h->pump, on_handle_closed);
  uv_close((uv_handle_t *)&h->sched_timer, on_handle_closed);
  uv_close((uv_handle_t *)&h->rescan_timer, on_handle_closed);
  if (h->watching) uv_close((uv_handle_t *)&h->watch, on_handle_closed);
}

void ebb_reactors_stop(ebb_reactors *h) {
  if (h == NULL || h->stopping) return;
  h->stopping = 1;
  uv_idle_stop(&h->pump);
  uv_timer_stop(&h->sched_timer);
  uv_timer_stop(&h->rescan_timer);
  if (h->watching) uv_fs_event_stop(&h->watch);
  for (reactor *r = h->list; r; r = r->link) uv_timer_stop(&r->retry);
  maybe_free(h);
}

void ebb_reactors_set_active(ebb_reactors *h, int active) {
  h->active = active;
  if (active) {
    arm_schedules(h);
    schedule_pump(h);
  } else {
    uv_timer_stop(&h->sched_timer);
  }
}

void ebb_reactors_notify(ebb_reactors *h, int64_t head) {
  if (head <= h->head) return;
  h->head = head;
  schedule_pump(h);
}

void ebb_reactors_rescan(ebb_reactors *h) {
  if (h->stopping) return;
  scan(h);
}

/* ---------------------------------------------------------------- status */

static reactor *find(ebb_reactors *h, const char *name) {
  for (reactor *r = h->list; r; r = r->link)
    if (strcmp(r->name, name) == 0) return r;
  return NULL;
}

static void json_str_or_null(ebb_buf *b, const char *s) {
  if (s) ebb_buf_json_string(b, s, strlen(s));
  else ebb_buf_puts(b, "null");
}

static void status_json(ebb_reactors *h, reactor *r, ebb_buf *b) {
  ebb_buf_puts(b, "{\"name\":");
  ebb_buf_json_string(b, r->name, strlen(r->name));
  int64_t lag = h->head > r->f.position ? h->head - r->f.position : 0;
  const char *state = ebb_follow_state_names[r->state];
  if (!h->active && r->state != ST_FAULTED) state = "standby";
  ebb_buf_printf(b, ",\"state\":\"%s\",\"position\":%lld,\"head\":%lld,\"lag_events\":%lld,"
                    "\"events_total\":%llu,\"commands_issued\":%llu,\"commands_rejected\":%llu,"
                    "\"retries\":%llu,\"schedules_pending\":%lld,\"in_flight\":%d,\"from\":[",
                 state, (long long)r->f.position, (long long)h->head, (long long)lag,
                 (unsigned long long)r->events_total, (unsigned long long)r->issued,
                 (unsigned long long)r->rejected, (unsigned long long)r->retries,
                 (long long)ebb__rdb_count_schedules(h->db, r->name), r->busy);
  for (size_t i = 0; i < r->f.n_from; i++) {
    if (i) ebb_buf_putc(b, ',');
    ebb_buf_json_string(b, r->f.from[i], strlen(r->f.from[i]));
  }
  ebb_buf_puts(b, "],\"last_error\":");
  if (r->fault) {
    ebb_buf_printf(b, "{\"position\":%lld,\"message\":", (long long)r->fault_position);
    ebb_buf_json_string(b, r->fault, strlen(r->fault));
    ebb_buf_putc(b, '}');
  } else {
    ebb_buf_puts(b, "null");
  }
  ebb_buf_puts(b, ",\"retrying\":");
  json_str_or_null(b, r->busy ? r->retry_error : NULL);
  ebb_buf_puts(b, ",\"last_rejection\":");
  json_str_or_null(b, r->last_rejection);
  ebb_buf_puts(b, ",\"load_error\":");
  json_str_or_null(b, r->load_error);
  ebb_buf_printf(b, ",\"load_failures\":%llu,\"reloads\":%llu,\"skipped\":[",
                 (unsigned long long)r->load_failures, (unsigned long long)r->reloads);
  for (size_t i = 0; i < r->f.n_skipped; i++)
    ebb_buf_printf(b, "%s%lld", i ? "," : "", (long long)r->f.skipped[i]);
  ebb_buf_puts(b, "]}");
}

int ebb_reactors_status(ebb_reactors *h, const char *name, ebb_buf *out) {
  if (name == NULL) {
    ebb_buf_putc(out, '[');
    for (reactor *r = h->list; r; r = r->link) {
      if (r != h->list) ebb_buf_putc(out, ',');
      status_json(h, r, out);
    }
    ebb_buf_putc(out, ']');
    return 1;
  }
  reactor *r = find(h, name);
  if (r == NULL) return 0;
  status_json(h, r, out);
  return 1;
}

int ebb_reactors_schedules(ebb_reactors *h, const char *name, ebb_buf *out) {
  if (find(h, name) == NULL) return 0;
  ebb__rdb_schedules_json(h->db, name, out);
  return 1;
}

static int error_body(ebb_buf *out, int status, const char *code, const char *message) {
  ebb_buf_printf(out, "{\"error\":{\"code\":\"%s\",\"message\":", code);
  ebb_buf_json_string(out, message, strlen(message));
  ebb_buf_puts(out, "}}");
  return status;
}

int ebb_reactors_control(ebb_reactors *h, const char *name, const char *action, ebb_buf *out) {
  reactor *r = find(h, name);
  if (r == NULL) return error_body(out, 404, "not_found", "no such reactor");
  int skip = strcmp(action, "skip") == 0;
  if (!skip && strcmp(action, "retry") != 0)
    return error_body(out, 404, "not_found", "unknown action (retry or skip)");
  if (r->state != ST_FAULTED) return error_body(out, 409, "conflict", "the reactor is not faulted");
  if (r->busy)
    return error_body(out, 409, "conflict",
                      "the reactor still waits for answers to commands it issued: try again");
  if (r->tainted) {
    load_reactor(h, r);
    if (r->load_error) return error_body(out, 500, "script_error", r->load_error);
    r->tainted = 0;
  }
  if (skip) {
    char now[EBB_TIME_LEN + 1];
    ebb_clock_format(ebb_clock_now_ms(), now);
    if (ebb__rdb_run(h->db, "INSERT OR IGNORE INTO reactor_skipped (name, position, error, skipped_at) "
                       "VALUES (?, ?, ?, ?)",
                "titt", r->name, r->fault_position, r->fault ? r->fault : "", now) != 0)
      return error_body(out, 500, "storage_error", sqlite3_errmsg(h->db));
    int64_t *skipped = malloc((r->f.n_skipped + 1) * sizeof *skipped);
    if (skipped == NULL) return error_body(out, 503, "out_of_memory", "out of memory");
    if (r->f.n_skipped) memcpy(skipped, r->f.skipped, r->f.n_skipped * sizeof *skipped);
    skipped[r->f.n_skipped] = r->fault_position;
    ebb_follower_set_skipped(&r->f, skipped, r->f.n_skipped + 1);
    char pos[32];
    snprintf(pos, sizeof pos, "%lld", (long long)r->fault_position);
    ebb_log(EBB_LOG_WARN, "reactor skipped an event", "reactor", r->name, "#position", pos, NULL);
  }
  free(r->fault);
  r->fault = NULL;
  r->fault_position = 0;
  r->state = ST_CATCHING_UP;
  drop_batch(r); /* read again: the skipped event is filtered out */
  schedule_pump(h);
  status_json(h, r, out);
  return 200;
}

static void family(ebb_buf *b, const char *name, const char *type, const char *help) {
  ebb_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void ebb_reactors_metrics(ebb_reactors *h, ebb_buf *out) {
  family(out, "ebb_reactor_lag_events", "gauge", "Events committed and not yet handled.");
  for (reactor *r = h->list; r; r = r->link)
    ebb_buf_printf(out, "ebb_reactor_lag_events{reactor=\"%s\"} %lld\n", r->name,
                   (long long)(h->head > r->f.position ? h->head - r->f.position : 0));
  family(out, "ebb_reactor_commands_issued_total", "counter", "Commands issued and committed.");
  for (reactor *r = h->list; r; r = r->link)
    ebb_buf_printf(out, "ebb_reactor_commands_issued_total{reactor=\"%s\"} %llu\n", r->name,
                   (unsigned long long)r->issued);
  family(out, "ebb_reactor_commands_rejected_total", "counter", "Commands their aggregate rejected.");
  for (reactor *r = h->list; r; r = r->link)
    ebb_buf_printf(out, "ebb_reactor_commands_rejected_total{reactor=\"%s\"} %llu\n", r->name,
                   (unsigned long long)r->rejected);
  family(out, "ebb_reactor_retries_total", "counter", "Commands tried again after a failure.");
  for (reactor *r = h->list; r; r = r->link)
    ebb_buf_printf(out, "ebb_reactor_retries_total{reactor=\"%s\"} %llu\n", r->name,
                   (unsigned long long)r->retries);
  family(out, "ebb_reactor_schedules_pending", "gauge", "Schedules stored and not yet fired.");
  for (reactor *r = h->list; r; r = r->link)
    ebb_buf_printf(out, "ebb_reactor_schedules_pending{reactor=\"%s\"} %lld\n", r->name,
                   (long long)ebb__rdb_count_schedules(h->db, r->name));
  family(out, "ebb_reactor_state", "gauge", "1 for the reactor's state.");
  for (reactor *r = h->list; r; r = r->link)
    for (int st = 0; st < EBB_FOLLOW_N_STATES; st++)
      ebb_buf_printf(out, "ebb_reactor_state{reactor=\"%s\",state=\"%s\"} %d\n", r->name,
                     ebb_follow_state_names[st], r->state == st);
}
