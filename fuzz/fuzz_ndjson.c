/*
 * fuzz_ndjson.c: the line parser of `ebb import` (runtime/import.c) on
 * arbitrary input, split into lines the way `ebb import` reads a file.
 * A bad line must fail with a message (a Lua error raised by the parser,
 * caught as the CLI catches it), leaking nothing; a good one must give what
 * the store is then handed: data and metadata as JSON object text taken
 * from the line, a canonical recorded_at, positive version and schema.
 */
#include <stdint.h>

#include "clock.h"
#include "error.h"
#include "import.h"
#include "json.h"
#include "store.h"
#include "fuzz_common.h"

static void check_event(const ebb_import_event *e) {
  char msg[256];
  FUZZ_CHECK(e->stream && e->id && e->type && e->data && e->metadata && e->recorded_at,
             "a parsed line lacks a field");
  FUZZ_CHECK(e->version >= 1 && e->schema >= 1, "version %lld, schema %lld",
             (long long)e->version, (long long)e->schema);
  FUZZ_CHECK(e->data_len == strlen(e->data) && e->metadata_len == strlen(e->metadata),
             "data or metadata length is wrong");
  FUZZ_CHECK(e->data[0] == '{' && ebb_json_validate(e->data, e->data_len, msg, sizeof msg) == 0,
             "data is not a JSON object: %s", e->data);
  FUZZ_CHECK(e->metadata[0] == '{' &&
                 ebb_json_validate(e->metadata, e->metadata_len, msg, sizeof msg) == 0,
             "metadata is not a JSON object: %s", e->metadata);
  int64_t ms;
  char again[EBB_TIME_LEN + 1];
  FUZZ_CHECK(ebb_clock_parse(e->recorded_at, &ms) == 0, "recorded_at %s does not parse",
             e->recorded_at);
  ebb_clock_format(ms, again);
  FUZZ_CHECK(strcmp(again, e->recorded_at) == 0, "recorded_at %s is not canonical (%s)",
             e->recorded_at, again);
  /* what the store checks next; either answer is fine, it must not crash */
  ebb_error err;
  ebb_error_init(&err);
  ebb_validate_name("stream name", e->stream, &err);
  ebb_validate_name("event type", e->type, &err);
  ebb_error_clear(&err);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = fuzz_lua();
  const char *p = (const char *)data, *end = p + size;
  long lineno = 0;
  while (p < end) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
    while (len > 0 && (p[len - 1] == '\r' || p[len - 1] == '\n')) len--;
    lineno++;
    if (len > 0) {
      ebb_import_event e;
      memset(&e, 0, sizeof e);
      e.line = lineno;
      /* the line in a buffer of its own, as getline gives it */
      char *line = malloc(len + 1);
      if (line == NULL) return 0;
      memcpy(line, p, len);
      line[len] = '\0';
      lua_settop(L, 0);
      lua_pushcfunction(L, ebb_import_parse_line);
      lua_pushlstring(L, line, len);
      lua_pushlightuserdata(L, &e);
      int rc = lua_pcall(L, 2, 0, 0);
      if (rc == LUA_OK) check_event(&e);
      else FUZZ_CHECK(rc == LUA_ERRRUN && lua_isstring(L, -1), "status %d", rc);
      ebb_import_event_free(&e);
      free(line);
      lua_settop(L, 0);
    }
    if (!nl) break;
    p = nl + 1;
  }
  lua_gc(L, LUA_GCSTEP, 0); /* a full collection per input costs more than the input */
  return 0;
}
