/*
 * error.c: filling and naming ebb_error records (see error.h).
 */
#include "error.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ebb_error_init(ebb_error *err) {
  /* Not a memset: errors are initialised several times per command, and the
   * message is only read when code says there is one. */
  err->code = EBB_OK;
  err->message[0] = '\0';
  err->expected = err->actual = 0;
  err->details = NULL;
}

void ebb_error_clear(ebb_error *err) {
  if (err == NULL) return;
  free(err->details);
  ebb_error_init(err);
}

int ebb_error_set(ebb_error *err, int code, const char *fmt, ...) {
  if (err == NULL) return code;
  err->code = code;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err->message, sizeof err->message, fmt, ap);
  va_end(ap);
  return code;
}

void ebb_error_set_details(ebb_error *err, char *json) {
  if (err == NULL) {
    free(json);
    return;
  }
  free(err->details);
  err->details = json;
}

void ebb_error_move(ebb_error *dst, ebb_error *src) {
  ebb_error_clear(dst);
  *dst = *src;
  ebb_error_init(src);
}

const char *ebb_error_name(int code) {
  switch (code) {
    case EBB_OK: return "ok";
    case EBB_EBADREQ: return "bad_request";
    case EBB_ENOTFOUND: return "not_found";
    case EBB_EVERSION: return "wrong_expected_version";
    case EBB_ECONFLICT: return "conflict";
    case EBB_EREJECTED: return "rejected";
    case EBB_ESCRIPT: return "script_error";
    case EBB_ETOOLARGE: return "too_large";
    case EBB_ESTORE: return "storage_error";
    case EBB_EBUSY: return "busy";
    case EBB_ENOMEM: return "out_of_memory";
    case EBB_EUNAVAIL: return "unavailable";
    case EBB_ETIMEOUT: return "timeout";
    case EBB_EDELETED: return "stream_deleted";
    default: return "internal_error";
  }
}

const char *ebb_expected_name(int64_t expected, char *buf, size_t len) {
  if (expected == EBB_EXPECT_ANY) return "any";
  if (expected == EBB_EXPECT_NO_STREAM) return "no_stream";
  if (expected == EBB_EXPECT_EXISTS) return "exists";
  snprintf(buf, len, "%" PRId64, expected);
  return buf;
}
