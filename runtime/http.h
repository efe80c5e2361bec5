/*
 * http.h: an HTTP/1.1 server on a libuv loop, the daemon's front door.
 *
 * It owns sockets, parsing (llhttp, kept out of this header), limits and
 * timeouts, keep-alive and pipelining, and hands the application one
 * complete request at a time per connection. The application answers each
 * request exactly once, now or later, with a whole response or a stream
 * (Server-Sent Events). Everything runs on the loop thread; nothing here is
 * thread-safe. There is no global state: every server is independent.
 * The process must ignore SIGPIPE (signal(SIGPIPE, SIG_IGN)): libuv writes
 * with writev(2), and a write to a peer that has gone would kill it.
 *
 * Protocol errors are answered here, always as a JSON error
 * {"error":{"code":...,"message":...}} followed by closing the connection:
 *   400 bad_request  the request is not valid HTTP (llhttp's reason given)
 *   408 timeout      the request did not arrive within request_timeout_ms
 *   413 too_large    the body is over max_body_bytes
 *   431 too_large    the request line and headers are over max_header_bytes
 *   503 unavailable  max_connections connections are already open
 */
#ifndef EBB_HTTP_H
#define EBB_HTTP_H

#include <stddef.h>
#include <uv.h>

#include "error.h"

typedef struct ebb_http_server ebb_http_server; /* opaque */
typedef struct ebb_http_conn ebb_http_conn;     /* opaque: one client connection */

/* Zero fields take the defaults given. */
typedef struct ebb_http_limits {
  size_t max_header_bytes;     /* request line + headers; 0: 16 KiB. Over it: 431, close */
  size_t max_body_bytes;       /* 0: 1 MiB. Over it: 413, close. Checked against
                                  Content-Length before the body is read, and while
                                  a chunked body is decoded */
  unsigned max_connections;    /* 0: 1024. Over it: the new connection gets 503, close */
  unsigned idle_timeout_ms;    /* 0: 60000. A connection with no request in progress and
                                  nothing unanswered (new, or kept alive) is then closed
                                  silently; also bounds how long a client may leave a
                                  response unread */
  unsigned request_timeout_ms; /* 0: 10000. From a request's first byte to its last (slow
                                  clients). Then 408, close */
} ebb_http_limits;

/* One parsed request. Strings point into the connection's buffers. */
typedef struct ebb_http_request {
  const char *method;  /* "GET", "POST", ... NUL-terminated */
  const char *path;    /* raw (still percent-encoded) path, without the query; NUL-terminated */
  const char *query;   /* raw query without '?'; "" when none */
  const char *body;    /* body_len bytes (chunked bodies decoded), NUL-terminated as well */
  size_t body_len;
  int http_minor;      /* 0 or 1 */
} ebb_http_request;

/* Called once per complete request, in order, on the loop thread. The
 * handler must answer it exactly once with ebb_http_respond or
 * ebb_http_stream_start, now (inside the handler) or later (e.g. after a
 * write on another thread completes). Until then the connection's next,
 * pipelined requests wait, parsed or not, so answers go out in request
 * order. The request (and ebb_http_header) stays valid until it is
 * answered, or until the connection's on_close callback has run. */
typedef void (*ebb_http_handler)(void *ud, ebb_http_conn *c, const ebb_http_request *req);

/* ---------------------------------------------------------------- server */

/* A server that is not listening yet. lim: NULL for all defaults. 0, or
 * EBB_EBADREQ (no handler) / EBB_ENOMEM with err filled. */
int ebb_http_server_new(ebb_http_server **out, uv_loop_t *loop, const ebb_http_limits *lim,
                        ebb_http_handler handler, void *ud, ebb_error *err);

/* Binds and listens: host is an IPv4 or IPv6 literal ("127.0.0.1", "::1",
 * "[::1]") or "localhost" (127.0.0.1); port 0 picks a free port (see
 * ebb_http_server_port). Errors name the address: EBB_EBADREQ (bad host or
 * port, or already listening), EBB_EBUSY (address in use), EBB_EUNAVAIL (any
 * other refusal, e.g. permission). After a failure listen may be tried again. */
int ebb_http_server_listen(ebb_http_server *s, const char *host, int port, ebb_error *err);
int ebb_http_server_port(const ebb_http_server *s); /* the bound port; 0 before listen */

/* Stops accepting connections and closes the idle ones (no request in
 * progress, nothing unanswered) once their output is flushed. A connection
 * with a request in progress or unanswered closes after that answer is
 * written (the answer says Connection: close). Streams stay open until the
 * application ends them or closes the server. Harmless twice. */
