/*
 * publisher.c: the NATS JetStream publisher (see publisher.h). It owns the
 * connection (one per attempt: any failure drops it whole, so acks of an
 * abandoned connection can never be mistaken for the current one's), the
 * window of messages in flight, the queue that carries acks from libnats's
 * threads to the loop, the checkpoint file, and the publisher's figures.
 *
 * Threads: everything but the ack and disconnection callbacks (libnats's
 * threads: they only queue and wake the loop) and the blocking NATS calls
 * of connecting, checking the stream and closing (a thread of libuv's pool,
 * one job at a time) runs on the daemon's loop.
 */
#define _GNU_SOURCE /* asprintf */
#include "publisher.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <nats/nats.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "follower.h"
#include "json.h"
#include "log.h"
#include "store.h"

#define WINDOW 8192               /* messages in flight at most */
#define ACK_EVERY 64              /* one message in this many asks for an ack (and the last of a read) */
#define BATCH 1000                /* events read from the store at once */
#define EVENTS_PER_TURN 2000      /* published per loop turn: HTTP is served between turns */
#define ACK_TIMEOUT_MS 5000       /* an ack later than this drops the connection */
#define CONNECT_TIMEOUT_MS 2000
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
#define REFUSED_RETRY_MS 30000    /* a refused stream is checked again this often */
#define DUPLICATE_WINDOW_NS ((int64_t)120 * 1000 * 1000 * 1000)
#define LAG_SAMPLES 65536         /* commit -> ack latencies kept for the status */
#define NOTES 4096                /* commit times of recent heads */

enum { P_CONNECTING, P_PUBLISHING, P_DISCONNECTED, P_REFUSED, P_FAULTED, P_INACTIVE, P_STOPPED };
static const char *const state_names[] = {"connecting", "live",     "disconnected", "refused",
                                          "faulted",    "inactive", "stopped"};

/* One connection attempt and, if it succeeds, the connection. */
typedef struct conn {
  natsConnection *nc;
  jsCtx *js;               /* for the stream's info and last message, not for publishing */
  natsSubscription *acks;  /* INBOX.*: every message's ack */
  char inbox[64];          /* "_INBOX.<nuid>": a message's reply subject is INBOX.<position> */
  int ok, refused;
  char err[768];
  uint64_t last_seq;      /* the stream's last sequence */
  int64_t last_position;  /* Ebb-Position of its last message under PREFIX.> (0: none) */
} conn;

typedef struct ack {
  natsConnection *nc; /* whose */
  int lost;           /* not an ack: nc's connection was lost */
  int64_t position;
  uint64_t seq;
  int ok, dup;
  char err[200];
} ack;

/* What libnats's threads share with the loop: the ack queue, whose acks
 * count, and the loop's wake-up. Its own allocation, counted: the publisher
 * holds one reference and every connection that connected another, dropped
 * by its closed callback (libnats calls back after natsConnection_Close has
 * returned, and the publisher may be gone by then). */
typedef struct hub {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  ack *q;
  size_t qn, qcap;
  natsConnection *live_nc; /* whose acks count */
  uv_async_t *async; /* NULL once the publisher stops */
  int refs;
} hub;

static void hub_release(hub *h) {
  pthread_mutex_lock(&h->mu);
  int last = --h->refs == 0;
  pthread_mutex_unlock(&h->mu);
  if (!last) return;
  pthread_mutex_destroy(&h->mu);
  pthread_cond_destroy(&h->cv);
  free(h->q);
  free(h);
}

typedef struct flight {
  int64_t position;
  uint64_t seq;          /* the stream sequence it gets */
  uint64_t committed_ns; /* when the loop learned of its commit (0: before the publisher started) */
  int64_t sent_ms;
} flight;

struct ebb_publisher {
  uv_loop_t *loop;
  ebb_runtime *rt;
  char *stream, *prefix, *all_subjects, *checkpoint_path, *urls;
  char **servers;
  int n_servers;
  natsOptions *opts; /* every connection's (libnats copies them): servers, auth, TLS */
  ebb_follower f; /* f.position: the last event read and published (or skipped) */
  int64_t head;
  int state, active, stopping;
  conn *cur;           /* the live connection (P_PUBLISHING) */
  conn *dead;          /* a dropped connection, closed by the next job */
  int64_t acked;       /* the checkpoint */
  int64_t acked_msg;   /* the position of the last message acknowledged (acked moves on
                          past events nats_from leaves out; this one does not) */
  int64_t written, written_ms;
  uint64_t expect_seq; /* the stream sequence of the last message published */
  flight *ring;
  size_t ring_at, ring_n;
  int unacked;         /* messages published since the last that asked for an ack */
  ebb_follower_batch batch;
  int have_batch;
  size_t at;
  int64_t backoff_ms;
  char last_error[1536];
  hub *h;              /* acks from libnats's threads */
  ack *taken;          /* the queue's other array: the two are swapped, not copied */
  size_t taken_cap;
  ebb_buf subject, body, wire; /* of the message being built, kept for the next */
  int raw_headers;             /* make_msg builds the header block itself */
  /* loop handles */
  uv_async_t async;
  uv_timer_t tick, retry;
  uv_idle_t pump;
  int pumping, handles_open, working;
  uv_work_t work;
  conn *job_conn, *job_dead;
  /* figures */
  uint64_t published, republished, errors;
  int64_t republish_to; /* positions up to it are published again */
  struct { int64_t head; uint64_t t; } notes[NOTES];
  size_t note_at, note_n;
  uint32_t *lag_us;
  size_t lag_n, lag_i;
};

static void schedule_pump(ebb_publisher *p);
static void start_connect(ebb_publisher *p);
static void on_retry(uv_timer_t *t) { start_connect(t->data); }

/* ---------------------------------------------------------------- subjects */

void ebb_nats_token(ebb_buf *out, const char *s, size_t n) {
  static const char hex[] = "0123456789ABCDEF";
  if (n == 0) {
    ebb_buf_putc(out, '%');
    return;
  }
  size_t run = 0; /* bytes before i that go as they are: appended in one piece */
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '%' || ch == '.' || ch == '*' || ch == '>' || ch <= ' ' || ch == 0x7f) {
      ebb_buf_append(out, s + i - run, run);
      run = 0;
      char e[3] = {'%', hex[ch >> 4], hex[ch & 15]};
      ebb_buf_append(out, e, 3);
    } else {
      run++;
    }
  }
  ebb_buf_append(out, s + n - run, run);
}

