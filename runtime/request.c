/*
 * request.c: a request's path and query string as the daemon reads them
 * (see request.h). Pure: no I/O, no daemon state.
 */
#include "request.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"

static int hexval(int ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
  return -1;
}

/* Percent-decodes [s, s+n) into out (NUL-terminated); plus_space for queries.
 * -1 on a bad escape or an encoded NUL. */
int ebb__pct_decode(const char *s, size_t n, int plus_space, char *out, size_t outlen) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    int ch = (unsigned char)s[i];
    if (ch == '%') {
      if (i + 2 >= n) return -1;
      int hi = hexval(s[i + 1]), lo = hexval(s[i + 2]);
      if (hi < 0 || lo < 0) return -1;
      ch = hi * 16 + lo;
      if (ch == 0) return -1;
      i += 2;
    } else if (ch == '+' && plus_space) {
      ch = ' ';
    }
    if (o + 1 >= outlen) return -2;
    out[o++] = (char)ch;
  }
  out[o] = '\0';
  return 0;
}

static int utf8(const char *s) {
  for (size_t n = strlen(s), i = 0, k; i < n; i += k)
    if ((k = ebb_utf8_seq((const unsigned char *)s + i, n - i)) == 0) return 0;
  return 1;
}

/* Splits "/a/b%2Fc" into decoded segments. A message in err on failure. */
int ebb__split_path(const char *path, ebb_path_parts *pp, ebb_error *err) {
  pp->n = 0;
  if (path[0] != '/') return ebb_error_set(err, EBB_EBADREQ, "the path must start with /");
  const char *p = path + 1;
  while (*p) {
    const char *slash = strchr(p, '/');
    size_t n = slash ? (size_t)(slash - p) : strlen(p);
    if (pp->n == EBB_MAX_SEGMENTS) return ebb_error_set(err, EBB_ENOTFOUND, "no such route");
    int rc = ebb__pct_decode(p, n, 0, pp->seg[pp->n], sizeof pp->seg[pp->n]);
    if (rc == -1)
      return ebb_error_set(err, EBB_EBADREQ,
                           "bad percent-encoding in the path: %%XX with two hex digits, not %%00");
    if (rc == -2)
      return ebb_error_set(err, EBB_EBADREQ, "a path segment is longer than %d bytes",
                           EBB_MAX_NAME);
    pp->n++;
    if (!slash) break;
    p = slash + 1;
    if (*p == '\0') break; /* a trailing slash is forgiven */
  }
  return 0;
}

int ebb__route_of(const ebb_path_parts *pp, int post, const char **allow) {
  const char *s0 = pp->n > 0 ? pp->seg[0] : "";
  int n = pp->n;
  int route = ROUTE_OTHER;
  *allow = NULL;
  if (n == 1 && !strcmp(s0, "commands")) route = ROUTE_COMMANDS, *allow = "POST";
  else if (n == 2 && !strcmp(s0, "streams")) route = post ? ROUTE_APPEND : ROUTE_STREAM, *allow = "GET, POST";
  else if (n == 1 && !strcmp(s0, "streams")) route = ROUTE_STREAMS, *allow = "GET";
  else if (n == 1 && !strcmp(s0, "modules")) route = ROUTE_MODULES, *allow = "GET";
  else if (n == 0 || ((n == 1 || n == 2) && !strcmp(s0, "console")))
    route = ROUTE_CONSOLE, *allow = "GET";
  else if (n == 1 && !strcmp(s0, "events")) route = ROUTE_EVENTS, *allow = "GET";
  else if (n == 1 && !strcmp(s0, "subscribe")) route = ROUTE_SUBSCRIBE, *allow = "GET";
  else if (n == 3 && !strcmp(s0, "aggregates")) route = ROUTE_AGGREGATE, *allow = "GET";
  else if (n == 1 && !strcmp(s0, "health")) route = ROUTE_HEALTH, *allow = "GET";
  else if (n == 1 && !strcmp(s0, "metrics")) route = ROUTE_METRICS, *allow = "GET";
  else if ((n == 1 || n == 2) && !strcmp(s0, "projections")) route = ROUTE_PROJECTIONS, *allow = "GET";
  else if (n == 3 && !strcmp(s0, "projections"))
    route = post ? ROUTE_PROJECTION_CONTROL : ROUTE_QUERY, *allow = "GET, POST";
  else if ((n == 1 || n == 2) && !strcmp(s0, "reactors")) route = ROUTE_REACTORS, *allow = "GET";
  else if (n == 3 && !strcmp(s0, "reactors"))
    route = ROUTE_REACTORS, *allow = strcmp(pp->seg[2], "schedules") == 0 ? "GET" : "POST";
  return route;
}

void ebb__params_free(ebb_params *q) {
  for (int i = 0; i < q->n; i++) {
    free(q->key[i]);
    free(q->val[i]);
  }
  q->n = 0;
}

