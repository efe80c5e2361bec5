/*
 * fuzz_http.c: the HTTP request path in-process, without sockets. The
 * input is what a client sends on one connection: its first byte picks how
 * the rest arrives (in reads of 1 to 255 bytes, or 0: at once), the rest
 * goes through llhttp and runtime/http.c (limits, pipelining, keep-alive,
 * chunked bodies) on a connection with no socket (ebb__http_conn_socketless),
 * and each complete request is read as the daemon reads it: path segments
 * and route (runtime/request.c), the query parameters each route takes,
 * names validated, a projection query's arguments as JSON, and command and
 * append bodies decoded as the daemon decodes them. Every request must be
 * handed over well-formed and answered; memory must all come back.
 */
#include <stdint.h>
#include <uv.h>

#include "fuzz_common.h"
#include "http.h"
#include "json.h"
#include "request.h"
#include "store.h"
#include "daemon.h"

static const char *const allowed[N_ROUTES] = {
    [ROUTE_COMMANDS] = "", [ROUTE_APPEND] = "", [ROUTE_STREAM] = "from limit backward",
    [ROUTE_EVENTS] = "after limit category type", [ROUTE_SUBSCRIBE] = "after category type",
    [ROUTE_AGGREGATE] = "version at", [ROUTE_HEALTH] = "", [ROUTE_METRICS] = "",
    [ROUTE_PROJECTIONS] = "", [ROUTE_QUERY] = NULL, [ROUTE_PROJECTION_CONTROL] = "",
};

/* Body parsing as the daemon does it: the JSON decoded in a Lua state, the
 * members kept as their own text, expected_version read. */
static int parse_body(lua_State *L) {
  const char *text = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tointeger(L, 2);
  char msg[256];
  if (ebb_json_decode(L, text, len, msg, sizeof msg) != 0) return 0;
  if (!lua_istable(L, -1)) return 0;
  static const char *const keys[] = {"aggregate", "id",     "type",   "data",
                                     "metadata",  "events", "expected_version"};
  for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
    const char *v;
    size_t vlen;
    int found = ebb_json_member(text, len, keys[k], &v, &vlen);
    FUZZ_CHECK(found >= 0, "ebb_json_member refuses an object the decoder took");
    if (found == 1) {
      FUZZ_CHECK(v >= text && v + vlen <= text + len, "a member's text is outside the body");
      FUZZ_CHECK(ebb_json_validate(v, vlen, msg, sizeof msg) == 0, "a member's text is not JSON");
    }
  }
  int t = lua_gettop(L);
  if (lua_getfield(L, t, "expected_version") == LUA_TSTRING) {
    int64_t x;
    ebb_parse_expected(lua_tostring(L, -1), &x);
  }
  lua_pop(L, 1);
  const char *ev;
  size_t evlen;
  if (ebb_json_member(text, len, "events", &ev, &evlen) == 1) {
    ebb_error err;
    ebb_error_init(&err);
    lua_getfield(L, t, "events");
    lua_Integer n = lua_istable(L, -1) ? (lua_Integer)lua_rawlen(L, -1) : 0;
    for (lua_Integer i = 1; i <= n && i <= 64; i++) {
      if (lua_rawgeti(L, -1, i) == LUA_TTABLE && lua_getfield(L, -1, "type") == LUA_TSTRING)
        ebb_validate_name("event type", lua_tostring(L, -1), &err);
      lua_settop(L, t + 1);
    }
    ebb_error_clear(&err);
  }
  return 0;
}

/* An error's message goes to the client inside JSON: it must stay JSON
 * whatever bytes of the request it quotes. */
static void check_message(ebb_error *err) {
  if (err->code) {
    ebb_buf b = EBB_BUF_INIT;
    char msg[256];
    ebb_buf_json_string(&b, err->message, strlen(err->message));
    FUZZ_CHECK(b.oom || ebb_json_validate(b.data, b.len, msg, sizeof msg) == 0,
               "an error message is not a JSON string: %s: %s", msg, err->message);
    ebb_buf_free(&b);
  }
  ebb_error_clear(err);
}