/* Does the stream subject pattern s match every subject under prefix.> ? */
static int covers(const char *s, const char *prefix) {
  const char *a = s, *b = prefix;
  for (;;) {
    size_t la = strcspn(a, "."), lb = strcspn(b, ".");
    if (la == 1 && a[0] == '>') return 1;
    if (*b == '\0') return 0; /* the prefix is used up: only '>' covers what follows */
    if (!(la == 1 && a[0] == '*') && (la != lb || strncmp(a, b, la) != 0)) return 0;
    a += la;
    b += lb;
    if (*a == '\0') return 0; /* s ends where subjects go on */
    a++;
    if (*b) b++;
  }
}

/* ---------------------------------------------------------------- the checkpoint file */

/* "CHECKPOINT LAST_MESSAGE_POSITION\n" */
static void read_checkpoint(ebb_publisher *p) {
  FILE *fp = fopen(p->checkpoint_path, "r");
  long long v = 0, m = 0;
  if (fp == NULL) return;
  int n = fscanf(fp, "%lld %lld", &v, &m);
  fclose(fp);
  if (n < 1 || v < 0) v = 0;
  if (n < 2 || m < 0 || m > v) m = v;
  p->acked = p->written = v;
  p->acked_msg = m;
}

/* Written beside, synced, renamed over, and the directory synced: a crash
 * leaves the old checkpoint or the new one. */
static int write_checkpoint(ebb_publisher *p) {
  char tmp[4200], text[48];
  snprintf(tmp, sizeof tmp, "%s.tmp", p->checkpoint_path);
  int n = snprintf(text, sizeof text, "%lld %lld\n", (long long)p->acked, (long long)p->acked_msg);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) goto fail;
  if (write(fd, text, (size_t)n) != n || fsync(fd) != 0) {
    close(fd);
    goto fail;
  }
  close(fd);
  if (rename(tmp, p->checkpoint_path) != 0) goto fail;
  char dir[4200];
  snprintf(dir, sizeof dir, "%s", p->checkpoint_path);
  char *slash = strrchr(dir, '/');
  if (slash) *slash = '\0';
  int dfd = open(slash ? dir : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    fsync(dfd);
    close(dfd);
  }
  p->written = p->acked;
  p->written_ms = ebb_clock_now_ms();
  return 0;
fail:
  ebb_log(EBB_LOG_WARN, "nats: cannot write the checkpoint", "path", p->checkpoint_path, "error",
          strerror(errno), NULL);
  return -1;
}

/* ---------------------------------------------------------------- connections (pool thread) */

static void set_err(conn *c, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->err, sizeof c->err, fmt, ap);
  va_end(ap);
}

/* libnats's last error on this thread, without its "(file.c:123): " prefix. */
static const char *nats_why(natsStatus s) {
  const char *t = nats_GetLastError(NULL);
  if (t && t[0] == '(') {
    const char *end = strstr(t, "): ");
    if (end && (size_t)(end - t) < 40) t = end + 3;
  }
  return t && *t ? t : natsStatus_GetText(s);
}

/* libnats's threads: queue and wake the loop. */
static void push_ack(hub *h, const ack *a) {
  pthread_mutex_lock(&h->mu);
  if (a->nc && a->nc == h->live_nc) {
    if (h->qn == h->qcap) {
      size_t cap = h->qcap ? h->qcap * 2 : 1024;
      ack *q = realloc(h->q, cap * sizeof *q);
      if (q) h->q = q, h->qcap = cap;
    }
    if (h->qn < h->qcap) h->q[h->qn++] = *a;
    /* else out of memory: the ack is lost, and the timeout drops the connection */
    pthread_cond_signal(&h->cv);
    if (h->async) uv_async_send(h->async);
  }
  pthread_mutex_unlock(&h->mu);
}

/* A JetStream ack, on the subscription's thread. The message went out with
 * core NATS (natsConnection_PublishMsg) and reply subject INBOX.<position>,
 * so an ack names its event by its subject, and its body is JetStream's
 * PubAck: {"stream":..,"seq":N[,"duplicate":true]} or {"error":{..}}.
 * (js_PublishMsgAsync would do the same with a map entry, a copy of the
 * message and a parsed JSON object per message: half of the publisher's
 * CPU.) */
static void on_ack(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure) {
  (void)sub;
  hub *h = closure;
  ack a = {.nc = nc, .position = -1};
  const char *subject = natsMsg_GetSubject(msg), *dot = strrchr(subject, '.');
  if (dot) a.position = strtoll(dot + 1, NULL, 10);
  const char *data = natsMsg_GetData(msg), *v = NULL;
  size_t len = (size_t)natsMsg_GetDataLength(msg), vn = 0;
  if (natsMsg_IsNoResponders(msg)) {
    snprintf(a.err, sizeof a.err, "no JetStream stream takes the subject (no responders)");
  } else if (len == 0 || ebb_json_member(data, len, "error", &v, &vn) != 0) {
    const char *d = NULL;
    size_t dn = 0;
    if (v && ebb_json_member(v, vn, "description", &d, &dn) == 1 && dn >= 2) d++, dn -= 2;
    else d = len ? data : "an empty ack", dn = len ? len : strlen(d);
    snprintf(a.err, sizeof a.err, "%.*s", (int)(dn > 180 ? 180 : dn), d);
  } else {
    a.ok = 1;
    if (ebb_json_member(data, len, "seq", &v, &vn) == 1) a.seq = strtoull(v, NULL, 10);
    a.dup = ebb_json_member(data, len, "duplicate", &v, &vn) == 1 && vn == 4 &&
            memcmp(v, "true", 4) == 0;
  }
  natsMsg_Destroy(msg);
  push_ack(h, &a);
}

static void on_disconnected(natsConnection *nc, void *closure) {
  ack a = {.nc = nc, .lost = 1, .position = -1};
  snprintf(a.err, sizeof a.err, "the connection to NATS was lost");
  push_ack(closure, &a);
}

/* The connection's last callback. */
static void on_nc_closed(natsConnection *nc, void *closure) {
  (void)nc;
  hub_release(closure);
}

/* The ack subscription's last callback (its handler has returned for good). */
static void on_sub_done(void *closure) { hub_release(closure); }

static void conn_close(conn *c) {
  if (c == NULL) return;
  if (c->nc) natsConnection_Close(c->nc);
  if (c->acks) natsSubscription_Destroy(c->acks);
  if (c->js) jsCtx_Destroy(c->js);
  if (c->nc) natsConnection_Destroy(c->nc);
  free(c);
}

