/*
 * http_client.h: the CLI's blocking HTTP client, for --url mode
 * (`ebb send ... --url http://127.0.0.1:7070` goes through a running daemon
 * instead of opening its data directory). It is a thin layer over libcurl:
 * http:// and https:// (a daemon behind a TLS-terminating proxy such as
 * nginx; the daemon itself speaks plain HTTP), the system's CA certificates
 * or a CA file of the caller's, proxies from the usual environment variables
 * as curl takes them, and no redirects followed.
 *
 * One transfer per call, blocking: the CLI is a one-shot program. Nothing is
 * unbounded: a response body over EBB_HTTP_MAX_BODY, headers over
 * EBB_HTTP_MAX_HEADERS, or one server-sent event over EBB_SSE_MAX_EVENT is
 * refused with EBB_ETOOLARGE.
 */
#ifndef EBB_HTTP_CLIENT_H
#define EBB_HTTP_CLIENT_H

#include <stddef.h>

#include "buf.h"
#include "error.h"
#include "sse_reader.h"

#define EBB_HTTP_MAX_BODY ((size_t)256 << 20)
#define EBB_HTTP_MAX_HEADERS ((size_t)64 << 10)
/* ebb_http_sse has no overall timeout, only this one for connecting (the
 * TLS handshake included). */
#define EBB_HTTP_SSE_CONNECT_TIMEOUT_MS 10000

typedef struct ebb_url {
  char origin[300];  /* "scheme://host[:port]", the way messages name the daemon */
  char base[1300];   /* origin and base path (no trailing slash): paths go after it */
} ebb_url;

/* Parses "http[s]://host[:port][/base]" (host: a name, IPv4, or [IPv6]).
 * Returns 0, or EBB_EBADREQ with a message for anything else: another
 * scheme, user info, a query or fragment, a bad port, a path that is not
 * percent-encoded. */
int ebb_url_parse(const char *text, ebb_url *out, ebb_error *err);

/* Where requests go and how they prove who sends them. The strings are
 * borrowed: they must outlive the calls. */
typedef struct ebb_http_target {
  ebb_url url;
  const char *token;   /* NULL/"": none; else sent as Authorization: Bearer <token> */
  const char *cacert;  /* NULL/"": the system's CAs; else a PEM file of CAs for https */
} ebb_http_target;

typedef struct ebb_http_response {
  int status;
  char *content_type;   /* the Content-Type header, or NULL */
  char *body;           /* NUL-terminated (the NUL not counted); "" when empty */
  size_t body_len;
} ebb_http_response;

/* Frees the fields and zeroes r. NULL-safe, harmless twice. */
void ebb_http_response_free(ebb_http_response *r);

/* Sends one request and reads the whole answer.
 *   method   "GET", "POST", ... (an HTTP token)
 *   path     starts with '/', query string included, already percent-encoded
 *            (see ebb_url_encode); the URL's base path goes before it
 *   body     NULL for none, else body_len bytes sent as application/json
 *   timeout_ms  for everything, connecting included; <= 0: no limit
 * Returns 0 with *res filled for ANY HTTP status (the caller maps statuses;
 * free it with ebb_http_response_free). Otherwise *res is empty and:
 *   EBB_EUNAVAIL  "cannot connect to <origin>: <curl's reason>" (refused,
 *                 unknown host, no connection within the timeout), "TLS
 *                 failure with <origin>: <curl's reason>" (an untrusted or
 *                 wrong certificate, a failed handshake), or the connection
 *                 closed or broke before the answer was complete
 *   EBB_ETIMEOUT  connected, but the answer did not arrive in time
 *   EBB_EBADREQ   a malformed or cut-short response, a CA file that cannot
 *                 be read, or a method, path or token that cannot go into a
 *                 request
 *   EBB_ETOOLARGE see above
 *   EBB_ENOMEM */
int ebb_http_request_send(const ebb_http_target *t, const char *method, const char *path,
                          const char *body, size_t body_len, int timeout_ms,
                          ebb_http_response *res, ebb_error *err);

/* Follows a Server-Sent Events stream (for `ebb events --follow`): sends
 * GET path with Accept: text/event-stream (and Last-Event-ID when
 * last_event_id is not NULL), and feeds the body to an ebb_sse_reader that
 * calls on_event for every complete event (see sse_reader.h).
 *
 * Returns on_event's non-zero answer (positive) as soon as it gives one, or
 * 0 with *status = 200 when the server ends the stream cleanly. A non-200
 * answer returns 0 with *status set and its body in *error_body (malloc'd,
 * caller frees) so that the caller can print the server's error; on_event
 * is then never called. Errors are those of ebb_http_request_send, plus
 * EBB_EUNAVAIL when the stream breaks mid-way and EBB_EBADREQ for a 200
 * answer that is not text/event-stream. There is no overall timeout (it
 * follows forever), only EBB_HTTP_SSE_CONNECT_TIMEOUT_MS for connecting.
 * *status is 0 and *error_body NULL whenever they are not set as above. */
int ebb_http_sse(const ebb_http_target *t, const char *path, const char *last_event_id,
                 ebb_sse_on_event on_event, void *ud, int *status, char **error_body,
                 ebb_error *err);

/* Appends s[0..n) to b percent-encoded for a path segment or a query value:
 * A-Z a-z 0-9 - . _ ~ are kept, every other byte becomes %XX. Returns 0, or
 * -1 when out of memory (sticky in b, see buf.h). */
int ebb_url_encode(ebb_buf *b, const char *s, size_t n);

#endif
