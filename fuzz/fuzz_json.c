/*
 * fuzz_json.c: the JSON codec (runtime/json.c) as a round trip. Any input:
 * the validator and the decoder agree on whether it is JSON; what decodes
 * encodes, and decoding that text gives the same value again (integers
 * stay integers, floats keep every bit, arrays stay arrays), and encoding
 * is then a fixed point. Decoding failures must be clean (-1, message).
 */
#include <stdint.h>

#include "fuzz_common.h"
#include "json.h"

static int run(lua_State *L) {
  const char *text = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tointeger(L, 2);
  char msg[256], vmsg[256];
  int valid = ebb_json_validate(text, len, vmsg, sizeof vmsg) == 0;
  int top = lua_gettop(L);
  int rc = ebb_json_decode(L, text, len, msg, sizeof msg);
  FUZZ_CHECK((rc == 0) == valid, "validate says %s, decode says %s", valid ? "ok" : vmsg,
             rc == 0 ? "ok" : msg);
  if (rc != 0) {
    FUZZ_CHECK(lua_gettop(L) == top, "a failed decode left the stack changed");
    FUZZ_CHECK(strcmp(msg, vmsg) == 0, "messages differ: '%s' vs '%s'", msg, vmsg);
    return 0;
  }
  int v1 = lua_gettop(L);
  ebb_buf b1 = EBB_BUF_INIT, b2 = EBB_BUF_INIT;
  rc = ebb_json_encode(L, v1, &b1, msg, sizeof msg);
  FUZZ_CHECK(rc == 0, "a decoded value does not encode: %s", msg);
  FUZZ_CHECK(ebb_json_validate(b1.data, b1.len, vmsg, sizeof vmsg) == 0,
             "the encoder wrote invalid JSON: %s", vmsg);
  rc = ebb_json_decode(L, b1.data, b1.len, msg, sizeof msg);
  FUZZ_CHECK(rc == 0, "the encoder's text does not decode: %s: %.*s", msg, (int)b1.len, b1.data);
  int v2 = lua_gettop(L);
  FUZZ_CHECK(fuzz_equal(L, v1, v2, 0), "decode(encode(v)) differs from v: %.*s", (int)b1.len,
             b1.data);
  rc = ebb_json_encode(L, v2, &b2, msg, sizeof msg);
  FUZZ_CHECK(rc == 0, "a decoded value does not encode: %s", msg);
  FUZZ_CHECK(b1.len == b2.len, "encoding is not a fixed point: %.*s", (int)b1.len, b1.data);
  ebb_buf_free(&b1);
  ebb_buf_free(&b2);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_pcall(fuzz_lua(), run, data, size);
  return 0;
}
