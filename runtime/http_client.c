/*
 * http_client.c: the CLI's blocking HTTP/1.1 client (see http_client.h).
 *
 * Sockets are non-blocking underneath and every wait goes through poll(),
 * so that one deadline covers connecting, writing and reading however the
 * bytes trickle in, and EINTR only ever means "wait again". llhttp does the
 * framing (Content-Length, chunked, close-delimited); this file only keeps
 * what the caller needs from it: the status, Content-Type and body, or, for
 * an event stream, the events themselves.
 */
#include "http_client.h"

#include <errno.h>
#include <llhttp.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "clock.h"

/* ---------------------------------------------------------------- URLs */

static int is_host_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '.' || c == '_';
}

static int is_ipv6_char(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') || c == ':' ||
         c == '.';
}

int ebb_url_parse(const char *text, ebb_url *out, ebb_error *err) {
  memset(out, 0, sizeof *out);
  if (strncasecmp(text, "https://", 8) == 0)
    return ebb_error_set(err, EBB_EBADREQ,
                         "invalid URL %.300s: https is not supported, use http:// (put a TLS "
                         "proxy in front of the daemon for remote access)",
                         text);
  if (strncasecmp(text, "http://", 7) != 0)
    return ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: expected http://host:port", text);
  const char *p = text + 7;
  const char *host = p;
  size_t host_len;
  if (*p == '[') {
    host = ++p;
    while (is_ipv6_char(*p)) p++;
    host_len = (size_t)(p - host);
    if (*p != ']' || host_len == 0 || memchr(host, ':', host_len) == NULL)
      return ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: bad IPv6 address", text);
    p++;
  } else {
    while (is_host_char(*p)) p++;
    host_len = (size_t)(p - host);
    if (*p == '@')
      return ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: user info is not supported",
                           text);
    if (host_len == 0)
      return ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: no host", text);
  }
  if (host_len >= sizeof out->host)
    return ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: host name too long", text);
  memcpy(out->host, host, host_len);
  out->host[host_len] = '\0';

  out->port = 80;
  if (*p == ':') {
    long port = 0;
    const char *digits = ++p;
    while (*p >= '0' && *p <= '9' && p - digits < 6) port = port * 10 + (*p++ - '0');
    if (p == digits || (*p >= '0' && *p <= '9') || port < 1 || port > 65535)
      return ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: bad port (expected 1 to 65535)",
                           text);
    out->port = (int)port;
  }

  if (*p != '\0' && *p != '/')
    return ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: unexpected '%c' after the host",
                         text, *p);
  const char *base = p;
  for (; *p; p++) {
    if (*p == '?' || *p == '#')
      return ebb_error_set(err, EBB_EBADREQ,
                           "invalid URL %.300s: a query or fragment is not allowed here", text);
    if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f)
      return ebb_error_set(err, EBB_EBADREQ,
                           "invalid URL %.300s: the path must be percent-encoded", text);
  }
  size_t base_len = (size_t)(p - base);
  while (base_len > 0 && base[base_len - 1] == '/') base_len--;
  if (base_len >= sizeof out->base_path)
    return ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: path too long", text);
  memcpy(out->base_path, base, base_len);
  out->base_path[base_len] = '\0';
  return 0;
}

int ebb_url_encode(ebb_buf *b, const char *s, size_t n) {
  static const char hex[] = "0123456789ABCDEF";
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '.' || c == '_' || c == '~') {
      ebb_buf_putc(b, (char)c);
    } else {
      char e[3] = {'%', hex[c >> 4], hex[c & 15]};
      ebb_buf_append(b, e, 3);
    }
  }
  return b->oom ? -1 : 0;
}

/* "http://host:port", the way messages name the daemon. */
static void url_origin(const ebb_url *u, char *buf, size_t len) {
  int v6 = strchr(u->host, ':') != NULL;
  snprintf(buf, len, "http://%s%s%s:%d", v6 ? "[" : "", u->host, v6 ? "]" : "", u->port);
}

/* ---------------------------------------------------------------- sockets */

/* Deadlines are monotonic nanoseconds; 0 means none. */
static uint64_t deadline_after(int ms) {
  return ms > 0 ? ebb_clock_mono_ns() + (uint64_t)ms * 1000000u : 0;
}

