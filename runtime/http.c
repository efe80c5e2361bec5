/*
 * http.c: the HTTP/1.1 server (see http.h).
 *
 * A connection is a small state machine:
 *
 *   IDLE --first byte--> READING --last byte--> HELD --answer--> IDLE (keep-alive)
 *                                                 |          \-> FINISHING (close)
 *                                                 \--stream--> STREAM --end--> FINISHING
 *
 * FINISHING flushes the output, shuts down the write side and then reads
 * and discards until the peer closes or a short linger ends, because
 * closing a socket with unread input makes the kernel send a reset that can
 * destroy the response still in flight (a 413 to a client mid-upload).
 * CLOSED means uv_close has been called. The one timer per connection
 * bounds each state: IDLE by idle_timeout_ms (closed silently), READING by
 * request_timeout_ms (408), FINISHING by idle_timeout_ms to flush, then the
 * linger; HELD and STREAM are the application's business.
 *
 * llhttp parses straight from the read buffer. on_message_complete pauses
 * it, so the application gets one request at a time; bytes behind that
 * request (pipelined requests) wait in c->in, and reading stops while
 * max_header_bytes of them wait. Parsing resumes when the answer is given:
 * at once if the handler answered inside its call, otherwise from the
 * answer's write callback, so that ebb_http_respond never re-enters the
 * application's handler. It also pauses while much output is unsent, so a
 * client that pipelines without reading cannot grow the write queue forever.
 *
 * Memory: a connection is freed in the close callback of the last of its
 * two handles (socket and timer), unless the application still holds it
 * (http.h, "Ownership"); the server once its listener and every connection
 * have been through their close callbacks.
 */
#include "http.h"

#include <limits.h>
#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "buf.h"

#define DEFAULT_MAX_HEADER (16 * 1024)
#define DEFAULT_MAX_BODY (1024 * 1024)
#define DEFAULT_MAX_CONNECTIONS 1024
#define DEFAULT_IDLE_MS 60000
#define DEFAULT_REQUEST_MS 10000
#define LINGER_MS 2000               /* a closing connection waits this long for the peer's FIN */
#define WRITE_HIGH_WATER (256 * 1024) /* pipelined requests wait while this much output is unsent */
#define KEEP_BUF_MAX (64 * 1024)     /* larger request buffers are freed between requests */
#define READ_BUF_SIZE (64 * 1024)
#define BACKLOG 511
#define WREQ_KEEP 64                 /* write requests kept for reuse per server, */
#define WREQ_KEEP_BUF (16 * 1024)    /* with buffers up to this size */

enum { C_IDLE, C_READING, C_HELD, C_STREAM, C_FINISHING, C_CLOSED };

typedef struct header {
  size_t name, value, len; /* offsets into c->head; the value's length */
} header;

struct ebb_http_conn {
  uv_tcp_t tcp; /* handle data: the connection */
  uv_timer_t timer;
  uv_shutdown_t shutdown;
  ebb_http_server *s; /* NULL once the handles are closed */
  ebb_http_conn *prev, *next;
  int state;
  int handles;            /* handles not yet through their close callback */
  unsigned counted : 1;   /* counted in s->nopen */
  unsigned reading : 1;
  unsigned eof : 1;       /* the peer has shut down its side */
  unsigned shut : 1;      /* our write side is shut down (FINISHING) */
  unsigned held : 1;      /* the application holds c: request unanswered or stream open */
  unsigned stream : 1;
  unsigned keep_alive : 1;
  unsigned head_only : 1; /* a HEAD request: no body in the answer */
  unsigned headers_done : 1;
  unsigned in_field : 1;  /* a header name is being collected */
  unsigned method_seen : 1;
  unsigned socketless : 1; /* fuzzing (ebb__http_conn_socketless): output is dropped */
  llhttp_t parser;
  const char *chunk;     /* start of the bytes llhttp is executing */
  ptrdiff_t hbytes;      /* request line and header bytes before chunk; negative while the
                            request starts inside it */
  int fail_status;       /* set by a parser callback that stops parsing: >0 the error to
                            answer, <0 close quietly (out of memory) */
  char fail_message[96];
  ebb_buf head;          /* the URL, then each header's name and value, NUL-separated */
  header *hdrs;
  size_t nhdrs, caphdrs;
  ebb_buf body;
  ebb_buf in;            /* input not parsed yet (behind an unanswered request) */
  ebb_http_request req;
  void *data;
  void (*on_close)(ebb_http_conn *c, void *data);
};

