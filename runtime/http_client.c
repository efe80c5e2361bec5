/*
 * http_client.c: the CLI's HTTP client over libcurl (see http_client.h).
 *
 * libcurl does the transport: resolving, connecting, TLS and certificate
 * checks, proxies, HTTP/1.1 or HTTP/2 framing. This file owns what ebb
 * needs around it: URLs checked before anything is sent, requests that can
 * carry nothing but what the caller meant (no header or line injected
 * through a token or a path), bounded answers, an event stream handed to
 * sse_reader.c as it arrives, and curl's failures turned into ebb's error
 * codes with messages that name the daemon.
 */
#include "http_client.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---------------------------------------------------------------- libcurl */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc = CURLE_FAILED_INIT;

/* curl_global_init is not safe beside other threads' curl calls on every
 * platform, so it runs once, first. Its resources stay for the process's
 * life, as curl's documentation allows for a program that uses curl until
 * it exits. */
static void curl_init_once(void) {
  curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static int curl_ready(ebb_error *err) {
  pthread_once(&curl_once, curl_init_once);
  if (curl_init_rc != CURLE_OK)
    return ebb_error_set(err, EBB_ENOMEM, "cannot start libcurl: %s",
                         curl_easy_strerror(curl_init_rc));
  return 0;
}

/* ---------------------------------------------------------------- URLs */

/* Visible ASCII (and spaces when allowed): nothing that could end a header
 * line or the request line early. */
static int is_visible(const char *s, int spaces) {
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c < 0x20 || c > 0x7e || (c == ' ' && !spaces)) return 0;
  }
  return 1;
}

static int has_part(CURLU *h, CURLUPart part) {
  char *v = NULL;
  CURLUcode rc = curl_url_get(h, part, &v, 0);
  curl_free(v);
  return rc == CURLUE_OK;
}