/* Waits for events on fd. Returns the revents, 0 on timeout, -1 on error. */
static int wait_fd(int fd, short events, uint64_t deadline) {
  for (;;) {
    int ms = -1;
    if (deadline) {
      uint64_t now = ebb_clock_mono_ns();
      if (now >= deadline) return 0;
      uint64_t left = (deadline - now + 999999u) / 1000000u;
      ms = left > INT32_MAX ? INT32_MAX : (int)left;
    }
    struct pollfd pfd = {fd, events, 0};
    int rc = poll(&pfd, 1, ms);
    if (rc > 0) return pfd.revents;
    if (rc == 0) {
      if (deadline) return 0;
      continue;
    }
    if (errno != EINTR) return -1;
  }
}

static int connect_one(const struct addrinfo *ai, uint64_t deadline, int *fd_out) {
  int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
  if (fd < 0) return errno;
  /* A non-blocking connect interrupted by a signal goes on in the background,
   * so EINTR is waited for like EINPROGRESS. */
  if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
    if (errno != EINPROGRESS && errno != EINTR) {
      int e = errno;
      close(fd);
      return e;
    }
    int ev = wait_fd(fd, POLLOUT, deadline);
    int e = 0;
    socklen_t elen = sizeof e;
    if (ev == 0) e = ETIMEDOUT;
    else if (ev < 0) e = errno;
    else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &elen) != 0) e = errno;
    if (e != 0) {
      close(fd);
      return e;
    }
  }
  *fd_out = fd;
  return 0;
}

/* Connects to u, trying each address the name resolves to in turn. */
static int connect_url(const ebb_url *u, const char *origin, uint64_t deadline, int *fd_out,
                       ebb_error *err) {
  struct addrinfo hints, *list = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  char port[8];
  snprintf(port, sizeof port, "%d", u->port);
  int rc = getaddrinfo(u->host, port, &hints, &list);
  if (rc != 0)
    return ebb_error_set(err, EBB_EUNAVAIL, "cannot connect to %s: %s", origin,
                         rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
  int e = ECONNREFUSED;
  for (struct addrinfo *ai = list; ai; ai = ai->ai_next) {
    e = connect_one(ai, deadline, fd_out);
    if (e == 0 || e == ETIMEDOUT) break;
  }
  freeaddrinfo(list);
  if (e == 0) return 0;
  return ebb_error_set(err, EBB_EUNAVAIL, "cannot connect to %s: %s", origin, strerror(e));
}

enum { IO_DONE = 0, IO_ANSWERED = 1, IO_TIMEOUT = -2, IO_ERROR = -1 };

/* Writes the whole request. IO_ANSWERED: the server answered (or hung up)
 * before taking it all, as a daemon refusing a request may; its answer is
 * then read like any other. IO_ERROR leaves errno set. */
static int send_all(int fd, const char *p, size_t n, uint64_t deadline) {
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w > 0) {
      p += w;
      n -= (size_t)w;
      continue;
    }
    if (errno == EINTR) continue;
    if (errno == EPIPE || errno == ECONNRESET) return IO_ANSWERED;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return IO_ERROR;
    int ev = wait_fd(fd, POLLOUT | POLLIN, deadline);
    if (ev == 0) return IO_TIMEOUT;
    if (ev < 0) return IO_ERROR;
    if (ev & (POLLIN | POLLHUP)) return IO_ANSWERED;
  }
  return IO_DONE;
}

/* Bytes read (0 at the end of the stream), IO_TIMEOUT, or IO_ERROR with errno. */
static ssize_t recv_some(int fd, char *buf, size_t cap, uint64_t deadline) {
  for (;;) {
    ssize_t r = recv(fd, buf, cap, 0);
    if (r >= 0) return r;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return IO_ERROR;
    int ev = wait_fd(fd, POLLIN, deadline);
    if (ev == 0) return IO_TIMEOUT;
    if (ev < 0) return IO_ERROR;
  }
}

/* ---------------------------------------------------------------- requests */

static int is_token(const char *s) {
  if (*s == '\0') return 0;
  for (; *s; s++)
    if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') ||
          strchr("!#$%&'*+-.^_`|~", *s)))
      return 0;
  return 1;
}

/* Visible ASCII (and spaces when allowed): nothing that could end a header
 * line or the request line early. */
static int is_visible(const char *s, int spaces) {
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c < 0x20 || c > 0x7e || (c == ' ' && !spaces)) return 0;
  }
  return 1;
}

/* Writes the request head and body into b, or returns EBB_EBADREQ for a
 * part that cannot go into one. */