struct ebb_http_server {
  uv_loop_t *loop;
  ebb_http_limits lim;
  ebb_http_handler handler;
  void *ud;
  llhttp_settings_t settings;
  uv_tcp_t *listener;   /* NULL when not listening */
  uv_tcp_t drop;        /* accepts and closes a connection there is no memory for */
  int drop_busy;        /* drop is open */
  int stalled;          /* a connection is waiting for drop */
  int handles;          /* listeners and drop not yet through their close callback */
  int port;
  ebb_http_conn *conns; /* every connection not yet through its close callbacks */
  size_t nconns;
  size_t nlive;         /* of them, not CLOSED */
  size_t nopen;         /* of them, not closing at all (FINISHING or CLOSED) */
  int draining, closing;
  char rbuf[READ_BUF_SIZE]; /* one read at a time on a loop: shared by all connections */
  struct wreq *spare;   /* write requests kept for reuse, with their buffers (WREQ_KEEP) */
  unsigned nspare;
};

static void conn_close(ebb_http_conn *c);
static void conn_finish(ebb_http_conn *c);
static void pump(ebb_http_conn *c);

const char *ebb_http_status_text(int status) {
  switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
  }
}

/* ---------------------------------------------------------------- connection life */

static void on_timer(uv_timer_t *t);

/* One timer per connection; what its expiry means depends on the state. */
static void arm(ebb_http_conn *c, unsigned ms) {
  uv_timer_start(&c->timer, on_timer, ms, 0);
}

static void uncount(ebb_http_conn *c) {
  if (c->counted) {
    c->counted = 0;
    c->s->nopen--;
  }
}

static void conn_free(ebb_http_conn *c) {
  ebb_buf_free(&c->head);
  ebb_buf_free(&c->body);
  ebb_buf_free(&c->in);
  free(c->hdrs);
  free(c);
}

static void wreqs_free(ebb_http_server *s);

static void server_maybe_free(ebb_http_server *s) {
  if (s->closing && s->handles == 0 && s->conns == NULL) {
    wreqs_free(s);
    free(s);
  }
}

/* Ends the application's hold on a closed connection (a late answer). */
static void release(ebb_http_conn *c) {
  c->held = 0;
  if (c->handles == 0) conn_free(c);
}

static void on_conn_handle_closed(uv_handle_t *h) {
  ebb_http_conn *c = h->data;
  if (c->handles > 1) {
    c->handles--;
    return;
  }
  /* Called here, never from inside an ebb_http_* call, so the application
   * can free what it hung on c without pulling the rug from a caller. With
   * handles still 1, a late answer from inside it does not free c. */
  if (c->on_close) {
    void (*cb)(ebb_http_conn *, void *) = c->on_close;
    c->on_close = NULL;
    cb(c, c->data);
    c->held = 0; /* the application has let go of c */
  }
  c->handles = 0;
  ebb_http_server *s = c->s;
  if (c->prev) c->prev->next = c->next;
  else s->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  s->nconns--;
  c->s = NULL;
  if (!c->held) conn_free(c);
  server_maybe_free(s);
}

/* Closes now: unsent output is lost. */
static void conn_close(ebb_http_conn *c) {
  if (c->state == C_CLOSED) return;
  c->state = C_CLOSED;
  uncount(c);
  c->s->nlive--;
  uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
  uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  ebb_http_conn *c = req->handle->data;
  if (c->state == C_CLOSED) return;
  c->shut = 1;
  if (status < 0 || c->eof) {
    conn_close(c);
    return;
  }
  unsigned idle = c->s->lim.idle_timeout_ms;
  arm(c, idle < LINGER_MS ? idle : LINGER_MS);
}

static void read_on(ebb_http_conn *c);

/* Closes after the output queued so far is written (bounded by the idle timeout). */
static void conn_finish(ebb_http_conn *c) {
  if (c->state == C_FINISHING || c->state == C_CLOSED) return;
  c->state = C_FINISHING;
  uncount(c);
  arm(c, c->s->lim.idle_timeout_ms);
  if (uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, on_shutdown) < 0) {
    conn_close(c);
    return;
  }
  read_on(c);
}

/* ---------------------------------------------------------------- writing */

/* A write in flight and its bytes. Kept for the next answer once written
 * (s->spare), buffer and all: an answer per request otherwise costs two
 * mallocs and two frees, and the buffer's malloc was a fifth of answering.
 * At most WREQ_KEEP of them, with buffers of WREQ_KEEP_BUF at most (1 MiB). */
typedef struct wreq {
  uv_write_t req;
  ebb_buf buf;
  struct wreq *next; /* in s->spare */
} wreq;

static void wreq_drop(wreq *w) {
  ebb_buf_free(&w->buf);
  free(w);
}

static void wreqs_free(ebb_http_server *s) {
  while (s->spare) {
    wreq *w = s->spare;
    s->spare = w->next;
    wreq_drop(w);
  }
  s->nspare = 0;
}

/* A write request with an empty buffer, or NULL out of memory. */
static wreq *wreq_get(ebb_http_server *s) {
  wreq *w = s->spare;
  if (w) {
    s->spare = w->next;
    s->nspare--;
    ebb_buf_reset(&w->buf);
    return w;
  }
  if ((w = malloc(sizeof *w)) != NULL) ebb_buf_init(&w->buf);
  return w;
}

