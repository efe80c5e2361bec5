/*
 * publisher.h: publishing every committed event to NATS JetStream (the `nats`
 * setting). The publisher is a consumer of the store on the shared follower
 * (follower.h), run on the daemon's loop: it reads the events after its
 * position, upcast, and publishes each as the JSON GET /events shows, on
 * subject PREFIX.<category>.<type>, with the headers Nats-Msg-Id (the event
 * id), Ebb-Position, Ebb-Stream, Ebb-Version, Ebb-Type, Ebb-Schema and
 * Content-Type.
 *
 * Delivery is at least once, in the global order, duplicates dropped by
 * JetStream through Nats-Msg-Id. Every message also carries
 * Nats-Expected-Last-Sequence, the stream sequence its predecessor got:
 * JetStream refuses a message that would land out of order (one lost on a
 * broken connection while its successors got through), so the stream holds
 * ebb's events in order and without gaps, and the last message's
 * Ebb-Position says that every event up to it is there. Publishing is core
 * NATS with a bounded window in flight; one message in 64 (and the last of
 * each read from the store) asks JetStream for an ack, on a reply subject
 * that names its position: by the rule above, its ack acknowledges every
 * message before it too. Acks come back to the loop through a uv_async.
 *
 * On every (re)connection, on a thread of libuv's pool (NATS calls block),
 * the publisher creates the stream if it is missing (subjects PREFIX.>,
 * file storage, duplicate window 2 minutes), refuses one whose subjects do
 * not cover PREFIX.>, and reads the stream's last ebb message: it resumes
 * after that message's Ebb-Position. When that is behind its checkpoint,
 * NATS lost acknowledged messages (JetStream 2.9 syncs to disk only every 60
 * s) and they are published again (counted as republished). Any error, a
 * refusal, a lost connection or an ack that does not come within 5 s closes
 * the connection: the publisher rewinds to the first unacknowledged event
 * and reconnects with backoff (0.1 s doubling to 5 s). Commands never wait
 * for any of it.
 *
 * The checkpoint (the last position JetStream acknowledged, in order) is in
 * DATA/nats.checkpoint, written (fsync, rename) at most once a second and at
 * stop.
 */
#ifndef EBB_PUBLISHER_H
#define EBB_PUBLISHER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "buf.h"
#include "error.h"
#include "runtime.h"

typedef struct ebb_publisher ebb_publisher;

typedef struct ebb_publisher_options {
  uv_loop_t *loop;
  ebb_runtime *rt;     /* the loop's runtime: reads the store and upcasts */
  const char *data_dir;
  const char *urls;    /* one or more NATS URLs, comma-separated */
  const char *stream;  /* the JetStream stream */
  const char *prefix;  /* the subjects' first tokens */
  const char *from;    /* categories or event types, comma-separated; "" for all */
  /* Authentication and TLS ("" or NULL: not used). The token and the
   * password are secrets: no message of the publisher shows them. */
  const char *creds;   /* a .creds file: user JWT and NKey seed */
  const char *token;
  const char *user, *password;
  const char *tls_ca;  /* PEM file of the CA certificates to trust (turns TLS on) */
  const char *tls_cert, *tls_key; /* a client certificate and its key (turn TLS on) */
} ebb_publisher_options;

/* Starts publishing. It loads the credentials and TLS files (one that
 * cannot be used is an error naming its setting) and tries to connect once
 * (at most ~2 s): a stream that exists with subjects that do not cover
 * PREFIX.> is an error here (the daemon refuses to start); NATS unreachable,
 * or refusing ebb's credentials, is not (it keeps trying, and /health says
 * why). */
int ebb_publisher_start(ebb_publisher **out, const ebb_publisher_options *opt, ebb_error *err);
/* Waits at most wait_ms for the acks of the messages in flight, writes the
 * checkpoint, closes the connection and frees the publisher (once its
 * handles are closed: the loop must run). NULL-safe. */
void ebb_publisher_stop(ebb_publisher *p, int64_t wait_ms);

/* The leader hook. The publisher publishes only while active: with one
 * daemon on a store (SQLite) always; with several daemons on one PostgreSQL
 * store, the holder of the store's leader lock would make its publisher
 * active and the others inactive. Starts active. */
void ebb_publisher_set_active(ebb_publisher *p, int active);

/* Events are committed up to position head. */
void ebb_publisher_notify(ebb_publisher *p, int64_t head);

/* Status JSON object for /health. */
void ebb_publisher_status(ebb_publisher *p, ebb_buf *out);
/* Prometheus lines for /metrics. */
void ebb_publisher_metrics(ebb_publisher *p, ebb_buf *out);

/* Appends one subject token for s (n bytes): '%', '.', '*', '>', whitespace
 * and control characters become %XX (two upper-case hex digits), so a token
 * decodes back by percent-decoding; an empty s becomes "%". */
void ebb_nats_token(ebb_buf *out, const char *s, size_t n);

#endif