/* Parses a query string, allowing only the names in `allowed` (space-separated; NULL: any). */
int ebb__parse_query(const char *query, const char *allowed, ebb_params *q, ebb_error *err) {
  q->n = 0;
  for (const char *p = query; *p;) {
    const char *amp = strchr(p, '&');
    size_t n = amp ? (size_t)(amp - p) : strlen(p);
    if (n) {
      const char *eq = memchr(p, '=', n);
      size_t kl = eq ? (size_t)(eq - p) : n;
      size_t vl = eq ? n - kl - 1 : 0;
      if (q->n == EBB_MAX_PARAMS) return ebb_error_set(err, EBB_EBADREQ, "too many query parameters");
      char *k = malloc(kl + 1), *v = malloc(vl + 1);
      q->key[q->n] = k;
      q->val[q->n] = v;
      q->n++;
      if (!k || !v) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
      if (ebb__pct_decode(p, kl, 1, k, kl + 1) || (eq && ebb__pct_decode(eq + 1, vl, 1, v, vl + 1)))
        return ebb_error_set(err, EBB_EBADREQ, "bad percent-encoding in the query string");
      if (!eq) v[0] = '\0';
      size_t klen = strlen(k);
      const char *a = allowed;
      int ok = allowed == NULL;
      while (a && *a) {
        const char *sp = strchr(a, ' ');
        size_t al = sp ? (size_t)(sp - a) : strlen(a);
        if (al == klen && memcmp(a, k, al) == 0) ok = 1;
        a = sp ? sp + 1 : NULL;
      }
      if (!ok && allowed)
        return ebb_error_set(err, EBB_EBADREQ, "unknown query parameter \"%.64s\"%s%s%s", k,
                             allowed[0] ? " (this route takes: " : " (this route takes none",
                             allowed, ")");
    }
    if (!amp) break;
    p = amp + 1;
  }
  return 0;
}

const char *ebb__param(const ebb_params *q, const char *key) {
  for (int i = q->n - 1; i >= 0; i--)
    if (strcmp(q->key[i], key) == 0) return q->val[i];
  return NULL;
}

int ebb__param_int(const ebb_params *q, const char *key, int64_t min, int64_t max, int64_t *out,
                     ebb_error *err) {
  const char *v = ebb__param(q, key);
  if (v == NULL) return 0;
  char *end;
  errno = 0;
  long long x = strtoll(v, &end, 10);
  if (errno || end == v || *end || x < min || x > max)
    return ebb_error_set(err, EBB_EBADREQ, "%s must be an integer from %lld to %lld, not \"%.64s\"",
                         key, (long long)min, (long long)max, v);
  *out = x;
  return 0;
}

int ebb__param_bool(const ebb_params *q, const char *key, int *out, ebb_error *err) {
  const char *v = ebb__param(q, key);
  if (v == NULL) return 0;
  if (!strcmp(v, "true") || !strcmp(v, "1") || !strcmp(v, "")) *out = 1;
  else if (!strcmp(v, "false") || !strcmp(v, "0")) *out = 0;
  else return ebb_error_set(err, EBB_EBADREQ, "%s must be true or false, not \"%.64s\"", key, v);
  return 0;
}

/* The query string as a JSON object of arguments: numbers as numbers. */
int ebb__query_args(const ebb_params *q, ebb_buf *out, int64_t *after, ebb_error *err) {
  /* JSON strings are UTF-8: anything else would reach the query as invalid JSON. */
  for (int i = 0; i < q->n; i++)
    if (!utf8(q->key[i]) || !utf8(q->val[i]))
      return ebb_error_set(err, EBB_EBADREQ,
                           "query argument %d is not valid UTF-8 (once percent-decoded)", i + 1);
  ebb_buf_putc(out, '{');
  int first = 1;
  for (int i = 0; i < q->n; i++) {
    const char *k = q->key[i], *v = q->val[i];
    if (strcmp(k, "after") == 0) {
      char *end;
      errno = 0;
      long long x = strtoll(v, &end, 10);
      if (errno || end == v || *end || x < 0)
        return ebb_error_set(err, EBB_EBADREQ, "after must be a position (0 or more), not \"%.64s\"", v);
      *after = x;
      continue;
    }
    if (!first) ebb_buf_putc(out, ',');
    first = 0;
    ebb_buf_json_string(out, k, strlen(k));
    ebb_buf_putc(out, ':');
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (*v && !errno && *end == '\0' && (v[0] != '0' || v[1] == '\0') && v[0] != '+') {
      ebb_buf_printf(out, "%lld", x);
      continue;
    }
    errno = 0;
    double f = strtod(v, &end);
    if (*v && !errno && *end == '\0' && f == f && f - f == 0 && v[0] != '+' && v[0] != '.' &&
        strspn(v, "-0123456789.eE") == strlen(v)) {
      /* %.17g of 2.0 is "2": keep a float a float in JSON. */
      char num[40];
      snprintf(num, sizeof num, "%.17g", f);
      ebb_buf_puts(out, num);
      if (!strpbrk(num, ".eEni")) ebb_buf_puts(out, ".0");
      continue;
    }
    ebb_buf_json_string(out, v, strlen(v));
  }
  ebb_buf_putc(out, '}');
  return 0;
}