static void wreq_put(ebb_http_server *s, wreq *w) {
  if (s == NULL || s->closing || s->nspare >= WREQ_KEEP || w->buf.cap > WREQ_KEEP_BUF) {
    wreq_drop(w);
    return;
  }
  w->next = s->spare;
  s->spare = w;
  s->nspare++;
}

static void on_write(uv_write_t *req, int status) {
  wreq *w = (wreq *)req;
  ebb_http_conn *c = req->handle->data;
  wreq_put(c->s, w);
  if (c->state == C_CLOSED) return;
  if (status < 0) {
    conn_close(c); /* the peer is gone */
    return;
  }
  if (c->state == C_IDLE) arm(c, c->s->lim.idle_timeout_ms);
  pump(c);
}

/* Queues w's bytes, taking w (NULL: out of memory). On failure the
 * connection is closed. */
static int send_wreq(ebb_http_conn *c, wreq *w) {
  if (c->socketless) {
    if (w) wreq_put(c->s, w);
    return 0;
  }
  if (w == NULL || w->buf.oom || w->buf.len > UINT_MAX) {
    if (w) wreq_drop(w);
    conn_close(c);
    return EBB_ENOMEM;
  }
  uv_buf_t ub = uv_buf_init(w->buf.data, (unsigned)w->buf.len);
  if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &ub, 1, on_write) < 0) {
    wreq_drop(w);
    conn_close(c);
    return EBB_EUNAVAIL;
  }
  return 0;
}

/* Queues b's bytes, taking its memory. On failure the connection is closed. */
static int send_buf(ebb_http_conn *c, ebb_buf *b) {
  wreq *w = wreq_get(c->s);
  if (w) {
    ebb_buf_free(&w->buf);
    w->buf = *b;
    ebb_buf_init(b);
  } else {
    ebb_buf_free(b);
  }
  return send_wreq(c, w);
}

