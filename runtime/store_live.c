/*
 * store_live.c: the store's links on the daemon's loop (see store_live.h).
 *
 * Each link has a uv_poll_t on its socket, remade whenever the socket may
 * have changed (at each step of connecting, libpq may open a new one, and
 * always does after a reconnect), and a timer for the pause before the next connection attempt:
 * 100 ms, doubling up to 5 s, back to 100 ms once a link is up again, so a
 * server that is down costs one connection attempt every few seconds, never
 * a busy loop. Nothing here reads the events: the watch link only learns the
 * head, and the daemon reads from its last position, as it does after its
 * own commits.
 */
#include "store_live.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "store.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000

typedef struct side {
  struct ebb_live *owner;
  ebb_store_link *link;
  uv_poll_t *poll; /* NULL: none; on fd */
  int fd;
  uv_timer_t timer;
  uint64_t backoff_ms;
  int was_up;
} side;

struct ebb_live {
  ebb_live_options opt;
  side watch, leader;
  int is_leader, connected;
  int closing;     /* handles still to close before the memory goes */
  int stopping;
  uint64_t reconnects, wakeups;
  char error[1024];
};

static void on_poll(uv_poll_t *p, int status, int events);

static void free_poll(uv_handle_t *h) {
  free(h);
}

static void close_poll(side *s) {
  if (s->poll) uv_close((uv_handle_t *)s->poll, free_poll);
  s->poll = NULL;
  s->fd = -1;
}

/* Watches the link's socket for what it wants now. */
static void sync_poll(side *s) {
  int fd = ebb_store_link_fd(s->link);
  int wants = ebb_store_link_wants(s->link);
  if (fd != s->fd) close_poll(s);
  if (fd < 0) return;
  if (s->poll == NULL) {
    s->poll = malloc(sizeof *s->poll);
    if (s->poll == NULL || uv_poll_init_socket(s->owner->opt.loop, s->poll, fd) != 0) {
      free(s->poll);
      s->poll = NULL;
      return;
    }
    s->poll->data = s;
    s->fd = fd;
  }
  int ev = (wants & EBB_LINK_READ ? UV_READABLE : 0) | (wants & EBB_LINK_WRITE ? UV_WRITABLE : 0);
  uv_poll_start(s->poll, ev ? ev : UV_READABLE, on_poll);
}

static void set_error(ebb_live *l, const char *msg) {
  snprintf(l->error, sizeof l->error, "%s", msg);
}

static void lost_leadership(ebb_live *l) {
  if (!l->is_leader) return;
  l->is_leader = 0;
  ebb_log(EBB_LOG_WARN, "leader lock lost", NULL);
  if (l->opt.on_leader) l->opt.on_leader(l->opt.ud, 0);
}

/* The link failed: down it stays until its timer fires. */
static void broke(side *s, const ebb_error *err) {
  ebb_live *l = s->owner;
  close_poll(s);
  if (s == &l->leader) lost_leadership(l);
  if (s == &l->watch) l->connected = 0;
  if (s->was_up) {
    l->reconnects++;
    ebb_log(EBB_LOG_WARN, "store link lost, reconnecting", "link",
            s == &l->watch ? "watch" : "leader", "reason", err->message, NULL);
  }
  s->was_up = 0;
  set_error(l, err->message);
}

static void on_timer(uv_timer_t *t);
static void on_retry(uv_timer_t *t);

static void schedule(side *s) {
  uv_timer_start(&s->timer, on_timer, s->backoff_ms, 0);
  s->backoff_ms = s->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : s->backoff_ms * 2;
}

