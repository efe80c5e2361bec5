/*
 * request.h: how the daemon reads a request's path and query string:
 * percent-decoding, the path's segments and the route they name, query
 * parameters (only the names a route takes), integer and boolean
 * parameters, and a projection query's parameters as JSON arguments.
 * Pure functions with no I/O and no daemon state, so that the HTTP fuzz
 * target (fuzz/fuzz_http.c) runs the same code as `ebb serve`.
 */
#ifndef EBB_REQUEST_H
#define EBB_REQUEST_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "error.h"
#include "store.h"

#define EBB_MAX_SEGMENTS 5
#define EBB_MAX_PARAMS 16

/* A path's decoded segments. */
typedef struct ebb_path_parts {
  int n;
  char seg[EBB_MAX_SEGMENTS][EBB_MAX_NAME + 2];
} ebb_path_parts;

/* A query string's decoded parameters, in order; owned (ebb__params_free). */
typedef struct ebb_params {
  int n;
  char *key[EBB_MAX_PARAMS], *val[EBB_MAX_PARAMS];
} ebb_params;

/* Percent-decodes [s, s+n) into out (NUL-terminated); plus_space for
 * queries. -1 on a bad escape or an encoded NUL, -2 when out is too small. */
int ebb__pct_decode(const char *s, size_t n, int plus_space, char *out, size_t outlen);

/* Splits "/a/b%2Fc" into decoded segments. 0, or a code with err filled. */
int ebb__split_path(const char *path, ebb_path_parts *pp, ebb_error *err);

/* The route (ROUTE_*, daemon.h) the segments name, for a POST (post) or
 * another method, and in *allow the methods of that path for a 405 (NULL,
 * with ROUTE_OTHER, when no route has that path). */
int ebb__route_of(const ebb_path_parts *pp, int post, const char **allow);

/* Parses a query string, allowing only the names in `allowed`
 * (space-separated; NULL: any). q always needs ebb__params_free, also
 * after a failure. */
int ebb__parse_query(const char *query, const char *allowed, ebb_params *q, ebb_error *err);
void ebb__params_free(ebb_params *q);

/* The value of the last parameter key, or NULL. */
const char *ebb__param(const ebb_params *q, const char *key);
/* *out from parameter key if present: an integer from min to max, or a boolean. */
int ebb__param_int(const ebb_params *q, const char *key, int64_t min, int64_t max, int64_t *out,
                   ebb_error *err);
int ebb__param_bool(const ebb_params *q, const char *key, int *out, ebb_error *err);

/* The parameters as a JSON object of arguments, numbers as numbers; "after"
 * is taken out into *after. */
int ebb__query_args(const ebb_params *q, ebb_buf *out, int64_t *after, ebb_error *err);

#endif