static void hub_retain(hub *h) {
  pthread_mutex_lock(&h->mu);
  h->refs++;
  pthread_mutex_unlock(&h->mu);
}

/* Connects, creates or checks the stream, and reads where it ends. */
static void conn_open(conn *c, ebb_publisher *p) {
  natsStatus s;
  hub_retain(p->h); /* dropped by on_nc_closed */
  if ((s = natsConnection_Connect(&c->nc, p->opts)) != NATS_OK) {
    hub_release(p->h); /* no connection, no callback */
    return set_err(c, "cannot connect to NATS: %s", nats_why(s)); /* the URLs may hold passwords */
  }
  natsInbox *inbox = NULL;
  char acks[80];
  if ((s = natsInbox_Create(&inbox)) != NATS_OK) return set_err(c, "NATS inbox: %s", nats_why(s));
  snprintf(c->inbox, sizeof c->inbox, "%s", inbox);
  natsInbox_Destroy(inbox);
  snprintf(acks, sizeof acks, "%s.*", c->inbox);
  if ((s = natsConnection_Subscribe(&c->acks, c->nc, acks, on_ack, p->h)) != NATS_OK)
    return set_err(c, "cannot subscribe to JetStream's acks: %s", nats_why(s));
  hub_retain(p->h); /* dropped by on_sub_done */
  if ((s = natsSubscription_SetOnCompleteCB(c->acks, on_sub_done, p->h)) != NATS_OK) {
    hub_release(p->h);
    return set_err(c, "cannot subscribe to JetStream's acks: %s", nats_why(s));
  }
  /* More than the window: no ack is ever dropped as a slow consumer's. */
  natsSubscription_SetPendingLimits(c->acks, 4 * WINDOW, 64 * 1024 * 1024);
  jsOptions jo;
  jsOptions_Init(&jo);
  jo.Wait = 5000;
  if ((s = natsConnection_JetStream(&c->js, c->nc, &jo)) != NATS_OK)
    return set_err(c, "NATS JetStream context: %s", nats_why(s));
  jsStreamInfo *si = NULL;
  jsErrCode je = 0;
  s = js_GetStreamInfo(&si, c->js, p->stream, NULL, &je);
  if (s == NATS_NOT_FOUND || je == JSStreamNotFoundErr) {
    jsStreamConfig sc;
    jsStreamConfig_Init(&sc);
    const char *subjects[1] = {p->all_subjects};
    sc.Name = p->stream;
    sc.Subjects = subjects;
    sc.SubjectsLen = 1;
    sc.Storage = js_FileStorage;
    sc.Duplicates = DUPLICATE_WINDOW_NS;
    je = 0;
    if ((s = js_AddStream(&si, c->js, &sc, NULL, &je)) != NATS_OK)
      return set_err(c, "cannot create the JetStream stream %s (subjects %s): %s (%d)", p->stream,
                     p->all_subjects, nats_why(s), (int)je);
    ebb_log(EBB_LOG_INFO, "nats: created the JetStream stream", "stream", p->stream, "subjects",
            p->all_subjects, NULL);
  } else if (s != NATS_OK) {
    return set_err(c, "cannot read the JetStream stream %s: %s (%d)", p->stream, nats_why(s),
                   (int)je);
  } else {
    int ok = 0;
    ebb_buf list = EBB_BUF_INIT;
    for (int i = 0; si->Config && i < si->Config->SubjectsLen; i++) {
      ok |= covers(si->Config->Subjects[i], p->prefix);
      ebb_buf_printf(&list, "%s%s", i ? ", " : "", si->Config->Subjects[i]);
    }
    if (!ok) {
      c->refused = 1;
      set_err(c,
              "the JetStream stream %s exists with subjects [%s], which do not cover %s: ebb "
              "would publish to subjects it does not store. Add %s to its subjects, or set "
              "nats_stream or nats_subject_prefix",
              p->stream, ebb_buf_cstr(&list), p->all_subjects, p->all_subjects);
      ebb_buf_free(&list);
      jsStreamInfo_Destroy(si);
      return;
    }
    ebb_buf_free(&list);
  }
  c->last_seq = si->State.LastSeq;
  jsStreamInfo_Destroy(si);
  natsMsg *m = NULL;
  je = 0;
  s = js_GetLastMsg(&m, c->js, p->stream, p->all_subjects, NULL, &je);
  if (s == NATS_OK) {
    const char *v = NULL;
    if (natsMsgHeader_Get(m, "Ebb-Position", &v) == NATS_OK && v) c->last_position = strtoll(v, NULL, 10);
    natsMsg_Destroy(m);
  } else if (s != NATS_NOT_FOUND && je != JSNoMessageFoundErr) {
    return set_err(c, "cannot read the last message of the JetStream stream %s: %s (%d)",
                   p->stream, nats_why(s), (int)je);
  }
  c->ok = 1;
}

static void work_connect(uv_work_t *w) {
  ebb_publisher *p = w->data;
  conn_close(p->job_dead);
  p->job_dead = NULL;
  if (p->job_conn) conn_open(p->job_conn, p);
}

/* ---------------------------------------------------------------- the loop */

static void publisher_free(ebb_publisher *p) {
  ebb_follower_batch_free(&p->batch);
  ebb_follower_clear(&p->f);
  for (int i = 0; i < p->n_servers; i++) free(p->servers[i]);
  free(p->servers);
  free(p->stream);
  free(p->prefix);
  free(p->all_subjects);
  free(p->checkpoint_path);
  free(p->urls);
  if (p->opts) natsOptions_Destroy(p->opts);
  free(p->ring);
  free(p->lag_us);
  free(p->taken);
  ebb_buf_free(&p->subject);
  ebb_buf_free(&p->body);
  ebb_buf_free(&p->wire);
  if (p->h) hub_release(p->h);
  free(p);
}

static void maybe_free(ebb_publisher *p) {
  if (p->stopping && p->handles_open == 0 && !p->working) publisher_free(p);
}

static void on_closed(uv_handle_t *h) {
  ebb_publisher *p = h->data;
  p->handles_open--;
  maybe_free(p);
}

static void set_live(ebb_publisher *p, conn *c) {
  pthread_mutex_lock(&p->h->mu);
  p->h->live_nc = c ? c->nc : NULL;
  p->h->qn = 0;
  pthread_mutex_unlock(&p->h->mu);
}

static void drop_flights(ebb_publisher *p) {
  p->ring_at = p->ring_n = 0;
  p->unacked = 0;
  if (p->have_batch) ebb_follower_batch_free(&p->batch);
  p->have_batch = 0;
  p->f.position = p->acked; /* rewind to the first unacknowledged event */
}