static int send_response(ebb_http_conn *c, int status, const char *content_type,
                         const char *extra_headers, const char *body, size_t len, int keep_alive) {
  int bodiless = status < 200 || status == 204 || status == 304;
  int send_body = !bodiless && !c->head_only;
  size_t extra_len = extra_headers ? strlen(extra_headers) : 0;
  wreq *w = wreq_get(c->s);
  if (w == NULL) return send_wreq(c, NULL);
  ebb_buf *b = &w->buf;
  ebb_buf_reserve(b, 160 + extra_len + (content_type ? strlen(content_type) : 0) +
                         (send_body ? len : 0));
  /* Appends, not printf: this runs once per request, and printf's cost was
   * a fifth of the daemon's own instructions for GET /health. */
  ebb_buf_append(b, "HTTP/1.1 ", 9);
  ebb_buf_int(b, status);
  ebb_buf_putc(b, ' ');
  ebb_buf_puts(b, ebb_http_status_text(status));
  ebb_buf_append(b, "\r\n", 2);
  if (content_type) {
    ebb_buf_append(b, "Content-Type: ", 14);
    ebb_buf_puts(b, content_type);
    ebb_buf_append(b, "\r\n", 2);
  }
  ebb_buf_append(b, extra_headers, extra_len);
  if (!bodiless) {
    ebb_buf_append(b, "Content-Length: ", 16);
    ebb_buf_int(b, (long long)len);
    ebb_buf_append(b, "\r\n", 2);
  }
  ebb_buf_puts(b, keep_alive ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n");
  if (send_body) ebb_buf_append(b, body, len);
  return send_wreq(c, w);
}

static void error_json(ebb_buf *b, const char *code, const char *message) {
  ebb_buf_puts(b, "{\"error\":{\"code\":");
  ebb_buf_json_string(b, code, strlen(code));
  ebb_buf_puts(b, ",\"message\":");
  ebb_buf_json_string(b, message, strlen(message));
  ebb_buf_puts(b, "}}");
}

/* Answers a request the application never saw with an error, and closes. */
static void refuse(ebb_http_conn *c, int status, const char *code, const char *message) {
  ebb_buf body = EBB_BUF_INIT;
  error_json(&body, code, message);
  if (body.oom) {
    ebb_buf_free(&body);
    conn_close(c);
    return;
  }
  c->head_only = 0;
  if (send_response(c, status, "application/json", NULL, body.data, body.len, 0) == 0)
    conn_finish(c);
  ebb_buf_free(&body);
}

/* ---------------------------------------------------------------- parsing */

static ebb_http_conn *conn_of(llhttp_t *p) {
  return p->data;
}

/* Stops the parser with a "too_large" error to answer. */
static int fail(ebb_http_conn *c, int status, const char *what, size_t limit) {
  c->fail_status = status;
  snprintf(c->fail_message, sizeof c->fail_message, "%s exceed the limit of %zu bytes", what,
           limit);
  llhttp_set_error_reason(&c->parser, c->fail_message);
  return HPE_USER;
}

/* Stops the parser to close quietly: there is no memory to answer with. */
static int fail_oom(ebb_http_conn *c) {
  c->fail_status = -1;
  return HPE_USER;
}

static int fail_headers(ebb_http_conn *c) {
  return fail(c, 431, "request line and headers", c->s->lim.max_header_bytes);
}

static int fail_body(ebb_http_conn *c) {
  return fail(c, 413, "request body would", c->s->lim.max_body_bytes);
}

/* Keeps the raw request line and headers under the limit; end: how far
 * into the current chunk they have come. Counted up to the last header's
 * end within a chunk, so the final CRLFs may go a few bytes over. */
static int check_header_bytes(ebb_http_conn *c, const char *end) {
  if (!c->headers_done &&
      c->hbytes + (end - c->chunk) > (ptrdiff_t)c->s->lim.max_header_bytes)
    return fail_headers(c);
  return 0;
}

static int store(ebb_http_conn *c, const char *at, size_t n) {
  if (check_header_bytes(c, at + n) != 0) return HPE_USER;
  if (c->head.len + n + 1 > c->s->lim.max_header_bytes) return fail_headers(c); /* trailers */
  return ebb_buf_append(&c->head, at, n) == 0 ? 0 : fail_oom(c);
}

static int store_end(ebb_http_conn *c) {
  return ebb_buf_putc(&c->head, '\0') == 0 ? 0 : fail_oom(c);
}

static int on_message_begin(llhttp_t *p) {
  ebb_http_conn *c = conn_of(p);
  c->state = C_READING;
  ebb_buf_reset(&c->head);
  ebb_buf_reset(&c->body);
  c->nhdrs = 0;
  c->hbytes = 0;
  c->headers_done = c->in_field = c->method_seen = 0;
  arm(c, c->s->lim.request_timeout_ms);
  return 0;
}

static int on_method(llhttp_t *p, const char *at, size_t n) {
  ebb_http_conn *c = conn_of(p);
  if (!c->method_seen) {
    c->method_seen = 1;
    c->hbytes = -(at - c->chunk); /* the request starts here */
  }
  return check_header_bytes(c, at + n);
}

static int on_url(llhttp_t *p, const char *at, size_t n) {
  return store(conn_of(p), at, n);
}

static int on_url_complete(llhttp_t *p) {
  return store_end(conn_of(p));
}

/* Starts a header entry at the first piece of its name (once per name). */
static int open_header(ebb_http_conn *c) {
  if (c->in_field) return 0;
  if (c->nhdrs == c->caphdrs) {
    size_t cap = c->caphdrs ? c->caphdrs * 2 : 16;
    header *h = realloc(c->hdrs, cap * sizeof *h);
    if (h == NULL) return fail_oom(c);
    c->hdrs = h;
    c->caphdrs = cap;
  }
  c->in_field = 1;
  c->hdrs[c->nhdrs++] = (header){c->head.len, c->head.len, 0};
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n) {
  ebb_http_conn *c = conn_of(p);
  return open_header(c) != 0 ? HPE_USER : store(c, at, n);
}

static int on_header_field_complete(llhttp_t *p) {
  ebb_http_conn *c = conn_of(p);
  if (open_header(c) != 0 || store_end(c) != 0) return HPE_USER; /* open: an empty name */
  c->in_field = 0;
  c->hdrs[c->nhdrs - 1].value = c->head.len;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
  return store(conn_of(p), at, n);
}

static int on_header_value_complete(llhttp_t *p) {
  ebb_http_conn *c = conn_of(p);
  header *h = &c->hdrs[c->nhdrs - 1];
  while (c->head.len > h->value &&
         (c->head.data[c->head.len - 1] == ' ' || c->head.data[c->head.len - 1] == '\t'))
    c->head.len--;
  h->len = c->head.len - h->value;
  return store_end(c);
}

static const header *find_header(ebb_http_conn *c, const char *name) {
  for (size_t i = 0; i < c->nhdrs; i++)
    if (strcasecmp(c->head.data + c->hdrs[i].name, name) == 0) return &c->hdrs[i];
  return NULL;
}

static int on_headers_complete(llhttp_t *p) {
  ebb_http_conn *c = conn_of(p);
  c->headers_done = 1;
  int has_body = (p->flags & F_CHUNKED) || ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0);
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > c->s->lim.max_body_bytes) {
    fail_body(c);
    return -1;
  }
  /* The client waits for this before sending the body (RFC 9110, 10.1.1). */
  const header *expect = find_header(c, "expect");
  if (expect && has_body && p->http_major == 1 && p->http_minor >= 1 &&
      strcasecmp(c->head.data + expect->value, "100-continue") == 0) {
    ebb_buf b = EBB_BUF_INIT;
    ebb_buf_puts(&b, "HTTP/1.1 100 Continue\r\n\r\n");
    if (send_buf(c, &b) != 0) {
      c->fail_status = -1;
      return -1;
    }
  }
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n) {
  ebb_http_conn *c = conn_of(p);
  if (n > c->s->lim.max_body_bytes - c->body.len)
    return fail_body(c);
  return ebb_buf_append(&c->body, at, n) == 0 ? 0 : fail_oom(c);
}

