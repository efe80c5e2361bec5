/*
 * reactor.c: the reactor host (see reactor.h): following, issuing, the life
 * cycle and the status.
 *
 * Everything runs on the daemon's loop. A reactor works a batch of events
 * (up to BATCH, read after its checkpoint) as a pipeline: each turn of the
 * loop runs handlers for the next events in global order (one sandboxed call
 * each, making that event's work: commands, schedule changes), issues every
 * command it may, and moves the checkpoint over the oldest events whose
 * commands are all answered. So the commands of many events are in flight at
 * once and the daemon's group commit takes them together, and the answers of
 * one commit become one reactors.db transaction (the checkpoint with the
 * schedules set or cancelled and the rejections recorded by those events, in
 * event order), not one per event. Commands to one aggregate go out one at a
 * time, in the order the handlers made them (an answer lets the next go), so
 * that retries and compensations never reorder them; commands to different
 * aggregates go out together. Events whose handler did nothing move the
 * checkpoint in memory; it is written at most once a second and when the
 * daemon stops.
 *
 * Failures: a rejection goes to rejected[type] (run when the answer comes,
 * with the work of the event that issued the command), whose commands are
 * issued in turn, or is recorded; a script_error, storage failure or
 * shutdown answer is retried with backoff (the same command id, so nothing
 * happens twice; no new handler runs meanwhile and the checkpoint stays
 * before it); a handler error, a command the pipeline refuses as malformed,
 * or a store that cannot be read faults the reactor at the event until retry
 * or skip (the events after it that were in flight run again then, and their
 * commands are answered from the store).
 *
 * Schedules fire from reactor_schedule.c, the Lua side is in
 * reactor_module.c, the durable state in reactor_db.c.
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

#define BATCH 256               /* events read at once: the window of handled events
                                   ahead of the checkpoint */
#define EVENTS_PER_TURN 200     /* handler calls per loop turn, so requests interleave */
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 30000

void ebb__reactors_pump(ebb_reactors *h);
void ebb__reactors_maybe_free(ebb_reactors *h);

/* ---------------------------------------------------------------- faults */

/* Faults the reactor at the event at position (for a schedule whose
 * rejected handler failed, key names it). With events in flight a second
 * fault may come: the earliest event's stays, since retry and skip act on
 * the fault's event and everything after it runs again. */
void ebb__reactor_fault_at(reactor *r, int64_t position, const char *key, char *message) {
  char pos[32];
  snprintf(pos, sizeof pos, "%lld", (long long)position);
  ebb_log(EBB_LOG_ERROR, "reactor faulted", "reactor", r->name, "#position", pos, "error",
          message ? message : "error", NULL);
  if (r->state == ST_FAULTED && r->fault && position >= r->fault_position) {
    free(message);
    return;
  }
  free(r->fault);
  r->fault = message ? message : ebb_strdupf("error");
  r->fault_position = position;
  free(r->fault_key);
  r->fault_key = key ? strdup(key) : NULL;
  r->state = ST_FAULTED;
}

static void set_fault(reactor *r, int64_t position, char *message) {
  ebb__reactor_fault_at(r, position, NULL, message);
}

/* Forgets the batch and the works of its handled events not checkpointed
 * (none of their commands may be in flight): they run again from the
 * checkpoint. */
static void drop_batch(reactor *r) {
  if (r->have_batch) {
    for (size_t k = r->done; k < r->at; k++) ebb__work_clear(&r->works[k]);
    ebb_follower_batch_free(&r->batch);
  }
  r->have_batch = 0;
  r->at = r->done = 0;
}

/* ---------------------------------------------------------------- issuing */

static void issue(reactor *r, rcommand *c);

/* Is the error one that goes away by trying again? */
int ebb__reactor_retryable(int code) {
  return code == EBB_ESCRIPT || code == EBB_ESTORE || code == EBB_EUNAVAIL || code == EBB_EBUSY ||
         code == EBB_ENOMEM || code == EBB_ETIMEOUT || code == EBB_EVERSION;
}

int ebb__work_done(const work *w) {
  for (size_t i = 0; i < w->n_cmds; i++)
    if (w->cmds[i]->state != C_DONE) return 0;
  return 1;
}

static uint64_t target_hash(const rcommand *c) {
  uint64_t x = 1469598103934665603ull;
  for (const char *p = c->aggregate; *p; p++) x = (x ^ (unsigned char)*p) * 1099511628211ull;
  x = (x ^ 0xffu) * 1099511628211ull;
  for (const char *p = c->id; *p; p++) x = (x ^ (unsigned char)*p) * 1099511628211ull;
  return x ? x : 1;
}