static void step(side *s) {
  if (s->owner->stopping) return;
  ebb_live *l = s->owner;
  ebb_store_link_news news;
  ebb_error err;
  ebb_error_init(&err);
  int connecting = !ebb_store_link_up(s->link);
  if (ebb_store_link_step(s->link, &news, &err) != 0) {
    broke(s, &err);
    ebb_error_clear(&err);
    schedule(s);
    return;
  }
  ebb_error_clear(&err);
  if (!s->was_up && ebb_store_link_up(s->link)) {
    s->was_up = 1;
    s->backoff_ms = BACKOFF_MIN_MS;
    if (s == &l->watch) {
      l->connected = 1;
      l->error[0] = '\0';
    }
  }
  /* While connecting, libpq may close its socket and open another (the next
   * address of a host name) that gets the same number: a fresh handle
   * registers whatever the number now names. */
  if (connecting) close_poll(s);
  sync_poll(s);
  if (news.head >= 0) {
    l->wakeups++;
    if (l->opt.on_head) l->opt.on_head(l->opt.ud, news.head);
  }
  if (news.retry_ms > 0) uv_timer_start(&s->timer, on_retry, (uint64_t)news.retry_ms, 0);
  if (news.leader && !l->is_leader) {
    l->is_leader = 1;
    ebb_log(EBB_LOG_INFO, "leader lock taken: this daemon is the leader", NULL);
    if (l->opt.on_leader) l->opt.on_leader(l->opt.ud, 1);
  }
}

static void on_poll(uv_poll_t *p, int status, int events) {
  (void)status;
  (void)events;
  /* An error on the socket shows in the step that reads it. */
  step(p->data);
}

/* Starts what the link sends next (connecting, or asking for the lock). */
static void send_next(side *s, int (*fn)(ebb_store_link *, ebb_error *)) {
  ebb_error err;
  ebb_error_init(&err);
  if (fn(s->link, &err) != 0) {
    broke(s, &err);
    schedule(s);
  } else {
    sync_poll(s);
  }
  ebb_error_clear(&err);
}

static void connect_side(side *s) {
  send_next(s, ebb_store_link_start);
}

static void on_timer(uv_timer_t *t) {
  connect_side(t->data);
}

/* The leader lock was held elsewhere: ask again. */
static void on_retry(uv_timer_t *t) {
  side *s = t->data;
  if (!s->owner->stopping) send_next(s, ebb_store_link_retry);
}

static int init_side(ebb_live *l, side *s, int kind, ebb_error *err) {
  s->owner = l;
  s->fd = -1;
  s->backoff_ms = BACKOFF_MIN_MS;
  if (ebb_store_link_new(&s->link, l->opt.store, kind, err)) return err->code;
  uv_timer_init(l->opt.loop, &s->timer);
  s->timer.data = s;
  l->closing++;
  return 0;
}

static void on_closed(uv_handle_t *h) {
  side *s = h->data;
  ebb_live *l = s->owner;
  if (--l->closing == 0) free(l);
}

static void stop_side(side *s) {
  if (s->link == NULL) return;
  close_poll(s);
  ebb_store_link_free(s->link); /* closes the connection: the lock goes with it */
  s->link = NULL;
  uv_close((uv_handle_t *)&s->timer, on_closed);
}

int ebb_live_start(ebb_live **out, const ebb_live_options *opt, ebb_error *err) {
  *out = NULL;
  ebb_store_link *probe = NULL;
  if (ebb_store_link_new(&probe, opt->store, EBB_LINK_WATCH, err)) return err->code;
  if (probe == NULL) return 0; /* not shared */
  ebb_store_link_free(probe);
  ebb_live *l = calloc(1, sizeof *l);
  if (l == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  l->opt = *opt;
  if (init_side(l, &l->watch, EBB_LINK_WATCH, err) ||
      init_side(l, &l->leader, EBB_LINK_LEADER, err)) {
    ebb_live_stop(l);
    return err->code;
  }
  connect_side(&l->watch);
  connect_side(&l->leader);
  *out = l;
  return 0;
}

void ebb_live_stop(ebb_live *l) {
  if (l == NULL) return;
  l->stopping = 1;
  int none = l->closing == 0;
  stop_side(&l->watch);
  stop_side(&l->leader);
  if (none) free(l);
}

int ebb_live_leader(const ebb_live *l) {
  return l == NULL || l->is_leader;
}

void ebb_live_status_get(const ebb_live *l, ebb_live_status *out) {
  memset(out, 0, sizeof *out);
  if (l == NULL) {
    out->connected = 1;
    out->leader = 1;
    return;
  }
  out->connected = l->connected;
  out->leader = l->is_leader;
  out->reconnects = l->reconnects;
  out->wakeups = l->wakeups;
  snprintf(out->error, sizeof out->error, "%s", l->error);
}