static int build_request(ebb_buf *b, const ebb_url *u, const char *method, const char *path,
                         const char *accept, const char *token, const char *last_event_id,
                         const char *body, size_t body_len, ebb_error *err) {
  if (!is_token(method))
    return ebb_error_set(err, EBB_EBADREQ, "invalid HTTP method %.100s", method);
  if (path[0] != '/' || !is_visible(path, 0))
    return ebb_error_set(err, EBB_EBADREQ,
                         "invalid request path %.300s: it must start with '/' and be "
                         "percent-encoded",
                         path);
  if (token && (token[0] == '\0' || !is_visible(token, 0)))
    return ebb_error_set(err, EBB_EBADREQ, "invalid token: it must be visible ASCII characters");
  if (last_event_id && !is_visible(last_event_id, 1))
    return ebb_error_set(err, EBB_EBADREQ, "invalid last event id %.100s", last_event_id);
  int v6 = strchr(u->host, ':') != NULL;
  ebb_buf_printf(b, "%s %s%s HTTP/1.1\r\nHost: %s%s%s", method, u->base_path, path,
                 v6 ? "[" : "", u->host, v6 ? "]" : "");
  if (u->port != 80) ebb_buf_printf(b, ":%d", u->port);
  ebb_buf_printf(b, "\r\nUser-Agent: ebb\r\nAccept: %s\r\nConnection: close\r\n", accept);
  if (token) ebb_buf_printf(b, "Authorization: Bearer %s\r\n", token);
  if (last_event_id) ebb_buf_printf(b, "Last-Event-ID: %s\r\n", last_event_id);
  if (body) {
    ebb_buf_printf(b, "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n", body_len);
    ebb_buf_append(b, body, body_len);
  } else {
    /* Servers may refuse a POST without a length (411). */
    int has_body = strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0 ||
                   strcmp(method, "PATCH") == 0;
    ebb_buf_puts(b, has_body ? "Content-Length: 0\r\n\r\n" : "\r\n");
  }
  return b->oom ? ebb_error_set(err, EBB_ENOMEM, "out of memory") : 0;
}

/* ---------------------------------------------------------------- event streams */

/* The SSE line protocol (WHATWG HTML, "server-sent events"): lines end in
 * CRLF, LF or CR; "field: value" lines build an event; a blank line
 * dispatches it. */
typedef struct sse {
  ebb_buf line, data, id, event;
  int has_data, has_id, has_event;
  int after_cr;  /* the last line ended in CR: a LF that follows is part of it */
  int (*on_event)(void *ud, const char *id, const char *event, const char *data);
  void *ud;
} sse;

static void sse_free(sse *s) {
  ebb_buf_free(&s->line);
  ebb_buf_free(&s->data);
  ebb_buf_free(&s->id);
  ebb_buf_free(&s->event);
}

static int field_is(const char *f, size_t n, const char *name) {
  return n == strlen(name) && memcmp(f, name, n) == 0;
}

/* 0, 1 when on_event asked to stop, or an EBB_E* code. */
static int sse_dispatch(sse *s, ebb_error *err) {
  int rc = 0;
  if (s->has_data) {
    const char *data = ebb_buf_cstr(&s->data);
    const char *id = s->has_id ? ebb_buf_cstr(&s->id) : "";
    const char *event = s->has_event ? ebb_buf_cstr(&s->event) : "";
    if (data == NULL || id == NULL || event == NULL)
      return ebb_error_set(err, EBB_ENOMEM, "out of memory");
    rc = s->on_event(s->ud, s->has_id ? id : NULL, s->has_event ? event : NULL, data) != 0;
  }
  ebb_buf_reset(&s->data);
  ebb_buf_reset(&s->id);
  ebb_buf_reset(&s->event);
  s->has_data = s->has_id = s->has_event = 0;
  return rc;
}