/* The request is complete: fill c->req and pause, so that it is handed to
 * the application before anything behind it is parsed. */
static int on_message_complete(llhttp_t *p) {
  ebb_http_conn *c = conn_of(p);
  if (ebb_buf_cstr(&c->head) == NULL || ebb_buf_cstr(&c->body) == NULL) return fail_oom(c);
  char *url = c->head.data; /* the URL comes first */
  char *cut = strchr(url, '#');
  if (cut) *cut = '\0';
  cut = strchr(url, '?');
  if (cut) *cut++ = '\0';
  c->req.method = llhttp_method_name((llhttp_method_t)p->method);
  c->req.path = url;
  c->req.query = cut ? cut : "";
  c->req.body = c->body.data;
  c->req.body_len = c->body.len;
  c->req.http_minor = p->http_minor;
  /* After an upgrade or CONNECT the bytes behind are not HTTP: answer, then close. */
  c->keep_alive = llhttp_should_keep_alive(p) && !p->upgrade;
  c->head_only = p->method == HTTP_HEAD;
  c->state = C_HELD;
  c->held = 1;
  uv_timer_stop(&c->timer);
  return HPE_PAUSED;
}

static void init_settings(llhttp_settings_t *st) {
  llhttp_settings_init(st);
  st->on_message_begin = on_message_begin;
  st->on_method = on_method;
  st->on_url = on_url;
  st->on_url_complete = on_url_complete;
  st->on_header_field = on_header_field;
  st->on_header_field_complete = on_header_field_complete;
  st->on_header_value = on_header_value;
  st->on_header_value_complete = on_header_value_complete;
  st->on_headers_complete = on_headers_complete;
  st->on_body = on_body;
  st->on_message_complete = on_message_complete;
}

static void parse_failed(ebb_http_conn *c, llhttp_errno_t e) {
  if (c->fail_status < 0) {
    conn_close(c);
  } else if (c->fail_status > 0) {
    refuse(c, c->fail_status, "too_large", c->fail_message);
  } else {
    char msg[160];
    const char *reason = llhttp_get_error_reason(&c->parser);
    snprintf(msg, sizeof msg, "malformed HTTP request: %s", reason ? reason : llhttp_errno_name(e));
    refuse(c, 400, "bad_request", msg);
  }
}

static int parsing(ebb_http_conn *c) {
  return (c->state == C_IDLE || c->state == C_READING) &&
         uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) < WRITE_HIGH_WATER;
}

/* Parses data for as long as the connection may take requests, handing each
 * complete one to the application; returns the bytes consumed. */
static size_t run(ebb_http_conn *c, const char *data, size_t len) {
  size_t used = 0;
  while (used < len && parsing(c)) {
    const char *p = data + used;
    c->chunk = p;
    llhttp_errno_t e = llhttp_execute(&c->parser, p, len - used);
    if (e == HPE_OK) {
      if (c->state == C_READING && !c->headers_done) {
        c->hbytes += (ptrdiff_t)(len - used);
        if (c->hbytes > (ptrdiff_t)c->s->lim.max_header_bytes) {
          fail_headers(c);
          parse_failed(c, HPE_USER);
        }
      }
      return len;
    }
    if (e != HPE_PAUSED) {
      parse_failed(c, e);
      return len;
    }
    used += (size_t)(llhttp_get_error_pos(&c->parser) - p);
    llhttp_resume(&c->parser);
    c->s->handler(c->s->ud, c, &c->req);
  }
  return used;
}

/* ---------------------------------------------------------------- reading */

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  ebb_http_conn *c = h->data;
  *buf = uv_buf_init(c->s->rbuf, sizeof c->s->rbuf);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf);

static void read_on(ebb_http_conn *c) {
  if (c->reading || c->eof || c->state == C_CLOSED || c->socketless) return;
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0) {
    conn_close(c);
    return;
  }
  c->reading = 1;
}

static void read_off(ebb_http_conn *c) {
  if (!c->reading) return;
  uv_read_stop((uv_stream_t *)&c->tcp);
  c->reading = 0;
}

/* After parsing: drop input nobody will parse, close a connection whose
 * peer has finished, and read only while little input waits. */