/* Drops the connection (closed by the next job) and tries again later. */
static void fail(ebb_publisher *p, const char *why) {
  if (p->state != P_PUBLISHING) return;
  p->errors++;
  snprintf(p->last_error, sizeof p->last_error, "%s", why);
  char pos[32];
  snprintf(pos, sizeof pos, "%lld", (long long)p->acked);
  ebb_log(EBB_LOG_WARN, "nats: publishing stopped; reconnecting", "error", why, "#position", pos,
          NULL);
  set_live(p, NULL);
  if (p->dead) conn_close(p->dead); /* not expected: the last job took it */
  p->dead = p->cur;
  p->cur = NULL;
  drop_flights(p);
  p->state = P_DISCONNECTED;
  if (p->stopping) return;
  uv_timer_start(&p->retry, on_retry, (uint64_t)p->backoff_ms, 0);
  p->backoff_ms = p->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : p->backoff_ms * 2;
}

static void after_connect(uv_work_t *w, int status) {
  ebb_publisher *p = w->data;
  conn *c = p->job_conn;
  p->job_conn = NULL;
  p->working = 0;
  if (p->stopping || !p->active) {
    conn_close(c); /* blocks briefly: only at stop or when the leadership is lost */
    if (p->stopping) maybe_free(p);
    else p->state = P_INACTIVE;
    return;
  }
  if (!c->ok) {
    p->errors++;
    snprintf(p->last_error, sizeof p->last_error, "%s", c->err);
    ebb_log(EBB_LOG_WARN, c->refused ? "nats: refused" : "nats: cannot connect", "error", c->err,
            NULL);
    p->state = c->refused ? P_REFUSED : P_DISCONNECTED;
    p->dead = c;
    int64_t wait = c->refused ? REFUSED_RETRY_MS : p->backoff_ms;
    if (!c->refused)
      p->backoff_ms = p->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : p->backoff_ms * 2;
    uv_timer_start(&p->retry, on_retry, (uint64_t)wait, 0);
    return;
  }
  int64_t resume = c->last_position;
  if (resume > p->head) {
    snprintf(p->last_error, sizeof p->last_error,
             "the JetStream stream %s holds events up to position %lld, beyond this store's head "
             "(%lld): another store publishes to it, or this store was restored. Publishing "
             "waits (for the store to catch up, or another nats_stream)",
             p->stream, (long long)resume, (long long)p->head);
    ebb_log(EBB_LOG_ERROR, "nats: refused", "error", p->last_error, NULL);
    p->errors++;
    p->state = P_REFUSED;
    p->dead = c;
    uv_timer_start(&p->retry, on_retry, REFUSED_RETRY_MS, 0);
    return;
  }
  if (resume < p->acked_msg) {
    char a[32], b[32];
    snprintf(a, sizeof a, "%lld", (long long)resume);
    snprintf(b, sizeof b, "%lld", (long long)p->acked_msg);
    ebb_log(EBB_LOG_WARN,
            "nats: the stream lost acknowledged messages; publishing them again", "stream",
            p->stream, "#stream_position", a, "#acknowledged", b, NULL);
    if (p->acked_msg > p->republish_to) p->republish_to = p->acked_msg;
  }
  p->cur = c;
  set_live(p, c);
  p->acked = p->acked_msg = p->f.position = resume;
  p->expect_seq = c->last_seq;
  if (p->acked != p->written) write_checkpoint(p);
  p->state = P_PUBLISHING;
  p->backoff_ms = BACKOFF_MIN_MS;
  p->last_error[0] = '\0';
  char pos[32];
  snprintf(pos, sizeof pos, "%lld", (long long)resume);
  ebb_log(EBB_LOG_INFO, "nats: connected; publishing", "stream", p->stream, "#after", pos, NULL);
  schedule_pump(p);
}

static void start_connect(ebb_publisher *p) {
  if (p->working || p->stopping || !p->active || p->state == P_PUBLISHING) return;
  conn *c = calloc(1, sizeof *c);
  if (c == NULL) {
    uv_timer_start(&p->retry, on_retry, BACKOFF_MAX_MS, 0);
    return;
  }
  p->state = P_CONNECTING;
  p->job_conn = c;
  p->job_dead = p->dead;
  p->dead = NULL;
  p->working = 1;
  p->work.data = p;
  uv_queue_work(p->loop, &p->work, work_connect, after_connect);
}

static uint64_t commit_time(ebb_publisher *p, int64_t position) {
  /* The notes are in head order: drop those before the position. */
  while (p->note_n && p->notes[p->note_at].head < position) {
    p->note_at = (p->note_at + 1) % NOTES;
    p->note_n--;
  }
  return p->note_n ? p->notes[p->note_at].t : 0;
}

/* Writes v in decimal at d (room for 21 bytes), NUL-terminated: the headers
 * of every message, without printf's cost. */
static const char *decimal(char *d, uint64_t v) {
  char t[21];
  size_t n = 0;
  do t[n++] = (char)('0' + v % 10); while ((v /= 10) != 0);
  for (size_t i = 0; i < n; i++) d[i] = t[n - 1 - i];
  d[n] = '\0';
  return d;
}

/* ------------------------------------------------ messages with their headers already encoded
 *
 * natsMsgHeader_Set keeps every header in a hash map (a map, and a key, a
 * value and two entries per header, freed on libnats's collector thread):
 * with ebb's eight headers that was ~40% of the publisher's CPU. libnats's
 * parser builds every message it receives with natsMsg_create(), from the
 * header block as it is on the wire and the payload; such a message is sent
 * again with that block as it is. libnats.so exports the function but nats.h
 * does not declare it, so it is used only when built against the libnats
 * whose source was read for it (3.4, Debian 12's), when the library loaded
 * is of the same 3.4, and when a test message built with it reads back
 * right; otherwise the headers go through natsMsgHeader_Set. The two give
 * the same message (EBB_NATS_HEADER_MAP=1 forces the second, for the specs). */
#if NATS_VERSION_MAJOR == 3 && NATS_VERSION_MINOR == 4
#define RAW_HEADERS 1
natsStatus natsMsg_create(natsMsg **newMsg, const char *subject, int subjLen, const char *reply,
                          int replyLen, const char *buf, int bufLen, int hdrLen);
#else
#define RAW_HEADERS 0
#endif