/* The URL's parts after curl has parsed it into h. */
static int url_from_parts(CURLU *h, const char *text, ebb_url *out, ebb_error *err) {
  char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL;
  int rc = 0;
  if (has_part(h, CURLUPART_USER) || has_part(h, CURLUPART_PASSWORD) ||
      has_part(h, CURLUPART_OPTIONS))
    rc = ebb_error_set(err, EBB_EBADREQ,
                       "invalid URL %.300s: user info is not supported (give a token with "
                       "--token or EBB_TOKEN)",
                       text);
  else if (has_part(h, CURLUPART_QUERY) || has_part(h, CURLUPART_FRAGMENT))
    rc = ebb_error_set(err, EBB_EBADREQ,
                       "invalid URL %.300s: a query or fragment is not allowed here", text);
  else if (curl_url_get(h, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
           curl_url_get(h, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
           curl_url_get(h, CURLUPART_PATH, &path, 0) != CURLUE_OK)
    rc = ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: expected http://host:port", text);
  else if (curl_url_get(h, CURLUPART_PORT, &port, 0) == CURLUE_OK && atoi(port) < 1)
    rc = ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: bad port (expected 1 to 65535)",
                       text);
  if (rc == 0) {
    size_t plen = strlen(path);
    while (plen > 0 && path[plen - 1] == '/') plen--;
    int n = snprintf(out->origin, sizeof out->origin, "%s://%s%s%s", scheme, host,
                     port ? ":" : "", port ? port : "");
    int m = n < 0 || (size_t)n >= sizeof out->origin
                ? -1
                : snprintf(out->base, sizeof out->base, "%s%.*s", out->origin, (int)plen, path);
    if (m < 0 || (size_t)m >= sizeof out->base)
      rc = ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: too long", text);
  }
  curl_free(scheme);
  curl_free(host);
  curl_free(port);
  curl_free(path);
  return rc;
}

int ebb_url_parse(const char *text, ebb_url *out, ebb_error *err) {
  memset(out, 0, sizeof *out);
  /* curl knows many schemes and guesses some; ebb talks HTTP only. */
  if (strncasecmp(text, "http://", 7) != 0 && strncasecmp(text, "https://", 8) != 0)
    return ebb_error_set(err, EBB_EBADREQ,
                         "invalid URL %.300s: expected http://host:port or https://host[:port]",
                         text);
  if (!is_visible(text, 0))
    return ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: it must be percent-encoded",
                         text);
  int rc = curl_ready(err);
  if (rc != 0) return rc;
  CURLU *h = curl_url();
  if (h == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  CURLUcode uc = curl_url_set(h, CURLUPART_URL, text, 0);
  if (uc == CURLUE_OUT_OF_MEMORY) rc = ebb_error_set(err, EBB_ENOMEM, "out of memory");
  else if (uc != CURLUE_OK)
    rc = ebb_error_set(err, EBB_EBADREQ, "invalid URL %.300s: %s", text, curl_url_strerror(uc));
  else rc = url_from_parts(h, text, out, err);
  curl_url_cleanup(h);
  if (rc != 0) memset(out, 0, sizeof *out);
  return rc;
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

/* ---------------------------------------------------------------- one transfer */

typedef struct transfer {
  CURL *h;
  const ebb_url *url;
  ebb_error *err;
  char errbuf[CURL_ERROR_SIZE];
  struct curl_slist *headers;
  int timeout_ms;        /* for messages only */
  int failed;            /* an EBB_E* code set by a callback, with err filled */
  size_t header_bytes;
  ebb_buf body;
  ebb_sse_reader *sse;   /* NULL, or where a 200 body goes instead of body */
  int checked;           /* sse: the status and type of the answer were looked at */
  int streaming;         /* sse: reading a 200 event stream */
  int stopped;           /* sse: on_event's non-zero answer */
} transfer;

static int is_token(const char *s) {
  if (*s == '\0') return 0;
  for (; *s; s++)
    if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') ||
          strchr("!#$%&'*+-.^_`|~", *s)))
      return 0;
  return 1;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud) {
  transfer *x = ud;
  x->header_bytes += size * n;
  if (x->header_bytes <= EBB_HTTP_MAX_HEADERS) return size * n;
  x->failed = ebb_error_set(x->err, EBB_ETOOLARGE, "the response from %s has over %zu bytes of "
                            "headers", x->url->origin, EBB_HTTP_MAX_HEADERS);
  return 0;
}

static int is_event_stream(const char *ct) {
  if (ct == NULL || strncasecmp(ct, "text/event-stream", 17) != 0) return 0;
  return ct[17] == '\0' || ct[17] == ';' || ct[17] == ' ' || ct[17] == '\t';
}

/* For an event stream: looks at the answer's status and type once its
 * headers are in. 0, or an error code with err set. */