static void settle(ebb_http_conn *c) {
  if (c->state != C_IDLE && c->state != C_READING && c->state != C_HELD) {
    ebb_buf_free(&c->in);
    return;
  }
  if (c->eof) {
    if (c->in.len == 0 && c->state == C_IDLE) conn_finish(c);
    else if (c->in.len == 0 && c->state == C_READING) conn_close(c); /* can never complete */
    return;
  }
  if (c->in.len < c->s->lim.max_header_bytes) read_on(c);
  else read_off(c);
}

/* Parses the input that waited, as far as possible now. */
static void pump(ebb_http_conn *c) {
  if (c->in.len > 0 && parsing(c)) {
    size_t used = run(c, c->in.data, c->in.len);
    if (used == c->in.len) {
      if (c->in.cap > KEEP_BUF_MAX) ebb_buf_free(&c->in);
      else ebb_buf_reset(&c->in);
    } else if (used > 0) {
      memmove(c->in.data, c->in.data + used, c->in.len - used);
      c->in.len -= used;
    }
  }
  settle(c);
}

/* Takes n bytes read from the peer. */
static void input(ebb_http_conn *c, const char *data, size_t n) {
  if (c->state == C_STREAM || c->state == C_FINISHING || c->state == C_CLOSED)
    return; /* nobody reads it */
  size_t used = 0;
  if (c->in.len == 0) used = run(c, data, n); /* the usual case: no copy */
  if (used < n && (c->state == C_IDLE || c->state == C_READING || c->state == C_HELD)) {
    if (ebb_buf_append(&c->in, data + used, n - used) != 0) {
      conn_close(c);
      return;
    }
    if (c->in.len > n - used) {
      pump(c); /* older input was waiting: it goes first */
      return;
    }
  }
  settle(c);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf) {
  ebb_http_conn *c = st->data;
  if (n == 0 || c->state == C_CLOSED) return;
  if (n < 0) {
    c->reading = 0;
    if (n != UV_EOF) {
      conn_close(c);
      return;
    }
    uv_read_stop(st);
    c->eof = 1;
    if (c->state == C_IDLE || c->state == C_READING || c->state == C_HELD) settle(c);
    else if (c->state == C_STREAM || c->shut) conn_close(c); /* the subscriber is gone */
    return;
  }
  input(c, buf->base, (size_t)n);
}

/* ---------------------------------------------------------------- timeouts */

static void on_timer(uv_timer_t *t) {
  ebb_http_conn *c = t->data;
  char msg[96];
  switch (c->state) {
    case C_IDLE: conn_close(c); break;
    case C_READING:
      snprintf(msg, sizeof msg, "request not received within %u ms",
               c->s->lim.request_timeout_ms);
      refuse(c, 408, "timeout", msg);
      break;
    case C_FINISHING: conn_close(c); break;
    default: break;
  }
}

/* ---------------------------------------------------------------- server */