static int raw_headers_work(void) {
#if RAW_HEADERS
  static const char buf[] = "NATS/1.0\r\nEbb-Check: 42\r\n\r\n{}";
  const char *getenv_map = getenv("EBB_NATS_HEADER_MAP");
  if ((getenv_map && strcmp(getenv_map, "1") == 0) || (nats_GetVersionNumber() >> 8) != 0x0304)
    return 0;
  natsMsg *m = NULL;
  const char *v = NULL;
  int ok = natsMsg_create(&m, "a.b", 3, "r", 1, buf, (int)sizeof buf - 1, (int)sizeof buf - 3) ==
               NATS_OK &&
           natsMsgHeader_Get(m, "Ebb-Check", &v) == NATS_OK && v && strcmp(v, "42") == 0 &&
           natsMsg_GetDataLength(m) == 2 && memcmp(natsMsg_GetData(m), "{}", 2) == 0 &&
           strcmp(natsMsg_GetSubject(m), "a.b") == 0 && natsMsg_GetReply(m) &&
           strcmp(natsMsg_GetReply(m), "r") == 0;
  natsMsg_Destroy(m);
  return ok;
#else
  return 0;
#endif
}

/* The message of event e: subject, reply (or NULL), body, and the headers
 * Nats-Msg-Id, Ebb-Position, Ebb-Stream, Ebb-Version, Ebb-Type, Ebb-Schema,
 * Content-Type and (expect_seq > 0) Nats-Expected-Last-Sequence. */
static natsStatus make_msg(ebb_publisher *p, natsMsg **out, const ebb_event *e, const char *subject,
                           const char *reply, const ebb_buf *body) {
  char pos[24], ver[24], sch[24], seq[24];
  struct { const char *key, *value; } h[8] = {
      {"Nats-Msg-Id", e->id},
      {"Ebb-Position", decimal(pos, (uint64_t)e->position)},
      {"Ebb-Stream", e->stream},
      {"Ebb-Version", decimal(ver, (uint64_t)e->version)},
      {"Ebb-Type", e->type},
      {"Ebb-Schema", decimal(sch, (uint64_t)e->schema)},
      {"Content-Type", "application/json"},
      /* In order or not at all: a message whose predecessor did not land is refused. */
      {"Nats-Expected-Last-Sequence", decimal(seq, p->expect_seq)},
  };
  int nh = p->expect_seq > 0 ? 8 : 7;
  *out = NULL;
#if RAW_HEADERS
  if (p->raw_headers) {
    /* "NATS/1.0\r\n", "Key: value\r\n" each, "\r\n", the body: sized, then copied */
    size_t kl[8], vl[8], need = 12 + body->len;
    for (int i = 0; i < nh; i++) need += (kl[i] = strlen(h[i].key)) + (vl[i] = strlen(h[i].value)) + 4;
    ebb_buf *b = &p->wire;
    ebb_buf_reset(b);
    if (ebb_buf_reserve(b, need) != 0) {
      ebb_buf_free(b);
      return NATS_NO_MEMORY;
    }
    char *w = b->data;
    memcpy(w, "NATS/1.0\r\n", 10), w += 10;
    for (int i = 0; i < nh; i++) {
      memcpy(w, h[i].key, kl[i]), w += kl[i];
      *w++ = ':', *w++ = ' ';
      /* a line break in a value would end it: a space, as libnats writes it */
      for (size_t k = 0; k < vl[i]; k++)
        w[k] = h[i].value[k] == '\r' || h[i].value[k] == '\n' ? ' ' : h[i].value[k];
      w += vl[i];
      *w++ = '\r', *w++ = '\n';
    }
    *w++ = '\r', *w++ = '\n';
    size_t hlen = (size_t)(w - b->data);
    memcpy(w, body->data, body->len), w += body->len;
    b->len = (size_t)(w - b->data);
    *w = '\0';
    return natsMsg_create(out, subject, (int)strlen(subject), reply, reply ? (int)strlen(reply) : 0,
                          b->data, (int)b->len, (int)hlen);
  }
#endif
  natsStatus s = natsMsg_Create(out, subject, reply, body->data, (int)body->len);
  for (int i = 0; i < nh && s == NATS_OK; i++) s = natsMsgHeader_Set(*out, h[i].key, h[i].value);
  return s;
}

/* Publishes one event with core NATS. With want_ack, its reply subject is
 * INBOX.<position> (on_ack); without, JetStream stores it and answers
 * nothing. That is enough: with Nats-Expected-Last-Sequence, JetStream
 * stores a message only after its predecessor, so the ack of one message
 * says that every message before it is stored too, and a message that was
 * refused or lost makes every later one refused, the next acked one
 * included. 0, or -1 after fail(). */
static int publish(ebb_publisher *p, const ebb_event *e, int want_ack) {
  ebb_buf *subject = &p->subject, *body = &p->body;
  ebb_buf_reset(subject);
  ebb_buf_reset(body);
  ebb_buf_puts(subject, p->prefix);
  ebb_buf_putc(subject, '.');
  ebb_nats_token(subject, e->stream, ebb_stream_category_len(e->stream));
  ebb_buf_putc(subject, '.');
  ebb_nats_token(subject, e->type, strlen(e->type));
  ebb_event_to_json(e, body);
  char reply[96];
  size_t il = strlen(p->cur->inbox);
  memcpy(reply, p->cur->inbox, il);
  reply[il] = '.';
  decimal(reply + il + 1, (uint64_t)e->position);
  natsMsg *m = NULL;
  natsStatus s = subject->oom || body->oom
                     ? NATS_NO_MEMORY
                     : make_msg(p, &m, e, ebb_buf_cstr(subject), want_ack ? reply : NULL, body);
  if (s == NATS_OK) s = natsConnection_PublishMsg(p->cur->nc, m);
  natsMsg_Destroy(m); /* NULL-safe */
  if (subject->oom || body->oom) ebb_buf_free(subject), ebb_buf_free(body);
  if (s != NATS_OK) {
    char why[512];
    snprintf(why, sizeof why, "cannot publish event %lld: %s", (long long)e->position, nats_why(s));
    fail(p, why);
    return -1;
  }
  p->expect_seq++;
  flight *fl = &p->ring[(p->ring_at + p->ring_n) % WINDOW];
  fl->position = e->position;
  fl->seq = p->expect_seq;
  fl->committed_ns = commit_time(p, e->position);
  fl->sent_ms = ebb_clock_now_ms();
  p->ring_n++;
  return 0;
}

