/*
 * error.c: filling and naming ebb_error records (see error.h).
 */
#include "error.h"

#include "buf.h"
#include "json.h"

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

void ebb_error_to_json(const ebb_error *err, ebb_buf *out) {
  ebb_buf_puts(out, "{\"code\":\"");
  ebb_buf_puts(out, ebb_error_name(err->code));
  ebb_buf_puts(out, "\",\"message\":");
  ebb_buf_json_string(out, err->message, strlen(err->message));
  if (err->details) {
    ebb_buf_puts(out, ",\"details\":");
    ebb_buf_puts(out, err->details);
  }
  ebb_buf_putc(out, '}');
}

int ebb_error_from_json(ebb_error *err, const char *json, size_t len) {
  const char *v;
  size_t vlen;
  char *name = NULL, *message = NULL;
  int code = 0;
  if (ebb_json_member(json, len, "code", &v, &vlen) == 1 &&
      (name = ebb_json_string_dup(v, vlen, NULL)) != NULL)
    for (int c = EBB_EBADREQ; c >= EBB_EDELETED; c--)
      if (strcmp(ebb_error_name(c), name) == 0) code = c;
  free(name);
  if (code == 0 || ebb_json_member(json, len, "message", &v, &vlen) != 1 ||
      (message = ebb_json_string_dup(v, vlen, NULL)) == NULL)
    return ebb_error_set(err, EBB_ESTORE, "a stored error is unreadable: %.*s",
                         (int)(len < 200 ? len : 200), json);
  if (err == NULL) return code;
  ebb_error_clear(err);
  ebb_error_set(err, code, "%s", message);
  free(message);
  if (ebb_json_member(json, len, "details", &v, &vlen) == 1) {
    char *details = strndup(v, vlen);
    if (details == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
    ebb_error_set_details(err, details);
  }
  return code;
}
