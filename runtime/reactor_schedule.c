/*
 * reactor_schedule.c: schedules firing (see reactor.h). One libuv timer is
 * armed for the earliest schedule whose reactor is caught up and idle; a
 * fired schedule's command carries the id made when it was set. If it is
 * rejected, rejected[type] runs with the event that set it (read back from
 * the store at the position kept with the row, upcast as handlers see it),
 * and its compensations, with ids "<schedule command id>/r<k>", are issued
 * like the reactor's own. The row goes once everything is answered, in one
 * transaction with the rejections to record, so a crash in between fires it
 * again and the store answers the repeats.
 */
#include "reactor_internal.h"

#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "log.h"

#define REFIRE_MS 1000 /* a fired schedule that failed fires again after this */


static void unlink_firing(ebb_reactors *h, firing *fi) {
  for (firing **pp = &h->firings; *pp; pp = &(*pp)->link)
    if (*pp == fi) {
      *pp = fi->link;
      break;
    }
}

void ebb__firing_free(firing *fi) {
  free(fi->name);
  free(fi->key);
  free(fi->event_id);
  free(fi->error);
  ebb__rcommand_clear(&fi->cmd);
  ebb__work_clear(&fi->w);
  ebb_event_list_free(&fi->ev);
  free(fi);
}

/* The compensating firings of a reactor that goes away: their rows stay
 * (it fires them again when it comes back; the store answers repeats). */
void ebb__reactor_drop_firings(ebb_reactors *h, reactor *r) {
  for (firing **pp = &h->firings; *pp;) {
    firing *fi = *pp;
    if (fi->rejected && fi->w.r == r) {
      *pp = fi->link;
      ebb__firing_free(fi);
    } else {
      pp = &fi->link;
    }
  }
}

/* The fired schedule is answered (and its compensations, if any): the row
 * goes, with the rejections to record, in one transaction. Until then a
 * crash fires it again and the store answers what was done. */
static void finish_firing(ebb_reactors *h, firing *fi, reactor *r, const char *refusal) {
  char now[EBB_TIME_LEN + 1];
  ebb_clock_format(ebb_clock_now_ms(), now);
  int ok = ebb__rdb_exec(h->db, "BEGIN IMMEDIATE", NULL) == 0;
  static const char *record =
      "INSERT INTO reactor_rejections (name, position, command_id, aggregate, id, type, error, "
      "at) VALUES (?, NULL, ?, ?, ?, ?, ?, ?)";
  if (ok && refusal)
    ok = ebb__rdb_run(h, record, "ttttttt", fi->name, fi->cmd.command_id, fi->cmd.aggregate,
                      fi->cmd.id, fi->cmd.type, refusal, now) == 0;
  for (size_t i = 0; ok && i < fi->w.n_rej; i++)
    ok = ebb__rdb_run(h, record, "ttttttt", fi->name, fi->w.rej[i].command_id,
                      fi->w.rej[i].aggregate, fi->w.rej[i].id, fi->w.rej[i].type,
                      fi->w.rej[i].error, now) == 0;
  if (ok)
    ok = ebb__rdb_run(h, "DELETE FROM reactor_schedules WHERE name = ? AND key = ? AND "
                             "command_id = ?",
                      "ttt", fi->name, fi->key, fi->cmd.command_id) == 0;
  if (ok) ok = ebb__rdb_exec(h->db, "COMMIT", NULL) == 0;
  if (!ok) {
    ebb_log(EBB_LOG_ERROR, "cannot remove a fired schedule: it fires again", "reactor", fi->name,
            "key", fi->key, "error", sqlite3_errmsg(h->db), NULL);
    ebb__rdb_exec(h->db, "ROLLBACK", NULL);
  }
  if (r && !refusal && !fi->rejected) r->issued++;
  h->fired++;
  unlink_firing(h, fi);
  ebb__firing_free(fi);
  ebb__reactors_arm(h);
}

/* A fired schedule's command was rejected: rejected[type] runs with the
 * event that set the schedule, read back from the store at the position
 * kept with the row and upcast as handlers see it. 1: compensating (the
 * pump issues its commands), 0: no handler, or the event cannot be read
 * (record the rejection), -1: the handler failed (the reactor faults; the
 * row stays). */