/* Issues the pending commands of ws[0..n), in order, except those behind an
 * earlier command to the same aggregate that is not answered yet (in flight,
 * waiting to retry, or held itself): two commands to one aggregate commit in
 * the order the handlers made them, retries and compensations included, while
 * commands to different aggregates go out together and share group commits.
 * The targets seen are a set of hashes; a collision only holds a command
 * back until the earlier one is answered. Nothing goes out past a faulted
 * work: retry or skip issues it again. */
void ebb__reactor_issue_works(reactor *r, work *ws, size_t n) {
  ebb_reactors *h = r->h;
  if (r->removed || h->stopping) return;
  size_t total = 0;
  for (size_t k = 0; k < n; k++) total += ws[k].n_cmds;
  if (total == 0) return;
  size_t cap = 64;
  while (cap < 4 * total) cap <<= 1;
  uint64_t *set = calloc(cap, sizeof *set);
  if (set == NULL) return; /* the next turn tries again */
  size_t used = 0;
  for (size_t k = 0; k < n; k++) {
    work *w = &ws[k];
    /* An answer may come at once (a rejection adds compensations to the
     * list, realloc'ing it): index, never hold a pointer into it. */
    for (size_t i = 0; i < w->n_cmds; i++) {
      rcommand *c = w->cmds[i];
      if (c->state == C_DONE) continue;
      uint64_t hv = target_hash(c);
      size_t s = hv & (cap - 1);
      while (set[s] && set[s] != hv) s = (s + 1) & (cap - 1);
      int held = set[s] == hv || used >= cap / 2;
      if (!held) {
        set[s] = hv;
        used++;
        if (c->state == C_PENDING) issue(r, c);
      }
    }
    if (w->faulted) break;
  }
  free(set);
}

static void on_retry(uv_timer_t *t) {
  reactor *r = t->data;
  ebb_reactors *h = r->h;
  if (h->stopping) return;
  for (size_t k = r->done; r->have_batch && k < r->at; k++)
    for (size_t i = 0; i < r->works[k].n_cmds; i++)
      if (r->works[k].cmds[i]->state == C_RETRY) r->works[k].cmds[i]->state = C_PENDING;
  for (firing *fi = h->firings; fi; fi = fi->link)
    for (size_t i = 0; fi->rejected && fi->w.r == r && i < fi->w.n_cmds; i++)
      if (fi->w.cmds[i]->state == C_RETRY) fi->w.cmds[i]->state = C_PENDING;
  r->waiting = 0;
  ebb__reactors_pump(h);
}

/* Works [from, to) are done: their schedule changes and recorded rejections,
 * in event order, and the checkpoint at the last one's event, in one
 * transaction (one fsync at durability full for the whole group). */
static int commit_works(reactor *r, size_t from, size_t to) {
  ebb_reactors *h = r->h;
  char now[EBB_TIME_LEN + 1];
  ebb_clock_format(ebb_clock_now_ms(), now);
  char *msg = NULL;
  int64_t saved_pos = r->f.position, saved_mark = r->f.mark_position;
  char saved_id[sizeof r->f.mark_id];
  memcpy(saved_id, r->f.mark_id, sizeof saved_id);
  if (ebb__rdb_exec(h->db, "BEGIN IMMEDIATE", &msg) != 0) goto fail;
  for (size_t k = from; k < to; k++) {
    work *w = &r->works[k];
    for (size_t i = 0; i < w->n_ops; i++) {
      schedop *op = &w->ops[i];
      int rc = op->at_ms < 0
                   ? ebb__rdb_run(h, "DELETE FROM reactor_schedules WHERE name = ? AND key = ?",
                                  "tt", r->name, op->key)
                   : ebb__rdb_run(h,
                                  "INSERT OR REPLACE INTO reactor_schedules (name, key, fire_at_ms, "
                                  "aggregate, id, type, data, command_id, event_id, created_at, "
                                  "event_position) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                  "ttitttttt" "ti", r->name, op->key, op->at_ms, op->cmd.aggregate,
                                  op->cmd.id, op->cmd.type, op->cmd.data, op->cmd.command_id,
                                  w->e->id, now, w->e->position);
      if (rc != 0) goto fail;
    }
    for (size_t i = 0; i < w->n_rej; i++)
      if (ebb__rdb_run(h,
                       "INSERT INTO reactor_rejections (name, position, command_id, aggregate, id, "
                       "type, error, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       "titttttt", r->name, w->e->position, w->rej[i].command_id,
                       w->rej[i].aggregate, w->rej[i].id, w->rej[i].type, w->rej[i].error, now) != 0)
        goto fail;
  }
  r->f.position = r->works[to - 1].e->position;
  ebb_follower_mark(&r->f, r->works[to - 1].e);
  if (ebb__rdb_write_checkpoint(r) != 0 || ebb__rdb_exec(h->db, "COMMIT", &msg) != 0) goto fail;
  r->written = r->f.position;
  r->written_ms = ebb_clock_now_ms();
  return 0;
fail:
  if (msg == NULL) msg = ebb_strdupf("reactors.db: %s", sqlite3_errmsg(h->db));
  ebb__rdb_exec(h->db, "ROLLBACK", NULL);
  r->f.position = saved_pos;
  r->f.mark_position = saved_mark;
  memcpy(r->f.mark_id, saved_id, sizeof saved_id);
  r->works[from].faulted = 1;
  set_fault(r, r->works[from].e->position, ebb_strdupf("cannot store the checkpoint: %s", msg));
  free(msg);
  return -1;
}

