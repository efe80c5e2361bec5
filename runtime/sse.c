/*
 * sse.c: live subscriptions, `GET /subscribe`, as Server-Sent Events.
 *
 * A subscriber is a cursor (the last position it was sent) over the store.
 * Every delivery reads the store after the cursor, so catch-up and live
 * delivery are one mechanism and there can be no gap or duplicate between
 * them; the loop reads once per subscriber per turn of commits, never per
 * commit.
 *
 * Memory: the bytes queued for a subscriber never exceed `subscriber_buffer`
 * (one event larger than that is sent alone, into an empty queue), and a
 * store read for it stops at that many bytes too. An event goes out only if
 * it fits. When it does not: a live subscriber (one that was caught up) is
 * cut off with a last `overflow` event saying where to resume, so writers
 * never wait; a subscriber catching up waits for its client to read (a short
 * timer looks again), and is cut off the same way if its client takes none
 * of the queued bytes during a whole heartbeat interval.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "daemon.h"
#include "log.h"

#define PAGE 256
#define PACE_MS 10

struct ebb_subscriber {
  ebb_daemon *d;
  ebb_http_conn *c;
  int64_t after;      /* read after this position next */
  int64_t last_sent;  /* the position of the last event sent: where to resume */
  char *category, *type;
  int live;           /* caught up with the store */
  int waiting;        /* catching up, and the next event does not fit in its buffer */
  size_t need;        /* ... the bytes that event takes (0: unknown) */
  int ended;
  uint64_t queued;    /* bytes ever queued for it: queued - pending is what its client took */
  uint64_t taken_at_beat; /* ... at the last heartbeat, while waiting */
  int beat_marked;    /* taken_at_beat was recorded while waiting */
  ebb_subscriber *prev, *next;
};

static void unlink_sub(ebb_daemon *d, ebb_subscriber *s) {
  if (s->prev) s->prev->next = s->next;
  else if (d->subscribers == s) d->subscribers = s->next;
  if (s->next) s->next->prev = s->prev;
  s->prev = s->next = NULL;
  d->n_subscribers--;
}

static void on_sub_close(ebb_http_conn *c, void *data) {
  (void)c;
  ebb_subscriber *s = data;
  unlink_sub(s->d, s);
  free(s->category);
  free(s->type);
  free(s);
}

static int sub_write(ebb_subscriber *s, const char *data, size_t len) {
  s->queued += len;
  return ebb_http_stream_write(s->c, data, len);
}

/* Ends the stream with a last event; the close callback frees the subscriber. */
static void end_with(ebb_subscriber *s, const char *event, const char *code, const char *message) {
  if (s->ended) return;
  s->ended = 1;
  ebb_buf b = EBB_BUF_INIT;
  ebb_buf_printf(&b, "event: %s\ndata: {\"code\":\"%s\",\"message\":", event, code);
  ebb_buf_json_string(&b, message, strlen(message));
  ebb_buf_printf(&b, ",\"resume_after\":%lld}\n\n", (long long)s->last_sent);
  if (!b.oom) sub_write(s, b.data, b.len);
  ebb_buf_free(&b);
  ebb_http_stream_end(s->c);
}

static void overflow(ebb_subscriber *s, const char *why) {
  s->d->m.sse_overflows++;
  char n[32];
  snprintf(n, sizeof n, "%lld", (long long)s->last_sent);
  ebb_log(EBB_LOG_WARN, why, "#resume_after", n, NULL);
  end_with(s, "overflow", "too_large",
           "this subscriber fell too far behind and was cut off; resume with Last-Event-ID");
}

/* Sends what the store holds after the cursor, as much as fits in the
 * subscriber's buffer. 1: waiting for the client to read. */