static void advance(ebb_publisher *p, int *budget) {
  while (*budget > 0 && p->state == P_PUBLISHING && p->ring_n < WINDOW) {
    if (!p->have_batch) {
      if (p->f.position >= p->head) {
        /* Nothing in flight and nothing to publish: the checkpoint follows
         * the follower past events nats_from does not name. */
        if (p->ring_n == 0) p->acked = p->f.position;
        return;
      }
      ebb_error err;
      ebb_error_init(&err);
      int rc = ebb_follower_read(&p->f, p->rt, p->head, BATCH, &p->batch, &err);
      if (rc < 0) {
        char why[1200];
        snprintf(why, sizeof why, "cannot read the events after position %lld: %s",
                 (long long)p->f.position, err.message);
        ebb_error_clear(&err);
        ebb_follower_batch_free(&p->batch);
        /* Retried with the connection: the store or the modules may recover. */
        fail(p, why);
        return;
      }
      if (rc == 0) {
        ebb_follower_batch_free(&p->batch);
        continue;
      }
      p->have_batch = 1;
      p->at = 0;
    }
    /* Every event read, one that cannot be upcast included: it goes out as
     * stored with its upcast_error, as GET /events shows it. */
    if (p->at < p->batch.events.n) {
      (*budget)--;
      /* An ack every ACK_EVERY messages, for the last of what was read (the
       * newest events: their ack lag), and before the window is full. */
      int want_ack = p->at + 1 == p->batch.events.n || p->ring_n + 1 >= WINDOW ||
                     ++p->unacked >= ACK_EVERY;
      if (want_ack) p->unacked = 0;
      if (publish(p, &p->batch.events.items[p->at], want_ack) != 0) return;
      p->at++;
      continue;
    }
    p->f.position = p->batch.read_to;
    ebb_follower_batch_free(&p->batch);
    p->have_batch = 0;
  }
}

static void on_pump(uv_idle_t *idle) {
  ebb_publisher *p = idle->data;
  uv_idle_stop(idle);
  p->pumping = 0;
  if (p->stopping || !p->active) return;
  int budget = EVENTS_PER_TURN;
  advance(p, &budget);
  if (budget <= 0 && p->ring_n < WINDOW) schedule_pump(p);
}

static void schedule_pump(ebb_publisher *p) {
  if (p->pumping || p->stopping || !p->active || p->state != P_PUBLISHING) return;
  p->pumping = 1;
  uv_idle_start(&p->pump, on_pump);
}

static void add_lag(ebb_publisher *p, uint64_t committed_ns) {
  if (committed_ns == 0 || p->lag_us == NULL) return;
  uint64_t us = (uv_hrtime() - committed_ns) / 1000;
  p->lag_us[p->lag_i] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
  p->lag_i = (p->lag_i + 1) % LAG_SAMPLES;
  if (p->lag_n < LAG_SAMPLES) p->lag_n++;
}

/* Takes the queued acks in order. Returns how many moved the checkpoint. */
static size_t take_acks(ebb_publisher *p) {
  hub *h = p->h;
  pthread_mutex_lock(&h->mu);
  size_t n = h->qn;
  ack *q = h->q;
  size_t cap = h->qcap;
  h->q = p->taken;
  h->qcap = p->taken_cap;
  h->qn = 0;
  pthread_mutex_unlock(&h->mu);
  p->taken = q;
  p->taken_cap = cap;
  size_t moved = 0;
  for (size_t i = 0; i < n && p->state == P_PUBLISHING; i++) {
    const ack *a = &q[i];
    if (a->lost || !a->ok) {
      char why[300];
      if (!a->lost) snprintf(why, sizeof why, "JetStream refused event %lld: %s", (long long)a->position, a->err);
      else snprintf(why, sizeof why, "%s", a->err);
      fail(p, why);
      break;
    }
    /* The ack of one message is that of every message before it. */
    size_t k = 0;
    while (k < p->ring_n && p->ring[(p->ring_at + k) % WINDOW].position < a->position) k++;
    flight *fl = &p->ring[(p->ring_at + k) % WINDOW];
    if (k == p->ring_n || fl->position != a->position) {
      char why[200];
      snprintf(why, sizeof why, "an ack for event %lld came out of order (expected %lld)",
               (long long)a->position, p->ring_n ? (long long)p->ring[p->ring_at].position : -1LL);
      fail(p, why);
      break;
    }
    if (!a->dup && a->seq != fl->seq) {
      char why[300];
      snprintf(why, sizeof why,
               "JetStream stored event %lld at stream sequence %" PRIu64 ", not %" PRIu64
               ": something else publishes to the stream",
               (long long)a->position, a->seq, fl->seq);
      fail(p, why);
      break;
    }
    for (size_t j = 0; j <= k; j++) {
      fl = &p->ring[p->ring_at];
      if (j < k || !a->dup) p->published++;
      if (fl->position <= p->republish_to) p->republished++;
      add_lag(p, fl->committed_ns);
      p->ring_at = (p->ring_at + 1) % WINDOW;
      p->ring_n--;
    }
    p->acked = p->acked_msg = a->position;
    moved++;
  }
  return moved;
}

static void on_async(uv_async_t *h) {
  ebb_publisher *p = h->data;
  if (take_acks(p)) schedule_pump(p);
}

static void on_tick(uv_timer_t *t) {
  ebb_publisher *p = t->data;
  if (p->state == P_PUBLISHING && p->ring_n &&
      ebb_clock_now_ms() - p->ring[p->ring_at].sent_ms > ACK_TIMEOUT_MS) {
    char why[200];
    snprintf(why, sizeof why, "no ack from JetStream for event %lld within %d ms",
             (long long)p->ring[p->ring_at].position, ACK_TIMEOUT_MS);
    fail(p, why);
  }
  if (p->acked != p->written && ebb_clock_now_ms() - p->written_ms >= 1000) write_checkpoint(p);
}

/* ---------------------------------------------------------------- public */

/* Does the credentials file hold a user JWT and a seed? (libnats reads it
 * only when it connects: a wrong file would show only as failed connections.)
 * Its contents are secret: only its name goes into a message. */
static int check_creds(const char *path, ebb_error *err) {
  FILE *f = fopen(path, "r");
  if (f == NULL)
    return ebb_error_set(err, EBB_EBADREQ, "nats_creds: cannot read %s: %s", path, strerror(errno));
  char line[512];
  int jwt = 0, seed = 0;
  while (fgets(line, sizeof line, f)) {
    jwt |= strstr(line, "BEGIN NATS USER JWT") != NULL;
    seed |= strstr(line, "BEGIN USER NKEY SEED") != NULL;
  }
  fclose(f);
  if (jwt && seed) return 0;
  return ebb_error_set(err, EBB_EBADREQ,
                       "nats_creds: %s is not a NATS credentials file: it holds no %s (a .creds "
                       "file has a -----BEGIN NATS USER JWT----- and a -----BEGIN USER NKEY "
                       "SEED----- block)",
                       path, jwt ? "user NKey seed" : "user JWT");
}