static int sse_line(sse *s, ebb_error *err) {
  const char *line = s->line.data;
  size_t n = s->line.len;
  if (n == 0) return sse_dispatch(s, err);
  if (line[0] == ':') return 0;
  const char *colon = memchr(line, ':', n);
  size_t flen = colon ? (size_t)(colon - line) : n;
  const char *value = colon ? colon + 1 : line + n;
  if (colon && value < line + n && *value == ' ') value++;
  size_t vlen = (size_t)(line + n - value);
  if (field_is(line, flen, "data")) {
    if (s->has_data) ebb_buf_putc(&s->data, '\n');
    ebb_buf_append(&s->data, value, vlen);
    s->has_data = 1;
    if (s->data.len > EBB_HTTP_MAX_EVENT)
      return ebb_error_set(err, EBB_ETOOLARGE, "an event in the stream is over %zu bytes",
                           EBB_HTTP_MAX_EVENT);
  } else if (field_is(line, flen, "id")) {
    if (memchr(value, '\0', vlen)) return 0; /* the standard ignores such ids */
    ebb_buf_reset(&s->id);
    ebb_buf_append(&s->id, value, vlen);
    s->has_id = 1;
  } else if (field_is(line, flen, "event")) {
    ebb_buf_reset(&s->event);
    ebb_buf_append(&s->event, value, vlen);
    s->has_event = 1;
  }
  /* "retry" and unknown fields are ignored: reconnecting is the caller's call. */
  if (s->data.oom || s->id.oom || s->event.oom)
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  return 0;
}

/* Takes the next bytes of the body. 0, 1 when on_event asked to stop, or an
 * EBB_E* code. */
static int sse_feed(sse *s, const char *p, size_t n, ebb_error *err) {
  size_t i = 0;
  while (i < n) {
    if (s->after_cr) {
      s->after_cr = 0;
      if (p[i] == '\n') {
        i++;
        continue;
      }
    }
    size_t j = i;
    while (j < n && p[j] != '\r' && p[j] != '\n') j++;
    if (s->line.len + (j - i) > EBB_HTTP_MAX_EVENT)
      return ebb_error_set(err, EBB_ETOOLARGE, "a line in the event stream is over %zu bytes",
                           EBB_HTTP_MAX_EVENT);
    if (ebb_buf_append(&s->line, p + i, j - i) != 0)
      return ebb_error_set(err, EBB_ENOMEM, "out of memory");
    if (j == n) break;
    s->after_cr = p[j] == '\r';
    i = j + 1;
    int rc = sse_line(s, err);
    ebb_buf_reset(&s->line);
    if (rc != 0) return rc;
  }
  return 0;
}

/* ---------------------------------------------------------------- responses */

typedef struct reader {
  llhttp_t parser;
  llhttp_settings_t settings;  /* must outlive parser: kept beside it */
  const char *origin;
  int timeout_ms;        /* for messages only */
  int head;              /* answering a HEAD: no body whatever the headers say */
  int status;
  int done;              /* a final response is complete */
  int stopped;           /* on_event asked to stop */
  int failed;            /* an EBB_E* code set by a callback, with err filled */
  ebb_error *err;
  size_t header_bytes;
  char field[16];        /* the header name being read, if short enough to matter */
  size_t field_len;
  int in_ctype;          /* the current header is Content-Type */
  int has_ctype;
  ebb_buf ctype;
  ebb_buf body;
  sse *events;           /* NULL, or where a 200 body goes instead of body */
} reader;

static int fail(reader *r, int code) {
  r->failed = code;
  return HPE_USER;
}

static int count_header(reader *r, size_t n) {
  r->header_bytes += n;
  if (r->header_bytes <= EBB_HTTP_MAX_HEADERS) return 0;
  return fail(r, ebb_error_set(r->err, EBB_ETOOLARGE, "the response from %s has over %zu bytes "
                               "of headers", r->origin, EBB_HTTP_MAX_HEADERS));
}

static int on_message_begin(llhttp_t *p) {
  reader *r = p->data;
  r->status = 0;
  r->header_bytes = 0;
  r->field_len = 0;
  r->in_ctype = r->has_ctype = 0;
  ebb_buf_reset(&r->ctype);
  ebb_buf_reset(&r->body);
  return 0;
}

static int on_status(llhttp_t *p, const char *at, size_t n) {
  return count_header(p->data, n);
}

static int on_header_field(llhttp_t *p, const char *at, size_t n) {
  reader *r = p->data;
  if (count_header(r, n)) return HPE_USER;
  /* Longer names are kept as too long to match (field_len past the array). */
  if (r->field_len + n <= sizeof r->field) memcpy(r->field + r->field_len, at, n);
  r->field_len += n;
  return 0;
}

static int on_header_field_complete(llhttp_t *p) {
  reader *r = p->data;
  r->in_ctype = r->field_len == 12 && strncasecmp(r->field, "content-type", 12) == 0;
  r->field_len = 0;
  if (r->in_ctype) {
    ebb_buf_reset(&r->ctype);
    r->has_ctype = 1;
  }
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
  reader *r = p->data;
  if (count_header(r, n)) return HPE_USER;
  if (r->in_ctype && ebb_buf_append(&r->ctype, at, n) != 0)
    return fail(r, ebb_error_set(r->err, EBB_ENOMEM, "out of memory"));
  return 0;
}