static void read_request(ebb_http_conn *c, const ebb_http_request *req) {
  FUZZ_CHECK(req->method && req->path && req->query && req->body, "a request lacks a part");
  FUZZ_CHECK(req->body[req->body_len] == '\0', "the body is not NUL-terminated");
  FUZZ_CHECK(strchr(req->path, '?') == NULL && strchr(req->path, '#') == NULL,
             "the path holds its query: %s", req->path);
  size_t hl;
  const char *h = ebb_http_header(c, "content-type", &hl);
  if (h) FUZZ_CHECK(strlen(h) == hl, "a header's length is wrong");
  ebb_http_header(c, "authorization", NULL);
  ebb_http_header(c, "last-event-id", NULL);

  ebb_error err;
  ebb_error_init(&err);
  ebb_path_parts pp;
  if (ebb__split_path(req->path, &pp, &err) != 0) goto done;
  /* One byte over the limit passes, for the route's own check to name it. */
  for (int i = 0; i < pp.n; i++)
    FUZZ_CHECK(strlen(pp.seg[i]) <= EBB_MAX_NAME + 1, "a segment is too long");
  const char *allow;
  int post = strcmp(req->method, "POST") == 0;
  int route = ebb__route_of(&pp, post, &allow);
  if (allow == NULL) {
    ebb_error_set(&err, EBB_ENOTFOUND, "no route %s; see README.md for the API", req->path);
    goto done;
  }
  ebb_params q = {0};
  if (ebb__parse_query(req->query, allowed[route], &q, &err) == 0) {
    int64_t x;
    int b;
    ebb__param_int(&q, "from", 0, INT64_MAX, &x, &err) ||
        ebb__param_int(&q, "limit", 1, 10000, &x, &err) ||
        ebb__param_int(&q, "after", 0, INT64_MAX, &x, &err) ||
        ebb__param_int(&q, "version", 0, INT64_MAX, &x, &err) ||
        ebb__param_bool(&q, "backward", &b, &err);
    check_message(&err);
    const char *v;
    if ((v = ebb__param(&q, "category"))) ebb_validate_name("category", v, &err);
    if ((v = ebb__param(&q, "type"))) ebb_validate_name("event type", v, &err);
    check_message(&err);
    if (route == ROUTE_STREAM || route == ROUTE_APPEND) ebb_validate_name("stream name", pp.seg[1], &err);
    check_message(&err);
    if (route == ROUTE_QUERY) {
      ebb_buf args = EBB_BUF_INIT;
      int64_t after = -1;
      if (ebb__query_args(&q, &args, &after, &err) == 0) {
        char msg[256];
        FUZZ_CHECK(!args.oom, "out of memory");
        FUZZ_CHECK(ebb_json_validate(args.data, args.len, msg, sizeof msg) == 0,
                   "query arguments are not JSON: %s: %.*s", msg, (int)args.len, args.data);
      }
      ebb_buf_free(&args);
    }
    if ((route == ROUTE_COMMANDS || route == ROUTE_APPEND) && post)
      fuzz_pcall(fuzz_lua(), parse_body, (const unsigned char *)req->body, req->body_len);
  }
  ebb__params_free(&q);
done:
  check_message(&err);
}

static size_t requests;

static void on_request(void *ud, ebb_http_conn *c, const ebb_http_request *req) {
  requests++;
  read_request(c, req);
  int rc = ebb_http_respond(c, 200, "application/json", NULL, "{}", 2);
  FUZZ_CHECK(rc == 0, "a request could not be answered");
  FUZZ_CHECK(ebb_http_respond(c, 200, NULL, NULL, "", 0) < 0, "a request was answered twice");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static uv_loop_t loop;
  static int ready;
  if (!ready) {
    if (uv_loop_init(&loop) != 0) abort();
    ready = 1;
  }
  if (size == 0) return 0;
  size_t piece = data[0] ? data[0] : size;
  data++, size--;
  /* small limits, so that 413 and 431 are reached */
  ebb_http_limits lim = {.max_header_bytes = 2048, .max_body_bytes = 4096};
  ebb_http_server *s;
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_http_server_new(&s, &loop, &lim, on_request, NULL, &err) != 0) abort();
  ebb_http_conn *c = ebb__http_conn_socketless(s);
  if (c == NULL) abort();
  for (size_t at = 0; at < size; at += piece) {
    size_t n = size - at < piece ? size - at : piece;
    /* each read in a buffer of its own, so ASan sees a read past it */
    char *buf = malloc(n);
    if (buf == NULL) abort();
    memcpy(buf, data + at, n);
    ebb__http_conn_input(c, buf, n);
    free(buf);
  }
  ebb_http_server_close(s);
  uv_run(&loop, UV_RUN_DEFAULT);
  return 0;
}