/* The options of every connection: servers, timeouts, callbacks, and the
 * credentials and TLS files, loaded now so that a bad one stops the start. */
static int build_options(ebb_publisher *p, const ebb_publisher_options *o, ebb_error *err) {
  natsOptions *opts = NULL;
  natsStatus s = natsOptions_Create(&opts);
  if (s == NATS_OK) s = natsOptions_SetServers(opts, (const char **)p->servers, p->n_servers);
  if (s == NATS_OK) s = natsOptions_SetTimeout(opts, CONNECT_TIMEOUT_MS);
  /* ebb reconnects itself, and resynchronises after every reconnection. */
  if (s == NATS_OK) s = natsOptions_SetAllowReconnect(opts, false);
  if (s == NATS_OK) s = natsOptions_SetDisconnectedCB(opts, on_disconnected, p->h);
  if (s == NATS_OK) s = natsOptions_SetClosedCB(opts, on_nc_closed, p->h);
  if (s == NATS_OK && o->token && *o->token) s = natsOptions_SetToken(opts, o->token);
  if (s == NATS_OK && o->user && *o->user)
    s = natsOptions_SetUserInfo(opts, o->user, o->password ? o->password : "");
  p->opts = opts;
  if (s != NATS_OK) return ebb_error_set(err, EBB_ENOMEM, "NATS options: %s", nats_why(s));
  if (o->creds && *o->creds) {
    if (check_creds(o->creds, err) != 0) return err->code;
    if ((s = natsOptions_SetUserCredentialsFromFiles(opts, o->creds, NULL)) != NATS_OK)
      return ebb_error_set(err, EBB_EBADREQ, "nats_creds: %s: %s", o->creds, nats_why(s));
  }
  int tls = 0;
  if (o->tls_ca && *o->tls_ca) {
    tls = 1;
    if ((s = natsOptions_LoadCATrustedCertificates(opts, o->tls_ca)) != NATS_OK)
      return ebb_error_set(err, EBB_EBADREQ, "nats_tls_ca: cannot load the CA certificates in %s: %s",
                           o->tls_ca, nats_why(s));
  }
  if (o->tls_cert && *o->tls_cert) {
    tls = 1;
    if ((s = natsOptions_LoadCertificatesChain(opts, o->tls_cert, o->tls_key)) != NATS_OK)
      return ebb_error_set(err, EBB_EBADREQ,
                           "nats_tls_cert, nats_tls_key: cannot load the client certificate %s "
                           "with the key %s: %s",
                           o->tls_cert, o->tls_key ? o->tls_key : "", nats_why(s));
  }
  /* TLS files mean TLS, whatever the URLs' scheme (tls:// asks for it too). */
  if (tls && (s = natsOptions_SetSecure(opts, true)) != NATS_OK)
    return ebb_error_set(err, EBB_EBADREQ, "NATS TLS: %s", nats_why(s));
  return 0;
}

static char *dup_or_null(const char *s, int *oom) {
  char *d = strdup(s ? s : "");
  if (d == NULL) *oom = 1;
  return d;
}