static int compensate(reactor *r, firing *fi, const ebb_error *err) {
  ebb_reactors *h = r->h;
  lua_State *L = ebb_sandbox_state(r->sb);
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->module_ref);
  int has = lua_getfield(L, -1, "rejected") == LUA_TTABLE &&
            lua_getfield(L, -1, fi->cmd.type) == LUA_TFUNCTION;
  lua_settop(L, 0);
  if (!has) return 0;
  ebb_error e2;
  ebb_error_init(&e2);
  const char *why = NULL;
  ebb_event_list_init(&fi->ev);
  if (fi->event_position <= 0 || fi->event_id == NULL) {
    why = "the schedule was stored without its event's position";
  } else if (ebb_store_read_range(ebb_runtime_store(h->o.rt), fi->event_position,
                                  fi->event_position, &fi->ev, &e2) != 0 ||
             ebb_runtime_upcast_each(h->o.rt, &fi->ev, &e2) != 0) {
    why = e2.message;
  } else if (fi->ev.n != 1 || strcmp(fi->ev.items[0].id, fi->event_id) != 0) {
    why = "the event is no longer at its position (the store was restored)";
  } else if (fi->ev.items[0].upcast_error) {
    why = fi->ev.items[0].upcast_error;
  }
  if (why) {
    ebb_log(EBB_LOG_WARN, "cannot read the event that set a rejected schedule: recorded, "
            "not compensated", "reactor", r->name, "key", fi->key, "error", why, NULL);
    ebb_error_clear(&e2);
    return 0;
  }
  fi->w.r = r;
  fi->w.fi = fi;
  fi->w.e = &fi->ev.items[0];
  fi->cmd.w = &fi->w;
  L = ebb_sandbox_state(r->sb);
  lua_pushcfunction(L, ebb__reactor_l_rejected);
  lua_pushlightuserdata(L, &fi->w);
  lua_pushlightuserdata(L, &fi->cmd);
  lua_pushlightuserdata(L, (void *)err);
  const ebb_event *e = fi->w.e;
  if (ebb_sandbox_call(r->sb, 3, 1) != LUA_OK) {
    r->tainted = ebb_sandbox_killed(r->sb) != NULL;
    char *m = ebb__reactor_call_error(r->sb);
    ebb__reactor_fault_at(r, e->position, fi->key, ebb_strdupf("schedule %s set by event %lld (%s in %s): rejected.%s: %s",
                                          fi->key, (long long)e->position, e->type, e->stream,
                                          fi->cmd.type, m ? m : "error"));
    free(m);
    return -1;
  }
  lua_pop(L, 1);
  fi->rejected = 1;
  return 1;
}

static void on_fired(void *ud, const ebb_error *err) {
  firing *fi = ud;
  ebb_reactors *h = fi->h;
  h->in_flight--;
  if (h->stopping) {
    unlink_firing(h, fi);
    ebb__firing_free(fi);
    ebb__reactors_maybe_free(h);
    return;
  }
  reactor *r = ebb__reactor_find(h, fi->name);
  if (ebb__reactor_retryable(err->code)) {
    if (r) {
      r->retries++;
      free(r->retry_error);
      r->retry_error = ebb_strdupf("schedule %s: %s: %s", fi->key, ebb_error_name(err->code),
                                   err->message);
    }
    /* The row stays: the timer fires it again after a pause. */
    ebb__rdb_run(h, "UPDATE reactor_schedules SET fire_at_ms = ? WHERE name = ? AND key = ?",
                 "itt", ebb_clock_now_ms() + REFIRE_MS, fi->name, fi->key);
    unlink_firing(h, fi);
    ebb__firing_free(fi);
    ebb__reactors_arm(h);
    return;
  }
  if (err->code == 0) {
    finish_firing(h, fi, r, NULL);
    return;
  }
  if (r) {
    r->rejected++;
    free(r->last_rejection);
    r->last_rejection = ebb_strdupf("%s %s on %s %s: %s", fi->cmd.command_id, fi->cmd.type,
                                    fi->cmd.aggregate, fi->cmd.id, err->message);
  }
  /* A reactor that cannot run rejected[type] now (removed, not loaded,
   * faulted meanwhile): the row stays, and the schedule fires again once it
   * is live (the command is decided again). */
  int c = r && r->sb && r->state != ST_FAULTED ? compensate(r, fi, err) : -1;
  if (c == 0) {
    finish_firing(h, fi, r, err->message);
  } else if (c < 0) {
    unlink_firing(h, fi);
    ebb__firing_free(fi);
    ebb__reactors_arm(h);
  } else {
    ebb__reactors_pump(h);
  }
}

/* The compensating firings: their commands out, and the row gone once all
 * are answered (or, faulted, the firing dropped and the row kept). */
void ebb__reactors_firings(ebb_reactors *h) {
  for (firing *fi = h->firings, *next; fi; fi = next) {
    next = fi->link;
    if (!fi->rejected) continue;
    reactor *r = fi->w.r;
    if (!fi->w.faulted) ebb__reactor_issue_works(r, &fi->w, 1);
    int flying = 0;
    for (size_t i = 0; i < fi->w.n_cmds; i++) flying |= fi->w.cmds[i]->state == C_FLIGHT;
    if (fi->w.faulted && !flying) {
      unlink_firing(h, fi);
      ebb__firing_free(fi);
      ebb__reactors_arm(h);
    } else if (!fi->w.faulted && ebb__work_done(&fi->w)) {
      finish_firing(h, fi, r, NULL);
    }
  }
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
  reactor *r = ebb__reactor_find(h, name);
  return r && r->state == ST_LIVE && !ebb__reactor_pending(r);
}

static void on_sched_timer(uv_timer_t *t) {
  ebb_reactors *h = t->data;
  if (h->stopping || !h->active) return;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(h->db, "SELECT name, key, aggregate, id, type, data, command_id, "
                         "event_id, event_position FROM reactor_schedules WHERE fire_at_ms <= ? "
                         "ORDER BY fire_at_ms", -1, &st, NULL) != SQLITE_OK)
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
    const char *eid = (const char *)sqlite3_column_text(st, 7);
    fi->event_id = eid ? strdup(eid) : NULL;
    fi->event_position = sqlite3_column_int64(st, 8);
    ebb_event_list_init(&fi->ev);
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
  ebb__reactors_arm(h);
}

/* Arms the timer for the earliest schedule not in flight (due ones: now). */
void ebb__reactors_arm(ebb_reactors *h) {
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

