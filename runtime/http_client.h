/*
 * http_client.h: a small blocking HTTP/1.1 client, for the CLI's --url mode
 * (`ebb send ... --url http://127.0.0.1:7070` goes through a running daemon
 * instead of opening its data directory).
 *
 * One request per connection (Connection: close), plain http only, blocking
 * sockets: the CLI is a one-shot program and the daemon is usually on the
 * same machine. Responses are parsed with llhttp; bodies may come with a
 * Content-Length, chunked, or delimited by the close of the connection.
 * Nothing is unbounded: a response body over EBB_HTTP_MAX_BODY, headers over
 * EBB_HTTP_MAX_HEADERS, or one server-sent event over EBB_HTTP_MAX_EVENT is
 * refused with EBB_ETOOLARGE.
 *
 * Writes use MSG_NOSIGNAL, so a daemon that goes away never kills the CLI
 * with SIGPIPE.
 */
#ifndef EBB_HTTP_CLIENT_H
#define EBB_HTTP_CLIENT_H

#include <stddef.h>

#include "buf.h"
#include "error.h"

#define EBB_HTTP_MAX_BODY ((size_t)256 << 20)
#define EBB_HTTP_MAX_HEADERS ((size_t)64 << 10)
#define EBB_HTTP_MAX_EVENT ((size_t)64 << 20)
/* ebb_http_sse has no overall timeout, only this one for connecting. */
#define EBB_HTTP_SSE_CONNECT_TIMEOUT_MS 10000

typedef struct ebb_url {
  char host[256];       /* a name or an address; an IPv6 address without its brackets */
  int port;             /* 1..65535; 80 when the URL names none */
  char base_path[256];  /* "" or "/prefix" (no trailing slash), put before every path */
} ebb_url;

/* Parses "http://host[:port][/base]" (host: a name, IPv4, or [IPv6]).
 * Returns 0, or EBB_EBADREQ with a message for anything else: https (not
 * supported), user info, a query or fragment, a bad port. */
int ebb_url_parse(const char *text, ebb_url *out, ebb_error *err);

typedef struct ebb_http_response {
  int status;
  char *content_type;   /* the Content-Type header, or NULL */
  char *body;           /* NUL-terminated (the NUL not counted); "" when empty */
  size_t body_len;
} ebb_http_response;

/* Frees the fields and zeroes r. NULL-safe, harmless twice. */
void ebb_http_response_free(ebb_http_response *r);

/* Sends one request on a fresh connection and reads the whole answer.
 *   method   "GET", "POST", ... (an HTTP token)
 *   path     starts with '/', query string included, already percent-encoded
 *            (see ebb_url_encode); the URL's base_path goes before it
 *   token    NULL, or a bearer token sent as Authorization: Bearer <token>
 *   body     NULL for none, else body_len bytes sent as application/json
 *   timeout_ms  for everything, connecting included; <= 0: no limit
 * Returns 0 with *res filled for ANY HTTP status (the caller maps statuses;
 * free it with ebb_http_response_free). Otherwise *res is empty and:
 *   EBB_EUNAVAIL  "cannot connect to http://host:port: <reason>" (refused,
 *                 unknown host, no answer within the timeout while
 *                 connecting), or the connection closed before any answer
 *   EBB_ETIMEOUT  connected, but the answer did not arrive in time
 *   EBB_EBADREQ   a malformed or cut-short response, or a method, path or
 *                 token that cannot go into a request
 *   EBB_ETOOLARGE see above
 *   EBB_ENOMEM */
int ebb_http_request_send(const ebb_url *u, const char *method, const char *path,
                          const char *token, const char *body, size_t body_len, int timeout_ms,
                          ebb_http_response *res, ebb_error *err);

/* Follows a Server-Sent Events stream (for `ebb events --follow`): sends
 * GET path with Accept: text/event-stream (and Last-Event-ID when
 * last_event_id is not NULL), then calls
 *
 *   on_event(ud, id, event, data)
 *
 * for every complete event: id and event are the event's own "id:" and
 * "event:" fields or NULL, data its "data:" lines joined with "\n". The
 * strings are valid during the call only. Comment lines (":heartbeat") and
 * blocks without data are skipped; a last event not ended by a blank line is
 * dropped, as the SSE standard says.
 *
 * Returns 0 with *status = 200 once on_event returns non-zero or the server
 * ends the stream cleanly. A non-200 answer returns 0 with *status set and
 * its body in *error_body (malloc'd, caller frees) so that the caller can
 * print the server's error; on_event is then never called. Errors are those
 * of ebb_http_request_send, plus EBB_EUNAVAIL when the connection breaks
 * mid-stream and EBB_EBADREQ for a 200 answer that is not
 * text/event-stream. There is no overall timeout (it follows forever), only
 * EBB_HTTP_SSE_CONNECT_TIMEOUT_MS for connecting. *status is 0 and
 * *error_body NULL whenever they are not set as above. */
int ebb_http_sse(const ebb_url *u, const char *path, const char *token, const char *last_event_id,
                 int (*on_event)(void *ud, const char *id, const char *event, const char *data),
                 void *ud, int *status, char **error_body, ebb_error *err);

/* Appends s[0..n) to b percent-encoded for a path segment or a query value:
 * A-Z a-z 0-9 - . _ ~ are kept, every other byte becomes %XX. Returns 0, or
 * -1 when out of memory (sticky in b, see buf.h). */
int ebb_url_encode(ebb_buf *b, const char *s, size_t n);

#endif