static int check_stream(transfer *x) {
  if (x->checked) return 0;
  x->checked = 1;
  long status = 0;
  char *ct = NULL;
  curl_easy_getinfo(x->h, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(x->h, CURLINFO_CONTENT_TYPE, &ct);
  if (status != 200) return 0;
  if (!is_event_stream(ct))
    return ebb_error_set(x->err, EBB_EBADREQ, "%s answered with %.100s, not an event stream",
                         x->url->origin, ct ? ct : "no Content-Type");
  x->streaming = 1;
  return 0;
}

/* Returning less than it was given makes curl abort with CURLE_WRITE_ERROR;
 * why is in x. */
static size_t on_body(char *p, size_t size, size_t n, void *ud) {
  transfer *x = ud;
  size_t len = size * n;
  if (x->sse) {
    int rc = check_stream(x);
    if (rc != 0) {
      x->failed = rc;
      return 0;
    }
  }
  if (x->streaming) {
    int rc = ebb_sse_reader_feed(x->sse, p, len, x->err);
    if (rc > 0) x->stopped = rc;
    else if (rc < 0) x->failed = rc;
    return rc ? 0 : len;
  }
  if (x->body.len + len > EBB_HTTP_MAX_BODY) {
    x->failed = ebb_error_set(x->err, EBB_ETOOLARGE, "the response from %s is over %zu bytes",
                              x->url->origin, EBB_HTTP_MAX_BODY);
    return 0;
  }
  if (ebb_buf_append(&x->body, p, len) != 0) {
    x->failed = ebb_error_set(x->err, EBB_ENOMEM, "out of memory");
    return 0;
  }
  return len;
}

static int add_header(transfer *x, const char *fmt, const char *value) {
  char line[1200];
  int n = snprintf(line, sizeof line, fmt, value);
  if (n < 0 || (size_t)n >= sizeof line)
    return ebb_error_set(x->err, EBB_EBADREQ, "a request header is over %zu bytes", sizeof line);
  struct curl_slist *l = curl_slist_append(x->headers, line);
  if (l == NULL) return ebb_error_set(x->err, EBB_ENOMEM, "out of memory");
  x->headers = l;
  return 0;
}

#define SET(opt, val)                                                              \
  do {                                                                             \
    if (curl_easy_setopt(x->h, opt, val) != CURLE_OK)                              \
      return ebb_error_set(x->err, EBB_ENOMEM, "libcurl refused %s", #opt);     \
  } while (0)

/* Sets up x->h for one request, or returns EBB_EBADREQ for a part that
 * cannot go into one. */
static int prepare(transfer *x, const ebb_http_target *t, const char *method, const char *path,
                   const char *accept, const char *last_event_id, const char *body,
                   size_t body_len, int connect_timeout_ms, int timeout_ms) {
  const char *token = t->token && t->token[0] ? t->token : NULL;
  if (!is_token(method))
    return ebb_error_set(x->err, EBB_EBADREQ, "invalid HTTP method %.100s", method);
  if (path[0] != '/' || !is_visible(path, 0))
    return ebb_error_set(x->err, EBB_EBADREQ,
                         "invalid request path %.300s: it must start with '/' and be "
                         "percent-encoded",
                         path);
  if (token && !is_visible(token, 0))
    return ebb_error_set(x->err, EBB_EBADREQ, "invalid token: it must be visible ASCII characters");
  if (last_event_id && !is_visible(last_event_id, 1))
    return ebb_error_set(x->err, EBB_EBADREQ, "invalid last event id %.100s", last_event_id);

  ebb_buf full = EBB_BUF_INIT;
  ebb_buf_puts(&full, t->url.base);
  ebb_buf_puts(&full, path);
  const char *u = ebb_buf_cstr(&full);
  CURLcode rc = u ? curl_easy_setopt(x->h, CURLOPT_URL, u) : CURLE_OUT_OF_MEMORY;
  ebb_buf_free(&full); /* curl keeps its own copy of every string option */
  if (rc != CURLE_OK) return ebb_error_set(x->err, EBB_ENOMEM, "out of memory");

  SET(CURLOPT_ERRORBUFFER, x->errbuf);
  SET(CURLOPT_NOSIGNAL, 1L);
  SET(CURLOPT_PROTOCOLS_STR, "http,https");
  SET(CURLOPT_USERAGENT, "ebb");
  SET(CURLOPT_HEADERFUNCTION, on_header);
  SET(CURLOPT_HEADERDATA, x);
  SET(CURLOPT_WRITEFUNCTION, on_body);
  SET(CURLOPT_WRITEDATA, x);
  SET(CURLOPT_TCP_KEEPALIVE, 1L);
  if (t->cacert && t->cacert[0]) SET(CURLOPT_CAINFO, t->cacert);
  if (connect_timeout_ms > 0) SET(CURLOPT_CONNECTTIMEOUT_MS, (long)connect_timeout_ms);
  if (timeout_ms > 0) SET(CURLOPT_TIMEOUT_MS, (long)timeout_ms);

  int err = add_header(x, "Accept: %s", accept);
  if (err == 0 && token) err = add_header(x, "Authorization: Bearer %s", token);
  if (err == 0 && last_event_id) err = add_header(x, "Last-Event-ID: %s", last_event_id);
  /* No "Expect: 100-continue" round trip before a large body. */
  if (err == 0) err = add_header(x, "%s", "Expect:");
  int has_body = body != NULL || !strcmp(method, "POST") || !strcmp(method, "PUT") ||
                 !strcmp(method, "PATCH");
  /* A body-less POST (Content-Length: 0) goes without the form type curl
   * would otherwise put on it. */
  if (err == 0 && has_body)
    err = add_header(x, "%s", body ? "Content-Type: application/json" : "Content-Type:");
  if (err != 0) return err;
  SET(CURLOPT_HTTPHEADER, x->headers);

  if (!strcmp(method, "HEAD")) SET(CURLOPT_NOBODY, 1L);
  else if (has_body) {
    SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)(body ? body_len : 0));
    SET(CURLOPT_POSTFIELDS, body ? body : "");
  }
  if (strcmp(method, "GET") && strcmp(method, "POST") && strcmp(method, "HEAD"))
    SET(CURLOPT_CUSTOMREQUEST, method);
  return 0;
}
#undef SET