static int on_header_value_complete(llhttp_t *p) {
  ((reader *)p->data)->in_ctype = 0;
  return 0;
}

static int is_event_stream(reader *r) {
  const char *ct = r->has_ctype ? ebb_buf_cstr(&r->ctype) : NULL;
  if (ct == NULL || strncasecmp(ct, "text/event-stream", 17) != 0) return 0;
  return ct[17] == '\0' || ct[17] == ';' || ct[17] == ' ' || ct[17] == '\t';
}

static int on_headers_complete(llhttp_t *p) {
  reader *r = p->data;
  r->status = llhttp_get_status_code(p);
  if (r->events && r->status == 200 && !is_event_stream(r))
    return fail(r, ebb_error_set(r->err, EBB_EBADREQ,
                                 "%s answered with %s, not an event stream", r->origin,
                                 r->has_ctype ? ebb_buf_cstr(&r->ctype) : "no Content-Type"));
  return r->head ? 1 : 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n) {
  reader *r = p->data;
  if (r->events && r->status == 200) {
    int rc = sse_feed(r->events, at, n, r->err);
    if (rc == 1) r->stopped = 1;
    else if (rc != 0) r->failed = rc;
    return rc ? HPE_USER : 0;
  }
  if (r->body.len + n > EBB_HTTP_MAX_BODY)
    return fail(r, ebb_error_set(r->err, EBB_ETOOLARGE, "the response from %s is over %zu bytes",
                                 r->origin, EBB_HTTP_MAX_BODY));
  if (ebb_buf_append(&r->body, at, n) != 0)
    return fail(r, ebb_error_set(r->err, EBB_ENOMEM, "out of memory"));
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  reader *r = p->data;
  /* An informational answer (100 Continue, 103 Early Hints) comes before the
   * real one on the same connection. */
  if (r->status >= 100 && r->status < 200 && r->status != 101) return 0;
  r->done = 1;
  return HPE_PAUSED;
}

static void reader_init(reader *r, const char *origin, int head, sse *events, ebb_error *err) {
  memset(r, 0, sizeof *r);
  llhttp_settings_init(&r->settings);
  r->settings.on_message_begin = on_message_begin;
  r->settings.on_status = on_status;
  r->settings.on_header_field = on_header_field;
  r->settings.on_header_field_complete = on_header_field_complete;
  r->settings.on_header_value = on_header_value;
  r->settings.on_header_value_complete = on_header_value_complete;
  r->settings.on_headers_complete = on_headers_complete;
  r->settings.on_body = on_body;
  r->settings.on_message_complete = on_message_complete;
  llhttp_init(&r->parser, HTTP_RESPONSE, &r->settings);
  r->parser.data = r;
  r->origin = origin;
  r->head = head;
  r->events = events;
  r->err = err;
  ebb_buf_init(&r->ctype);
  ebb_buf_init(&r->body);
}

static void reader_free(reader *r) {
  ebb_buf_free(&r->ctype);
  ebb_buf_free(&r->body);
}

/* Reads and parses until the response is complete (r->done), the event
 * callback stopped (r->stopped), or an error, which is returned. */
static int read_response(int fd, reader *r, uint64_t deadline) {
  char buf[16384];
  int got_any = 0;
  for (;;) {
    ssize_t n = recv_some(fd, buf, sizeof buf, deadline);
    if (n == IO_TIMEOUT)
      return ebb_error_set(r->err, EBB_ETIMEOUT, "%s did not answer within %d ms", r->origin,
                           r->timeout_ms);
    if (n < 0) {
      if (!got_any)
        return ebb_error_set(r->err, EBB_EUNAVAIL,
                             "%s closed the connection without answering (%s)", r->origin,
                             strerror(errno));
      return ebb_error_set(r->err, EBB_EUNAVAIL, "the connection to %s broke: %s", r->origin,
                           strerror(errno));
    }
    if (n == 0) {
      if (!got_any)
        return ebb_error_set(r->err, EBB_EUNAVAIL, "%s closed the connection without answering",
                             r->origin);
      llhttp_finish(&r->parser);
      if (r->failed) return r->failed;
      if (r->done || r->stopped) return 0;
      if (r->events && r->status == 200)
        return ebb_error_set(r->err, EBB_EUNAVAIL, "%s closed the event stream mid-way", r->origin);
      return ebb_error_set(r->err, EBB_EBADREQ, "the response from %s was cut short", r->origin);
    }
    got_any = 1;
    llhttp_errno_t e = llhttp_execute(&r->parser, buf, (size_t)n);
    if (r->failed) return r->failed;
    if (r->done || r->stopped) return 0;
    if (e != HPE_OK)
      return ebb_error_set(r->err, EBB_EBADREQ, "malformed response from %s: %s", r->origin,
                           llhttp_get_error_reason(&r->parser));
  }
}