/* Moves the checkpoint over the handled events whose commands are all
 * answered, from the oldest on: up to the first still waiting (in flight,
 * held, retrying) or faulted, so the checkpoint never passes a command
 * that may still have to be issued. Events that made nothing durable move
 * it in memory only (lazy_checkpoint writes it). */
static void flush(reactor *r) {
  ebb_reactors *h = r->h;
  if (!r->have_batch || r->removed || h->stopping) return;
  size_t end = r->done;
  int durable = 0, ops = 0;
  while (end < r->at && !r->works[end].faulted && ebb__work_done(&r->works[end])) {
    work *w = &r->works[end];
    durable |= w->n_cmds || w->n_ops || w->n_rej;
    ops |= w->n_ops > 0;
    end++;
  }
  if (end == r->done) return;
  if (durable) {
    if (commit_works(r, r->done, end) != 0) return;
  } else {
    r->f.position = r->works[end - 1].e->position;
    ebb_follower_mark(&r->f, r->works[end - 1].e);
  }
  for (size_t k = r->done; k < end; k++) ebb__work_clear(&r->works[k]);
  r->events_total += end - r->done;
  r->done = end;
  r->rearm = 1;
  if (ops) ebb__reactors_arm(h);
}

static void free_reactor(reactor *r);

static void on_issued(void *ud, const ebb_error *err) {
  rcommand *c = ud;
  work *w = c->w;
  reactor *r = w->r;
  ebb_reactors *h = r->h;
  h->in_flight--;
  r->flying--;
  c->state = C_DONE;
  if (r->removed || h->stopping) {
    if (r->removed && r->flying == 0) {
      ebb__reactor_drop_firings(h, r);
      free_reactor(r);
    }
    ebb__reactors_maybe_free(h);
    return;
  }
  const ebb_event *e = w->e;
  if (err->code == 0) {
    r->issued++;
    if (r->waiting == 0) {
      r->backoff_ms = 0;
      free(r->retry_error);
      r->retry_error = NULL;
    }
  } else if (err->code == EBB_EREJECTED || err->code == EBB_EDELETED) {
    r->rejected++;
    free(r->last_rejection);
    r->last_rejection = ebb_strdupf("%s %s on %s %s: %s", c->command_id, c->type, c->aggregate,
                                    c->id, err->message);
    /* rejected[type] compensates with commands of its own (issued by the
     * next pump, in order with the others); else recorded. */
    lua_State *L = ebb_sandbox_state(r->sb);
    lua_pushcfunction(L, ebb__reactor_l_rejected);
    lua_pushlightuserdata(L, w);
    lua_pushlightuserdata(L, c);
    lua_pushlightuserdata(L, (void *)err);
    if (ebb_sandbox_call(r->sb, 3, 1) != LUA_OK) {
      r->tainted = ebb_sandbox_killed(r->sb) != NULL;
      char *m = ebb__reactor_call_error(r->sb);
      w->faulted = 1;
      ebb__reactor_fault_at(r, e->position, w->fi ? w->fi->key : NULL,
                ebb_strdupf("%s%s%sevent %lld (%s in %s): rejected.%s: %s", w->fi ? "schedule " : "",
                            w->fi ? w->fi->key : "", w->fi ? " set by " : "", (long long)e->position,
                            e->type, e->stream, c->type, m ? m : "error"));
      free(m);
    } else {
      int handled = lua_toboolean(L, -1);
      lua_pop(L, 1);
      if (!handled) {
        rejection *p = realloc(w->rej, (w->n_rej + 1) * sizeof *p);
        if (p) {
          w->rej = p;
          p[w->n_rej++] = (rejection){strdup(c->command_id), strdup(c->aggregate), strdup(c->id),
                                      strdup(c->type), strdup(err->message)};
        }
      }
    }
  } else if (ebb__reactor_retryable(err->code)) {
    c->state = C_RETRY;
    c->attempts++;
    r->waiting++;
    r->retries++;
    free(r->retry_error);
    r->retry_error = ebb_strdupf("%s %s: %s", c->command_id, ebb_error_name(err->code), err->message);
    ebb_log(EBB_LOG_WARN, "reactor command failed; retrying with backoff", "reactor", r->name,
            "command_id", c->command_id, "error", err->message, NULL);
    /* One backoff for the reactor: the commands that fail together go again together. */
    if (!uv_is_active((uv_handle_t *)&r->retry)) {
      r->backoff_ms = r->backoff_ms ? r->backoff_ms * 2 : BACKOFF_MIN_MS;
      if (r->backoff_ms > BACKOFF_MAX_MS) r->backoff_ms = BACKOFF_MAX_MS;
      uv_timer_start(&r->retry, on_retry, (uint64_t)r->backoff_ms, 0);
    }
  } else {
    /* Malformed, unknown aggregate or command, a command id taken: the
     * handler is wrong, not the moment. */
    w->faulted = 1;
    ebb__reactor_fault_at(r, e->position, w->fi ? w->fi->key : NULL,
              ebb_strdupf("event %lld (%s in %s): command %s (%s on %s %s) failed: %s: %s",
                          (long long)e->position, e->type, e->stream, c->command_id, c->type,
                          c->aggregate, c->id, ebb_error_name(err->code), err->message));
  }
  /* The pump moves the checkpoint once per turn: the answers of one group
   * commit share one reactors.db transaction. */
  ebb__reactors_pump(h);
}