static int transfer_open(transfer *x, const ebb_url *url, ebb_error *err) {
  memset(x, 0, sizeof *x);
  x->url = url;
  x->err = err;
  ebb_buf_init(&x->body);
  int rc = curl_ready(err);
  if (rc != 0) return rc;
  x->h = curl_easy_init();
  if (x->h == NULL) return ebb_error_set(err, EBB_ENOMEM, "cannot start a libcurl transfer");
  return 0;
}

static void transfer_close(transfer *x) {
  if (x->h) curl_easy_cleanup(x->h);
  x->h = NULL;
  curl_slist_free_all(x->headers);
  x->headers = NULL;
  ebb_buf_free(&x->body);
}

static int is_tls_failure(CURLcode rc) {
  switch (rc) {
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_USE_SSL_FAILED:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ENGINE_INITFAILED: return 1;
    default: return 0;
  }
}

/* Runs the transfer. 0 once the answer is in (or on_event stopped the
 * stream), else an EBB_E* code with a message naming the daemon. */
static int perform(transfer *x) {
  x->errbuf[0] = '\0';
  CURLcode rc = curl_easy_perform(x->h);
  if (rc == CURLE_WRITE_ERROR && x->failed) return x->failed;
  if (rc == CURLE_WRITE_ERROR && x->stopped) return 0;
  if (rc == CURLE_OK) {
    if (x->sse) {
      int crc = check_stream(x); /* a 200 stream that ended before any byte */
      if (crc != 0) return crc;
    }
    return 0;
  }
  const char *why = x->errbuf[0] ? x->errbuf : curl_easy_strerror(rc);
  const char *o = x->url->origin;
  long status = 0;
  curl_off_t connected = 0;
  curl_easy_getinfo(x->h, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(x->h, CURLINFO_CONNECT_TIME_T, &connected);
  if (is_tls_failure(rc)) {
    int untrusted = rc == CURLE_PEER_FAILED_VERIFICATION;
    return ebb_error_set(x->err, EBB_EUNAVAIL, "TLS failure with %s: %s%s", o, why,
                         untrusted ? " (a private CA's certificate goes in --cacert FILE or "
                                     "EBB_CACERT)"
                                   : "");
  }
  switch (rc) {
    case CURLE_OUT_OF_MEMORY: return ebb_error_set(x->err, EBB_ENOMEM, "out of memory");
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
      return ebb_error_set(x->err, EBB_EUNAVAIL, "cannot connect to %s: %s", o, why);
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CRL_BADFILE:
      return ebb_error_set(x->err, EBB_EBADREQ, "cannot use the CA certificates for %s: %s", o,
                           why);
    case CURLE_OPERATION_TIMEDOUT:
      if (connected == 0)
        return ebb_error_set(x->err, EBB_EUNAVAIL, "cannot connect to %s: %s", o, why);
      return ebb_error_set(x->err, EBB_ETIMEOUT, "%s did not answer within %d ms", o,
                           x->timeout_ms);
    case CURLE_GOT_NOTHING:
      return ebb_error_set(x->err, EBB_EUNAVAIL, "%s closed the connection without answering",
                           o);
    case CURLE_PARTIAL_FILE:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_HTTP2_STREAM:
      if (x->streaming)
        return ebb_error_set(x->err, EBB_EUNAVAIL, "%s closed the event stream mid-way: %s", o,
                             why);
      if (status == 0)
        return ebb_error_set(x->err, EBB_EUNAVAIL,
                             "%s closed the connection without answering (%s)", o, why);
      return ebb_error_set(x->err, EBB_EBADREQ, "the response from %s was cut short: %s", o, why);
    case CURLE_WEIRD_SERVER_REPLY:
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_BAD_CONTENT_ENCODING:
    case CURLE_HTTP2:
      return ebb_error_set(x->err, EBB_EBADREQ, "malformed response from %s: %s", o, why);
    default: return ebb_error_set(x->err, EBB_EUNAVAIL, "request to %s failed: %s", o, why);
  }
}

/* ---------------------------------------------------------------- public */

void ebb_http_response_free(ebb_http_response *r) {
  if (r == NULL) return;
  free(r->content_type);
  free(r->body);
  memset(r, 0, sizeof *r);
}

int ebb_http_request_send(const ebb_http_target *t, const char *method, const char *path,
                          const char *body, size_t body_len, int timeout_ms,
                          ebb_http_response *res, ebb_error *err) {
  memset(res, 0, sizeof *res);
  transfer x;
  int rc = transfer_open(&x, &t->url, err);
  x.timeout_ms = timeout_ms;
  if (rc == 0)
    rc = prepare(&x, t, method, path, "application/json", NULL, body, body_len, timeout_ms,
                 timeout_ms);
  if (rc == 0) rc = perform(&x);
  if (rc == 0) {
    long status = 0;
    char *ct = NULL;
    curl_easy_getinfo(x.h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(x.h, CURLINFO_CONTENT_TYPE, &ct);
    res->status = (int)status;
    if (ct && (res->content_type = strdup(ct)) == NULL)
      rc = ebb_error_set(err, EBB_ENOMEM, "out of memory");
    if (rc == 0 && (res->body = ebb_buf_take(&x.body, &res->body_len)) == NULL)
      rc = ebb_error_set(err, EBB_ENOMEM, "out of memory");
    if (rc != 0) ebb_http_response_free(res);
  }
  transfer_close(&x);
  return rc;
}

int ebb_http_sse(const ebb_http_target *t, const char *path, const char *last_event_id,
                 ebb_sse_on_event on_event, void *ud, int *status, char **error_body,
                 ebb_error *err) {
  *status = 0;
  *error_body = NULL;
  ebb_sse_reader events;
  ebb_sse_reader_init(&events, on_event, ud);
  transfer x;
  int rc = transfer_open(&x, &t->url, err);
  x.sse = &events;
  if (rc == 0)
    rc = prepare(&x, t, "GET", path, "text/event-stream", last_event_id, NULL, 0,
                 EBB_HTTP_SSE_CONNECT_TIMEOUT_MS, 0);
  if (rc == 0) rc = perform(&x);
  if (rc == 0 && x.stopped) {
    *status = 200;
    rc = x.stopped;
  } else if (rc == 0) {
    long code = 0;
    curl_easy_getinfo(x.h, CURLINFO_RESPONSE_CODE, &code);
    *status = (int)code;
    if (code != 200 && (*error_body = ebb_buf_take(&x.body, NULL)) == NULL) {
      *status = 0;
      rc = ebb_error_set(err, EBB_ENOMEM, "out of memory");
    }
  }
  transfer_close(&x);
  ebb_sse_reader_free(&events);
  return rc;
}