int ebb_publisher_start(ebb_publisher **out, const ebb_publisher_options *o, ebb_error *err) {
  *out = NULL;
  ebb_publisher *p = calloc(1, sizeof *p);
  if (p == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  int oom = 0;
  p->loop = o->loop;
  p->rt = o->rt;
  p->active = 1;
  p->backoff_ms = BACKOFF_MIN_MS;
  if ((p->h = calloc(1, sizeof *p->h)) == NULL) {
    free(p);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  }
  pthread_mutex_init(&p->h->mu, NULL);
  pthread_cond_init(&p->h->cv, NULL);
  p->h->refs = 1;
  p->stream = dup_or_null(o->stream, &oom);
  p->prefix = dup_or_null(o->prefix, &oom);
  p->urls = dup_or_null(o->urls, &oom);
  if (asprintf(&p->all_subjects, "%s.>", o->prefix) < 0) p->all_subjects = NULL, oom = 1;
  if (asprintf(&p->checkpoint_path, "%s/nats.checkpoint", o->data_dir) < 0)
    p->checkpoint_path = NULL, oom = 1;
  p->ring = calloc(WINDOW, sizeof *p->ring);
  p->lag_us = calloc(LAG_SAMPLES, sizeof *p->lag_us);
  if (p->ring == NULL || p->lag_us == NULL) oom = 1;
  /* servers and from: comma-separated, blanks around items ignored */
  for (int pass = 0; pass < 2 && !oom; pass++) {
    const char *s = pass ? o->from : o->urls;
    while (s && *s) {
      s += strspn(s, " \t,");
      size_t n = strcspn(s, ",");
      size_t m = n;
      while (m && (s[m - 1] == ' ' || s[m - 1] == '\t')) m--;
      if (m) {
        char *item = strndup(s, m);
        if (item == NULL) oom = 1;
        else if (pass == 1) oom |= ebb_follower_add_from(&p->f, item) != 0, free(item);
        else {
          char **v = realloc(p->servers, (size_t)(p->n_servers + 1) * sizeof *v);
          if (v == NULL) oom = 1, free(item);
          else p->servers = v, p->servers[p->n_servers++] = item;
        }
      }
      s += n;
    }
  }
  if (oom) {
    publisher_free(p);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  }
  if (p->n_servers == 0) {
    publisher_free(p);
    return ebb_error_set(err, EBB_EBADREQ, "nats: no server URL in \"%s\"", o->urls);
  }
  if (build_options(p, o, err) != 0) {
    publisher_free(p);
    return err->code;
  }
  p->raw_headers = raw_headers_work();
  read_checkpoint(p);
  p->f.position = p->acked;
  if (ebb_store_head(ebb_runtime_store(p->rt), &p->head, err) != 0) {
    publisher_free(p);
    return err->code;
  }
  /* One attempt now, so that a stream that cannot take ebb's subjects stops
   * the start with its reason; an unreachable NATS is tried again later. */
  conn *c = calloc(1, sizeof *c);
  if (c == NULL) {
    publisher_free(p);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  }
  conn_open(c, p);
  if (c->refused) {
    ebb_error_set(err, EBB_EBADREQ, "nats: %s", c->err);
    conn_close(c);
    publisher_free(p);
    return err->code;
  }
  uv_async_init(p->loop, &p->async, on_async);
  p->h->async = &p->async;
  uv_timer_init(p->loop, &p->tick);
  uv_timer_init(p->loop, &p->retry);
  uv_idle_init(p->loop, &p->pump);
  p->async.data = p->tick.data = p->retry.data = p->pump.data = p;
  p->handles_open = 4;
  uv_timer_start(&p->tick, on_tick, 250, 250);
  p->state = P_CONNECTING;
  p->job_conn = c;
  p->working = 1;
  p->work.data = p;
  after_connect(&p->work, 0);
  *out = p;
  return 0;
}

void ebb_publisher_set_active(ebb_publisher *p, int active) {
  if (p == NULL || p->stopping || p->active == !!active) return;
  p->active = !!active;
  if (active) {
    p->state = P_DISCONNECTED;
    start_connect(p);
    return;
  }
  uv_timer_stop(&p->retry);
  if (p->state == P_PUBLISHING) {
    set_live(p, NULL);
    p->dead = p->cur;
    p->cur = NULL;
    drop_flights(p);
  }
  if (!p->working) p->state = P_INACTIVE;
}

void ebb_publisher_notify(ebb_publisher *p, int64_t head) {
  if (p == NULL || head <= p->head) return;
  p->head = head;
  /* The commit time of every position up to head, for the ack lag. */
  size_t i = (p->note_at + p->note_n) % NOTES;
  if (p->note_n == NOTES) p->note_at = (p->note_at + 1) % NOTES, p->note_n--;
  p->notes[i].head = head;
  p->notes[i].t = uv_hrtime();
  p->note_n++;
  schedule_pump(p);
}

void ebb_publisher_stop(ebb_publisher *p, int64_t wait_ms) {
  if (p == NULL || p->stopping) return;
  /* The acks of what is in flight, for at most wait_ms. */
  int64_t deadline = ebb_clock_now_ms() + wait_ms;
  while (p->state == P_PUBLISHING && p->ring_n && ebb_clock_now_ms() < deadline) {
    pthread_mutex_lock(&p->h->mu);
    if (p->h->qn == 0) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_nsec += 20 * 1000000L;
      if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
      pthread_cond_timedwait(&p->h->cv, &p->h->mu, &ts);
    }
    pthread_mutex_unlock(&p->h->mu);
    take_acks(p);
  }
  if (p->ring_n) {
    char n[32];
    snprintf(n, sizeof n, "%zu", p->ring_n);
    ebb_log(EBB_LOG_WARN, "nats: stopping with messages unacknowledged (published again at start)",
            "#in_flight", n, NULL);
  }
  p->stopping = 1;
  if (p->acked != p->written) write_checkpoint(p);
  set_live(p, NULL);
  pthread_mutex_lock(&p->h->mu);
  p->h->async = NULL; /* closed below: libnats's threads must not wake it */
  pthread_mutex_unlock(&p->h->mu);
  conn_close(p->cur);
  conn_close(p->dead);
  p->cur = p->dead = NULL;
  p->state = P_STOPPED;
  uv_close((uv_handle_t *)&p->async, on_closed);
  uv_close((uv_handle_t *)&p->tick, on_closed);
  uv_close((uv_handle_t *)&p->retry, on_closed);
  uv_close((uv_handle_t *)&p->pump, on_closed);
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

void ebb_publisher_status(ebb_publisher *p, ebb_buf *out) {
  int64_t lag = p->head > p->acked ? p->head - p->acked : 0;
  const char *state = state_names[p->state];
  if (p->state == P_PUBLISHING && p->head - p->f.position > BATCH) state = "catching_up";
  ebb_buf_puts(out, "{\"state\":");
  ebb_buf_json_string(out, state, strlen(state));
  ebb_buf_puts(out, ",\"stream\":");
  ebb_buf_json_string(out, p->stream, strlen(p->stream));
  ebb_buf_printf(out,
                 ",\"connected\":%s,\"position\":%lld,\"head\":%lld,\"lag_events\":%lld,"
                 "\"in_flight\":%zu,\"published\":%" PRIu64 ",\"republished\":%" PRIu64
                 ",\"errors\":%" PRIu64,
                 p->state == P_PUBLISHING ? "true" : "false", (long long)p->acked,
                 (long long)p->head, (long long)lag, p->ring_n, p->published, p->republished,
                 p->errors);
  if (p->lag_n) {
    uint32_t *s = malloc(p->lag_n * sizeof *s);
    if (s) {
      memcpy(s, p->lag_us, p->lag_n * sizeof *s);
      qsort(s, p->lag_n, sizeof *s, cmp_u32);
      size_t n = p->lag_n;
      ebb_buf_printf(out,
                     ",\"ack_lag_ms\":{\"samples\":%zu,\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f}", n,
                     s[n / 2] / 1000.0, s[(n * 99) / 100 < n ? (n * 99) / 100 : n - 1] / 1000.0,
                     s[n - 1] / 1000.0);
      free(s);
    }
  }
  if (p->last_error[0]) {
    ebb_buf_puts(out, ",\"error\":");
    ebb_buf_json_string(out, p->last_error, strlen(p->last_error));
  }
  ebb_buf_putc(out, '}');
}

void ebb_publisher_metrics(ebb_publisher *p, ebb_buf *out) {
  ebb_buf_printf(out,
                 "# HELP ebb_nats_published_total Events JetStream acknowledged as new messages.\n"
                 "# TYPE ebb_nats_published_total counter\nebb_nats_published_total %" PRIu64 "\n"
                 "# HELP ebb_nats_republished_total Events published again because the stream "
                 "lost them.\n# TYPE ebb_nats_republished_total counter\n"
                 "ebb_nats_republished_total %" PRIu64 "\n"
                 "# HELP ebb_nats_lag_events Committed events JetStream has not acknowledged.\n"
                 "# TYPE ebb_nats_lag_events gauge\nebb_nats_lag_events %lld\n"
                 "# HELP ebb_nats_connected 1 while publishing to NATS.\n"
                 "# TYPE ebb_nats_connected gauge\nebb_nats_connected %d\n"
                 "# HELP ebb_nats_errors_total Failed connections, refusals and ack timeouts.\n"
                 "# TYPE ebb_nats_errors_total counter\nebb_nats_errors_total %" PRIu64 "\n",
                 p->published, p->republished,
                 (long long)(p->head > p->acked ? p->head - p->acked : 0),
                 p->state == P_PUBLISHING, p->errors);
}