int ebb_http_server_new(ebb_http_server **out, uv_loop_t *loop, const ebb_http_limits *lim,
                        ebb_http_handler handler, void *ud, ebb_error *err) {
  *out = NULL;
  if (handler == NULL) return ebb_error_set(err, EBB_EBADREQ, "an HTTP server needs a handler");
  ebb_http_server *s = calloc(1, sizeof *s);
  if (s == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory creating the HTTP server");
  s->loop = loop;
  if (lim) s->lim = *lim;
  if (s->lim.max_header_bytes == 0) s->lim.max_header_bytes = DEFAULT_MAX_HEADER;
  if (s->lim.max_body_bytes == 0) s->lim.max_body_bytes = DEFAULT_MAX_BODY;
  if (s->lim.max_connections == 0) s->lim.max_connections = DEFAULT_MAX_CONNECTIONS;
  if (s->lim.idle_timeout_ms == 0) s->lim.idle_timeout_ms = DEFAULT_IDLE_MS;
  if (s->lim.request_timeout_ms == 0) s->lim.request_timeout_ms = DEFAULT_REQUEST_MS;
  s->handler = handler;
  s->ud = ud;
  init_settings(&s->settings);
  *out = s;
  return 0;
}

static void on_listener_closed(uv_handle_t *h) {
  ebb_http_server *s = h->data;
  free(h);
  s->handles--;
  server_maybe_free(s);
}

static void close_listener(ebb_http_server *s) {
  if (s->listener == NULL) return;
  uv_close((uv_handle_t *)s->listener, on_listener_closed);
  s->listener = NULL;
}

static void on_connection(uv_stream_t *l, int status);

/* The drop handle has closed: a connection that found no memory may wait. */
static void on_drop_closed(uv_handle_t *h) {
  ebb_http_server *s = h->data;
  s->drop_busy = 0;
  s->handles--;
  if (s->stalled && s->listener) {
    s->stalled = 0;
    on_connection((uv_stream_t *)s->listener, 0);
  }
  server_maybe_free(s);
}

/* Accepts a connection there is no memory for and closes it: libuv stops
 * watching the listener until a pending connection is accepted. */
static void drop_connection(ebb_http_server *s, uv_stream_t *l) {
  if (s->drop_busy) {
    s->stalled = 1;
    return;
  }
  uv_tcp_init(s->loop, &s->drop);
  s->drop.data = s;
  s->drop_busy = 1;
  s->handles++;
  uv_accept(l, (uv_stream_t *)&s->drop);
  uv_close((uv_handle_t *)&s->drop, on_drop_closed);
}

/* A new connection on s, with a socket handle not yet connected. */
static ebb_http_conn *conn_new(ebb_http_server *s) {
  ebb_http_conn *c = calloc(1, sizeof *c);
  if (c == NULL) return NULL;
  uv_tcp_init(s->loop, &c->tcp);
  uv_timer_init(s->loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->handles = 2;
  c->s = s;
  c->next = s->conns;
  if (s->conns) s->conns->prev = c;
  s->conns = c;
  s->nconns++;
  s->nlive++;
  c->state = C_IDLE;
  llhttp_init(&c->parser, HTTP_REQUEST, &s->settings);
  c->parser.data = c;
  c->counted = 1;
  s->nopen++;
  return c;
}

static void on_connection(uv_stream_t *l, int status) {
  ebb_http_server *s = l->data;
  if (status < 0 || s->closing) return; /* e.g. out of file descriptors: libuv retries */
  ebb_http_conn *c = conn_new(s);
  if (c == NULL) {
    drop_connection(s, l);
    return;
  }
  if (uv_accept(l, (uv_stream_t *)&c->tcp) < 0) {
    conn_close(c);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  /* Connections being refused are not counted as open; past twice the
   * limit there is no room even to refuse politely. */
  if (s->nconns > 2 * (size_t)s->lim.max_connections) {
    conn_close(c);
    return;
  }
  if (s->nopen > s->lim.max_connections) {
    char msg[96];
    snprintf(msg, sizeof msg, "too many connections (the limit is %u)", s->lim.max_connections);
    refuse(c, 503, "unavailable", msg);
    return;
  }
  arm(c, s->lim.idle_timeout_ms);
  read_on(c);
}

int ebb_http_server_listen(ebb_http_server *s, const char *host, int port, ebb_error *err) {
  if (s->listener || s->closing || s->draining)
    return ebb_error_set(err, EBB_EBADREQ, "the HTTP server is already listening or closing");
  if (host == NULL || strcmp(host, "localhost") == 0) host = "127.0.0.1";
  if (port < 0 || port > 65535)
    return ebb_error_set(err, EBB_EBADREQ, "invalid port %d: expected 0 to 65535", port);
  char ip[64];
  size_t n = strlen(host);
  if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
    host++;
    n -= 2;
  }
  if (n >= sizeof ip)
    return ebb_error_set(err, EBB_EBADREQ, "invalid listen address '%s'", host);
  memcpy(ip, host, n);
  ip[n] = '\0';
  struct sockaddr_storage addr;
  int v6 = strchr(ip, ':') != NULL;
  int r = v6 ? uv_ip6_addr(ip, port, (struct sockaddr_in6 *)&addr)
             : uv_ip4_addr(ip, port, (struct sockaddr_in *)&addr);
  if (r < 0)
    return ebb_error_set(err, EBB_EBADREQ,
                         "invalid listen address '%s': expected an IPv4 or IPv6 address or "
                         "localhost", ip);
  char name[80];
  snprintf(name, sizeof name, v6 ? "[%s]:%d" : "%s:%d", ip, port);

  uv_tcp_t *l = malloc(sizeof *l);
  if (l == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory listening on %s", name);
  uv_tcp_init(s->loop, l);
  l->data = s;
  s->handles++;
  r = uv_tcp_bind(l, (const struct sockaddr *)&addr, 0);
  if (r == 0) r = uv_listen((uv_stream_t *)l, BACKLOG, on_connection);
  if (r < 0) {
    uv_close((uv_handle_t *)l, on_listener_closed);
    return ebb_error_set(err, r == UV_EADDRINUSE ? EBB_EBUSY : EBB_EUNAVAIL,
                         "cannot listen on %s: %s", name, uv_strerror(r));
  }
  struct sockaddr_storage bound;
  int len = sizeof bound;
  if (uv_tcp_getsockname(l, (struct sockaddr *)&bound, &len) == 0)
    s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
  s->listener = l;
  return 0;
}

int ebb_http_server_port(const ebb_http_server *s) {
  return s->port;
}

size_t ebb_http_server_connections(const ebb_http_server *s) {
  return s->nlive;
}

void ebb_http_server_drain(ebb_http_server *s) {
  if (s == NULL || s->draining) return;
  s->draining = 1;
  close_listener(s);
  for (ebb_http_conn *c = s->conns; c; c = c->next)
    if (c->state == C_IDLE) conn_finish(c);
}

void ebb_http_server_close(ebb_http_server *s) {
  if (s == NULL || s->closing) return;
  s->closing = s->draining = 1;
  close_listener(s);
  for (ebb_http_conn *c = s->conns; c; c = c->next) conn_close(c);
  server_maybe_free(s);
}

/* ---------------------------------------------------------------- answering */

/* 1 if c has a request waiting for its answer. A closed connection the
 * application still held is let go of (and may be freed). */
static int answerable(ebb_http_conn *c) {
  if (c->state == C_HELD) return 1;
  if (c->state == C_CLOSED && c->held && !c->stream) release(c);
  return 0;
}

int ebb_http_respond(ebb_http_conn *c, int status, const char *content_type,
                     const char *extra_headers, const char *body, size_t len) {
  if (c == NULL || !answerable(c)) return EBB_EUNAVAIL;
  int keep_alive = c->keep_alive && !c->s->draining;
  c->held = 0;
  c->state = C_IDLE;
  int rc = send_response(c, status, content_type, extra_headers, body, len, keep_alive);
  if (c->body.cap > KEEP_BUF_MAX) ebb_buf_free(&c->body);
  if (rc != 0) return rc;
  if (!keep_alive) conn_finish(c);
  else arm(c, c->s->lim.idle_timeout_ms);
  /* Input behind this request is parsed by the loop that called the
   * handler, or else from this answer's write callback. */
  return 0;
}

int ebb_http_respond_error(ebb_http_conn *c, int status, const char *code, const char *message) {
  ebb_buf b = EBB_BUF_INIT;
  error_json(&b, code, message);
  int rc;
  if (b.oom) {
    static const char oom[] = "{\"error\":{\"code\":\"out_of_memory\",\"message\":\"out of memory\"}}";
    rc = ebb_http_respond(c, status, "application/json", NULL, oom, sizeof oom - 1);
  } else {
    rc = ebb_http_respond(c, status, "application/json", NULL, b.data, b.len);
  }
  ebb_buf_free(&b);
  return rc;
}

int ebb_http_stream_start(ebb_http_conn *c, int status, const char *content_type,
                          const char *extra_headers) {
  if (c == NULL || !answerable(c)) return EBB_EUNAVAIL;
  c->state = C_STREAM;
  c->stream = 1;
  uv_timer_stop(&c->timer);
  ebb_buf b = EBB_BUF_INIT;
  ebb_buf_printf(&b, "HTTP/1.1 %d %s\r\n", status, ebb_http_status_text(status));
  if (content_type) ebb_buf_printf(&b, "Content-Type: %s\r\n", content_type);
  if (extra_headers) ebb_buf_puts(&b, extra_headers);
  ebb_buf_puts(&b, "Connection: close\r\n\r\n");
  int rc = send_buf(c, &b);
  if (rc != 0) {
    c->held = 0; /* closed: nothing for the application to end */
    return rc;
  }
  read_on(c); /* to notice the peer leaving */
  return 0;
}

int ebb_http_stream_write(ebb_http_conn *c, const char *data, size_t len) {
  if (c == NULL || c->state != C_STREAM) return EBB_EUNAVAIL;
  if (len == 0) return 0;
  wreq *w = wreq_get(c->s);
  if (w) ebb_buf_append(&w->buf, data, len);
  return send_wreq(c, w);
}

size_t ebb_http_stream_pending(ebb_http_conn *c) {
  if (c == NULL || c->state != C_STREAM) return 0;
  return uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
}

void ebb_http_stream_end(ebb_http_conn *c) {
  if (c == NULL || !c->stream || !c->held) return;
  if (c->state == C_CLOSED) {
    release(c);
    return;
  }
  c->held = 0;
  conn_finish(c);
}

const char *ebb_http_header(ebb_http_conn *c, const char *name, size_t *len) {
  const header *h = find_header(c, name);
  if (len) *len = h ? h->len : 0;
  return h ? c->head.data + h->value : NULL;
}

void ebb_http_conn_set_data(ebb_http_conn *c, void *data,
                            void (*on_close)(ebb_http_conn *c, void *data)) {
  c->data = data;
  c->on_close = on_close;
}

void *ebb_http_conn_data(ebb_http_conn *c) {
  return c->data;
}

/* ---------------------------------------------------------------- fuzzing seam */

ebb_http_conn *ebb__http_conn_socketless(ebb_http_server *s) {
  if (s->closing) return NULL;
  ebb_http_conn *c = conn_new(s);
  if (c == NULL) return NULL;
  c->socketless = 1;
  arm(c, s->lim.idle_timeout_ms);
  return c;
}

void ebb__http_conn_input(ebb_http_conn *c, const char *data, size_t len) {
  if (len > 0) input(c, data, len);
}