/* Connects, sends the request in b and reads the response into r. */
static int exchange(const ebb_url *u, const char *origin, ebb_buf *b, reader *r,
                    uint64_t connect_deadline, uint64_t deadline, ebb_error *err) {
  int fd = -1;
  int rc = connect_url(u, origin, connect_deadline, &fd, err);
  if (rc != 0) return rc;
  int sent = send_all(fd, b->data, b->len, deadline);
  if (sent == IO_TIMEOUT)
    rc = ebb_error_set(err, EBB_ETIMEOUT, "%s did not take the request within %d ms", origin,
                       r->timeout_ms);
  else if (sent == IO_ERROR)
    rc = ebb_error_set(err, EBB_EUNAVAIL, "the connection to %s broke: %s", origin,
                       strerror(errno));
  else rc = read_response(fd, r, deadline);
  close(fd);
  return rc;
}

/* ---------------------------------------------------------------- public */

void ebb_http_response_free(ebb_http_response *r) {
  if (r == NULL) return;
  free(r->content_type);
  free(r->body);
  memset(r, 0, sizeof *r);
}

int ebb_http_request_send(const ebb_url *u, const char *method, const char *path,
                          const char *token, const char *body, size_t body_len, int timeout_ms,
                          ebb_http_response *res, ebb_error *err) {
  memset(res, 0, sizeof *res);
  char origin[300];
  url_origin(u, origin, sizeof origin);
  ebb_buf b = EBB_BUF_INIT;
  int rc = build_request(&b, u, method, path, "application/json", token, NULL, body, body_len, err);
  if (rc != 0) {
    ebb_buf_free(&b);
    return rc;
  }
  uint64_t deadline = deadline_after(timeout_ms);
  reader r;
  reader_init(&r, origin, strcmp(method, "HEAD") == 0, NULL, err);
  r.timeout_ms = timeout_ms;
  rc = exchange(u, origin, &b, &r, deadline, deadline, err);
  ebb_buf_free(&b);
  if (rc == 0) {
    res->status = r.status;
    if (r.has_ctype && (res->content_type = ebb_buf_take(&r.ctype, NULL)) == NULL)
      rc = ebb_error_set(err, EBB_ENOMEM, "out of memory");
    if (rc == 0 && (res->body = ebb_buf_take(&r.body, &res->body_len)) == NULL)
      rc = ebb_error_set(err, EBB_ENOMEM, "out of memory");
    if (rc != 0) ebb_http_response_free(res);
  }
  reader_free(&r);
  return rc;
}

int ebb_http_sse(const ebb_url *u, const char *path, const char *token, const char *last_event_id,
                 int (*on_event)(void *ud, const char *id, const char *event, const char *data),
                 void *ud, int *status, char **error_body, ebb_error *err) {
  *status = 0;
  *error_body = NULL;
  char origin[300];
  url_origin(u, origin, sizeof origin);
  ebb_buf b = EBB_BUF_INIT;
  int rc = build_request(&b, u, "GET", path, "text/event-stream", token, last_event_id, NULL, 0,
                         err);
  if (rc != 0) {
    ebb_buf_free(&b);
    return rc;
  }
  sse events;
  memset(&events, 0, sizeof events);
  events.on_event = on_event;
  events.ud = ud;
  reader r;
  reader_init(&r, origin, 0, &events, err);
  rc = exchange(u, origin, &b, &r, deadline_after(EBB_HTTP_SSE_CONNECT_TIMEOUT_MS), 0, err);
  ebb_buf_free(&b);
  if (rc == 0) {
    *status = r.status;
    if (r.status != 200 && (*error_body = ebb_buf_take(&r.body, NULL)) == NULL) {
      *status = 0;
      rc = ebb_error_set(err, EBB_ENOMEM, "out of memory");
    }
  }
  sse_free(&events);
  reader_free(&r);
  return rc;
}