static int pump_one(ebb_subscriber *s) {
  ebb_daemon *d = s->d;
  ebb_store *store = ebb_runtime_store(d->rt);
  size_t cap = (size_t)d->cfg->subscriber_buffer;
  ebb_event_list l;
  ebb_event_list_init(&l);
  ebb_buf b = EBB_BUF_INIT, ev = EBB_BUF_INIT;
  ebb_error err;
  ebb_error_init(&err);
  s->waiting = 0;
  while (!s->ended && !s->waiting) {
    size_t pending = ebb_http_stream_pending(s->c);
    /* Not before the event that did not fit fits: reading it again would
     * copy up to a buffer's worth from the store every pace, for nothing. */
    if (!s->live && pending > 0 && (pending >= cap || pending + s->need > cap)) {
      s->waiting = 1;
      break;
    }
    int64_t head;
    /* Never read more than could be queued: a page of large events must not
     * sit in memory for a subscriber that cannot take it. */
    ebb_read_all q = {.after = s->after, .limit = PAGE, .category = s->category, .type = s->type,
                      .max_bytes = cap};
    ebb_event_list_clear(&l);
    if (ebb_store_head(store, &head, &err) || ebb_store_read_all(store, &q, &l, &err) ||
        ebb_runtime_upcast_each(d->rt, &l, &err)) {
      ebb_log(EBB_LOG_ERROR, "subscription stopped", "error", err.message, NULL);
      end_with(s, "error", ebb_error_name(err.code), err.message);
      break;
    }
    size_t read_bytes = 0, sent = 0;
    for (size_t i = 0; i < l.n; i++) read_bytes += l.items[i].data_len + l.items[i].metadata_len;
    ebb_buf_reset(&b);
    for (; sent < l.n; sent++) {
      ebb_buf_reset(&ev);
      ebb_buf_printf(&ev, "id: %lld\ndata: ", (long long)l.items[sent].position);
      ebb_event_to_json(&l.items[sent], &ev);
      ebb_buf_puts(&ev, "\n\n");
      if (pending + b.len > 0 && pending + b.len + ev.len > cap) { /* does not fit */
        s->need = ev.len;
        break;
      }
      ebb_buf_append(&b, ev.data, ev.len);
    }
    if (b.oom || ev.oom || (b.len && sub_write(s, b.data, b.len) != 0)) {
      end_with(s, "error", "out_of_memory", "cannot queue events for this subscriber");
      break;
    }
    d->m.sse_events_sent += sent;
    if (sent == l.n) s->need = 0;
    if (sent) s->after = s->last_sent = l.items[sent - 1].position;
    if (sent < l.n) {
      if (s->live) overflow(s, "subscriber too slow: cut off");
      else s->waiting = 1;
      break;
    }
    if (l.n < PAGE && read_bytes < cap) {
      /* Everything up to head was seen (filtered or sent): skip it next time. */
      if (head > s->after) s->after = head;
      s->live = 1;
      break;
    }
  }
  if (!s->waiting) s->beat_marked = 0;
  ebb_event_list_free(&l);
  ebb_buf_free(&b);
  ebb_buf_free(&ev);
  ebb_error_clear(&err);
  return s->waiting;
}

static void on_pace(uv_timer_t *t);

static void pump_all(ebb_daemon *d, int only_waiting) {
  int waiting = 0;
  for (ebb_subscriber *s = d->subscribers, *next; s; s = next) {
    next = s->next;
    if (s->ended || (only_waiting && s->live)) continue;
    waiting |= pump_one(s);
  }
  if (waiting && !d->stopped) {
    if (!uv_is_active((uv_handle_t *)&d->pump_timer))
      uv_timer_start(&d->pump_timer, on_pace, PACE_MS, PACE_MS);
  } else if (!d->stopped) {
    uv_timer_stop(&d->pump_timer);
  }
}

static void on_pace(uv_timer_t *t) {
  pump_all(t->data, 1);
}

void ebb__sse_pump(ebb_daemon *d) {
  pump_all(d, 0);
}

void ebb__sse_start(ebb_daemon *d, ebb_http_conn *c, const char *query, int64_t after,
                    const char *category, const char *type) {
  (void)query;
  ebb_subscriber *s = calloc(1, sizeof *s);
  if (s == NULL || (category && (s->category = strdup(category)) == NULL) ||
      (type && (s->type = strdup(type)) == NULL)) {
    if (s) free(s->category);
    free(s);
    ebb_http_respond_error(c, 503, "out_of_memory", "out of memory");
    return;
  }
  s->d = d;
  s->c = c;
  s->after = s->last_sent = after;
  if (ebb_http_stream_start(c, 200, "text/event-stream",
                            "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n") != 0) {
    free(s->category);
    free(s->type);
    free(s);
    return;
  }
  ebb_http_conn_set_data(c, s, on_sub_close);
  s->next = d->subscribers;
  if (d->subscribers) d->subscribers->prev = s;
  d->subscribers = s;
  d->n_subscribers++;
  /* A first comment, so clients see the stream open even with nothing to send. */
  char hello[64];
  int n = snprintf(hello, sizeof hello, ": subscribed after %lld\n\n", (long long)after);
  sub_write(s, hello, (size_t)n);
  pump_all(d, 0);
}

void ebb__sse_heartbeat(ebb_daemon *d) {
  for (ebb_subscriber *s = d->subscribers, *next; s; s = next) {
    next = s->next;
    if (s->ended) continue;
    if (!s->waiting) {
      s->beat_marked = 0;
      sub_write(s, ":heartbeat\n\n", 12);
      continue;
    }
    /* Waiting with a full buffer: its client has the stream's bytes to read. */
    uint64_t taken = s->queued - ebb_http_stream_pending(s->c);
    if (s->beat_marked && taken == s->taken_at_beat) {
      overflow(s, "subscriber read nothing for a heartbeat interval while catching up: cut off");
      continue;
    }
    s->beat_marked = 1;
    s->taken_at_beat = taken;
  }
}

void ebb__sse_close_all(ebb_daemon *d, const char *why) {
  for (ebb_subscriber *s = d->subscribers, *next; s; s = next) {
    next = s->next;
    end_with(s, "shutdown", "unavailable", why);
  }
}