void ebb_http_server_drain(ebb_http_server *s);

/* Connections not closed yet, including those still flushing a last
 * answer (after a drain, 0 means every answer is out). */
size_t ebb_http_server_connections(const ebb_http_server *s);

/* Closes the listener and every connection now (unflushed output is lost).
 * Each connection's on_close callback runs from the loop afterwards, and
 * the memory goes once libuv has run every close callback, so the caller
 * keeps running the loop until uv_run returns. s must not be used after
 * this call. NULL-safe. */
void ebb_http_server_close(ebb_http_server *s);

/* ---------------------------------------------------------------- answering */

/* A header of the request being answered, by case-insensitive name: its
 * value (NUL-terminated, surrounding whitespace trimmed) with its length in
 * *len (len may be NULL), or NULL if absent. Of repeated headers, the first.
 * Valid as long as the request is. */
const char *ebb_http_header(ebb_http_conn *c, const char *name, size_t *len);

/* Answers the current request with a whole response. Adds Content-Length
 * and Connection (keep-alive, or close for HTTP/1.0 without keep-alive, a
 * client's Connection: close, and while draining); content_type: NULL for
 * none; extra_headers: NULL or "Name: value\r\n" lines. body (len bytes) is
 * copied. A HEAD request gets the headers only; 204 and 304 get no body and
 * no Content-Length. Returns 0, or <0 when the connection is gone or the
 * request was already answered (then nothing is sent). */
int ebb_http_respond(ebb_http_conn *c, int status, const char *content_type,
                     const char *extra_headers, const char *body, size_t len);

/* Shorthand: application/json {"error":{"code":code,"message":message}}. */
int ebb_http_respond_error(ebb_http_conn *c, int status, const char *code, const char *message);

/* Answers the current request with a stream (Server-Sent Events): writes
 * the status line and headers with no Content-Length and with Connection:
 * close; the body then runs until ebb_http_stream_end. The connection is
 * used for nothing else: pipelined requests behind this one are dropped.
 * Timeouts no longer apply; the peer closing its side closes the
 * connection. Returns 0 or <0 as ebb_http_respond. */
int ebb_http_stream_start(ebb_http_conn *c, int status, const char *content_type,
                          const char *extra_headers);
/* Queues len bytes (copied) on the stream. 0, or <0 when gone. */
int ebb_http_stream_write(ebb_http_conn *c, const char *data, size_t len);
/* Bytes queued and not yet taken by the kernel; 0 when gone. A stream whose
 * consumer is slow shows a growing number. */
size_t ebb_http_stream_pending(ebb_http_conn *c);
/* Flushes what was written, then closes the connection. The application's
 * hold on c ends here (on_close still runs, at the actual close). */
void ebb_http_stream_end(ebb_http_conn *c);

/* ---------------------------------------------------------------- connection data */

/* One application pointer per connection, and a callback called exactly
 * once when the connection closes for any reason (peer gone, write error,
 * timeout, drain, server close, or after ebb_http_stream_end), from libuv's
 * close callback: never from inside an ebb_http_* call, so a failing
 * ebb_http_stream_write cannot free the caller's state under it. Between
 * the closing and that call, answers and writes return <0.
 * set_data(c, NULL, NULL) takes the callback back.
 *
 * Ownership: from the handler's call until the request is answered (or a
 * stream ended), the application holds c. If an on_close callback is set,
 * that hold ends when it runs: c and the request must not be used after it
 * returns (answering inside it is allowed and returns <0). Without one, a
 * connection that closes while the application holds it stays allocated
 * until the application answers (respond and stream_start then return <0)
 * or ends its stream, so a late answer is always safe. */
void ebb_http_conn_set_data(ebb_http_conn *c, void *data,
                            void (*on_close)(ebb_http_conn *c, void *data));
void *ebb_http_conn_data(ebb_http_conn *c);

/* The standard reason phrase ("Not Found"); "Unknown" for others. */
const char *ebb_http_status_text(int status);

/* ---------------------------------------------------------------- internal: fuzzing */

/* A connection with no socket (for fuzz/fuzz_http.c): bytes given to
 * ebb__http_conn_input are parsed as if read from a peer, requests go to
 * the handler as usual, and whatever is answered is dropped. It closes with
 * the server (ebb_http_server_close, then run the loop). NULL when out of
 * memory or closing. */
ebb_http_conn *ebb__http_conn_socketless(ebb_http_server *s);
void ebb__http_conn_input(ebb_http_conn *c, const char *data, size_t len);

#endif