static void issue(reactor *r, rcommand *c) {
  ebb_reactors *h = r->h;
  const ebb_event *e = c->w->e;
  /* correlation: the event's (or, at the start of a chain, the event itself);
   * causation: the event. */
  ebb_buf meta = EBB_BUF_INIT;
  ebb_buf_puts(&meta, "{\"correlation_id\":");
  const char *corr = c->w->correlation_id ? c->w->correlation_id : e->id;
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
  r->flying++;
  h->in_flight++;
  h->o.issue(h->o.issue_ud, &cmd, on_issued, c);
  ebb_buf_free(&meta);
}

/* ---------------------------------------------------------------- following */

/* Runs the handler of the batch's next event into its work. 0, or -1 when
 * faulted. Its commands go out with the others' in issue_works. */
static int handle_event(reactor *r) {
  const ebb_event *e = &r->batch.events.items[r->at];
  work *w = &r->works[r->at];
  ebb__work_clear(w);
  w->r = r;
  w->fi = NULL;
  w->e = e;
  lua_State *L = ebb_sandbox_state(r->sb);
  lua_pushcfunction(L, ebb__reactor_l_on);
  lua_pushlightuserdata(L, w);
  if (ebb_sandbox_call(r->sb, 1, 0) != LUA_OK) {
    r->tainted = ebb_sandbox_killed(r->sb) != NULL;
    char *m = ebb__reactor_call_error(r->sb);
    set_fault(r, e->position, ebb_strdupf("event %lld (%s in %s): %s", (long long)e->position,
                                          e->type, e->stream, m ? m : "error"));
    free(m);
    ebb__work_clear(w);
    return -1;
  }
  r->at++;
  return 0;
}

/* Writes a checkpoint that moved past events the reactor did nothing for.
 * Losing it costs only running those handlers again (they issued nothing),
 * so it is written at most once a second, and when the daemon stops. Not
 * each time the reactor catches up: under load it does after every commit,
 * and a write (with its fsync) per commit was 5% of the daemon's CPU. */
static void lazy_checkpoint(reactor *r) {
  int64_t now = ebb_clock_now_ms();
  if (r->written == r->f.position || now - r->written_ms < 1000) return;
  if (ebb__rdb_write_checkpoint(r) == 0) {
    r->written = r->f.position;
    r->written_ms = now;
  }
}

/* Handled events whose checkpoint is not written yet. */
int ebb__reactor_pending(const reactor *r) {
  return r->have_batch && r->at > r->done;
}

