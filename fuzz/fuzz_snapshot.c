/*
 * fuzz_snapshot.c: the snapshot codec (runtime/serialize.c) fed arbitrary
 * bytes. Deserializing must fail cleanly (-1 with a message, stack as it
 * was, nothing read outside the input, no raise but out of memory), and
 * whatever it accepts must serialize and deserialize again.
 */
#include <stdint.h>

#include "fuzz_common.h"
#include "serialize.h"

static int run(lua_State *L) {
  const char *bytes = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tointeger(L, 2);
  /* A copy of exactly len bytes, so ASan sees a read past the input. */
  char *data = malloc(len ? len : 1);
  if (data == NULL) return 0;
  memcpy(data, bytes, len);
  char msg[256];
  int top = lua_gettop(L);
  int rc = ebb_deserialize(L, data, len, msg, sizeof msg);
  free(data);
  if (rc != 0) {
    FUZZ_CHECK(lua_gettop(L) == top, "a failed deserialize left the stack changed");
    FUZZ_CHECK(msg[0] != '\0', "a failed deserialize gave no message");
    return 0;
  }
  FUZZ_CHECK(lua_gettop(L) == top + 1, "deserialize pushed %d values", lua_gettop(L) - top);
  ebb_buf b = EBB_BUF_INIT;
  rc = ebb_serialize(L, -1, &b, msg, sizeof msg);
  FUZZ_CHECK(rc == 0, "a deserialized value does not serialize: %s", msg);
  rc = ebb_deserialize(L, b.data, b.len, msg, sizeof msg);
  FUZZ_CHECK(rc == 0, "serialize's output does not deserialize: %s", msg);
  ebb_buf b2 = EBB_BUF_INIT;
  rc = ebb_serialize(L, -1, &b2, msg, sizeof msg);
  FUZZ_CHECK(rc == 0, "a value deserialized twice does not serialize: %s", msg);
  ebb_buf_free(&b);
  ebb_buf_free(&b2);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_pcall(fuzz_lua(), run, data, size);
  return 0;
}