/* Works the reactor for one turn of the loop: handlers for the batch's
 * events in global order (up to the whole batch ahead of the checkpoint:
 * the window), their commands issued as they allow, then the checkpoint
 * over what is answered. While a command waits to retry no new handler
 * runs. */
static void advance(reactor *r, int *budget) {
  ebb_reactors *h = r->h;
  while (r->sb && r->state != ST_FAULTED && r->state != ST_STOPPED) {
    if (!r->have_batch) {
      if (*budget <= 0) break;
      if (r->f.position >= h->head) {
        lazy_checkpoint(r);
        if (r->state != ST_LIVE || r->rearm) {
          /* Caught up: its due schedules may fire now. */
          r->state = ST_LIVE;
          r->rearm = 0;
          ebb__reactors_arm(h);
        }
        break;
      }
      if (r->works == NULL && (r->works = calloc(BATCH, sizeof *r->works)) == NULL) break;
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
        break;
      }
      if (rc == 0) {
        ebb_follower_batch_free(&r->batch);
        continue;
      }
      r->have_batch = 1;
      r->at = r->done = 0;
      if (h->head - r->f.position > BATCH) r->state = ST_CATCHING_UP;
    }
    if (r->at < r->batch.n) {
      if (*budget <= 0 || r->waiting) break;
      (*budget)--;
      if (handle_event(r) != 0) break;
      continue;
    }
    if (r->done < r->at) break; /* every event handled: waiting for answers */
    /* The batch is through: the checkpoint goes to where the follower read. */
    const ebb_event *bad = r->batch.bad;
    if (bad) {
      char *why = ebb_strdupf("event %lld (%s in %s): %s", (long long)bad->position, bad->type,
                              bad->stream, bad->upcast_error);
      r->f.position = r->batch.checkpoint;
      drop_batch(r);
      if (ebb__rdb_write_checkpoint(r) == 0) r->written = r->f.position;
      set_fault(r, r->f.position + 1, why);
      break;
    }
    r->f.position = r->batch.checkpoint;
    drop_batch(r);
    lazy_checkpoint(r);
  }
  if (!ebb__reactor_pending(r)) return;
  ebb__reactor_issue_works(r, r->works + r->done, r->at - r->done);
  flush(r);
  /* All answered at once (commands the store knew): the batch is through. */
  if (r->have_batch && r->done == r->batch.n && r->state != ST_FAULTED) ebb__reactors_pump(h);
}

static void on_pump(uv_idle_t *idle) {
  ebb_reactors *h = idle->data;
  uv_idle_stop(idle);
  h->pumping = 0;
  if (h->stopping || !h->active) return;
  ebb__reactors_firings(h);
  int budget = EVENTS_PER_TURN;
  for (reactor *r = h->list; r; r = r->link) advance(r, &budget);
  if (budget <= 0) ebb__reactors_pump(h);
}

void ebb__reactors_pump(ebb_reactors *h) {
  if (h->pumping || h->stopping || !h->active) return;
  h->pumping = 1;
  uv_idle_start(&h->pump, on_pump);
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
  if (!ebb__reactor_pending(r)) drop_batch(r); /* read again with the new `from` */
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
  free(r->works);
  free(r->fault_key);
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
    if (r->flying) {
      r->removed = 1; /* freed when its last answer comes */
    } else {
      ebb__reactor_drop_firings(h, r);
      free_reactor(r);
    }
  }
  ebb__reactors_pump(h);
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
  ebb__reactors_arm(h);
  *out = h;
  return 0;
fail:
  if (h->db) ebb__rdb_close(h);
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
void ebb__reactors_maybe_free(ebb_reactors *h) {
  if (!h->stopping || h->in_flight > 0 || h->db == NULL) return;
  while (h->firings) {
    firing *fi = h->firings;
    h->firings = fi->link;
    ebb__firing_free(fi);
  }
  while (h->list) {
    reactor *r = h->list;
    h->list = r->link;
    free_reactor(r);
  }
  ebb__rdb_close(h);
  uv_close((uv_handle_t *)&h->pump, on_handle_closed);
  uv_close((uv_handle_t *)&h->sched_timer, on_handle_closed);
  uv_close((uv_handle_t *)&h->rescan_timer, on_handle_closed);
  if (h->watching) uv_close((uv_handle_t *)&h->watch, on_handle_closed);
}

void ebb_reactors_stop(ebb_reactors *h) {
  if (h == NULL || h->stopping) return;
  h->stopping = 1;
  /* What lazy_checkpoint left in memory (f.position only ever moves to a
   * checkpoint that may be written). */
  for (reactor *r = h->list; r; r = r->link)
    if (h->db && !r->removed && r->written != r->f.position && ebb__rdb_write_checkpoint(r) == 0)
      r->written = r->f.position;
  uv_idle_stop(&h->pump);
  uv_timer_stop(&h->sched_timer);
  uv_timer_stop(&h->rescan_timer);
  if (h->watching) uv_fs_event_stop(&h->watch);
  for (reactor *r = h->list; r; r = r->link) uv_timer_stop(&r->retry);
  ebb__reactors_maybe_free(h);
}

void ebb_reactors_set_active(ebb_reactors *h, int active) {
  h->active = active;
  if (active) {
    ebb__reactors_arm(h);
    ebb__reactors_pump(h);
  } else {
    uv_timer_stop(&h->sched_timer);
  }
}

void ebb_reactors_notify(ebb_reactors *h, int64_t head) {
  if (head <= h->head) return;
  h->head = head;
  ebb__reactors_pump(h);
}

void ebb_reactors_rescan(ebb_reactors *h) {
  if (h->stopping) return;
  scan(h);
}

/* ---------------------------------------------------------------- status */

reactor *ebb__reactor_find(ebb_reactors *h, const char *name) {
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
                 (long long)ebb__rdb_count_schedules(h->db, r->name), (int)r->flying);
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
  json_str_or_null(b, r->waiting || r->flying ? r->retry_error : NULL);
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
  reactor *r = ebb__reactor_find(h, name);
  if (r == NULL) return 0;
  status_json(h, r, out);
  return 1;
}

int ebb_reactors_schedules(ebb_reactors *h, const char *name, ebb_buf *out) {
  if (ebb__reactor_find(h, name) == NULL) return 0;
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
  reactor *r = ebb__reactor_find(h, name);
  if (r == NULL) return error_body(out, 404, "not_found", "no such reactor");
  int skip = strcmp(action, "skip") == 0;
  if (!skip && strcmp(action, "retry") != 0)
    return error_body(out, 404, "not_found", "unknown action (retry or skip)");
  if (r->state != ST_FAULTED) return error_body(out, 409, "conflict", "the reactor is not faulted");
  if (r->flying || r->waiting)
    return error_body(out, 409, "conflict",
                      "the reactor still waits for answers to commands it issued: try again");
  flush(r); /* what was answered before the fault keeps its checkpoint */
  if (r->tainted) {
    load_reactor(h, r);
    if (r->load_error) return error_body(out, 500, "script_error", r->load_error);
    r->tainted = 0;
  }
  if (skip && r->fault_key) {
    /* A schedule whose rejected handler failed: it goes, recorded as rejected. */
    char now[EBB_TIME_LEN + 1];
    ebb_clock_format(ebb_clock_now_ms(), now);
    int ok = ebb__rdb_exec(h->db, "BEGIN IMMEDIATE", NULL) == 0 &&
             ebb__rdb_run(h,
                          "INSERT INTO reactor_rejections (name, position, command_id, aggregate, "
                          "id, type, error, at) SELECT name, NULL, command_id, aggregate, id, type, "
                          "?, ? FROM reactor_schedules WHERE name = ? AND key = ?",
                          "tttt", r->fault ? r->fault : "", now, r->name, r->fault_key) == 0 &&
             ebb__rdb_run(h, "DELETE FROM reactor_schedules WHERE name = ? AND key = ?", "tt",
                          r->name, r->fault_key) == 0 &&
             ebb__rdb_exec(h->db, "COMMIT", NULL) == 0;
    if (!ok) {
      ebb__rdb_exec(h->db, "ROLLBACK", NULL);
      return error_body(out, 500, "storage_error", sqlite3_errmsg(h->db));
    }
    ebb_log(EBB_LOG_WARN, "reactor skipped a schedule", "reactor", r->name, "key", r->fault_key,
            NULL);
  } else if (skip) {
    char now[EBB_TIME_LEN + 1];
    ebb_clock_format(ebb_clock_now_ms(), now);
    if (ebb__rdb_run(h, "INSERT OR IGNORE INTO reactor_skipped (name, position, error, skipped_at) "
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
  free(r->fault_key);
  r->fault_key = NULL;
  r->fault_position = 0;
  r->state = ST_CATCHING_UP;
  drop_batch(r); /* read again: the skipped event is filtered out */
  ebb__reactors_pump(h);
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
