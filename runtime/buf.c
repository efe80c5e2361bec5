/*
 * buf.c: growable byte buffer (see buf.h).
 */
#define _GNU_SOURCE /* vasprintf */
#include "buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ebb_buf_init(ebb_buf *b) {
  b->data = NULL;
  b->len = b->cap = 0;
  b->oom = 0;
}

void ebb_buf_free(ebb_buf *b) {
  free(b->data);
  ebb_buf_init(b);
}

void ebb_buf_reset(ebb_buf *b) {
  b->len = 0;
  b->oom = 0;
  if (b->data) b->data[0] = '\0';
}

int ebb_buf_reserve(ebb_buf *b, size_t extra) {
  if (b->oom) return -1;
  if (b->len + extra + 1 <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 64;
  while (cap < b->len + extra + 1) {
    if (cap > ((size_t)-1) / 2) {
      b->oom = 1;
      return -1;
    }
    cap *= 2;
  }
  char *p = realloc(b->data, cap);
  if (p == NULL) {
    b->oom = 1;
    return -1;
  }
  b->data = p;
  b->cap = cap;
  return 0;
}

int ebb_buf_append(ebb_buf *b, const void *p, size_t n) {
  if (ebb_buf_reserve(b, n) != 0) return -1;
  if (n) memcpy(b->data + b->len, p, n);
  b->len += n;
  b->data[b->len] = '\0';
  return 0;
}

int ebb_buf_puts(ebb_buf *b, const char *s) {
  return ebb_buf_append(b, s, strlen(s));
}

int ebb_buf_putc(ebb_buf *b, char c) {
  return ebb_buf_append(b, &c, 1);
}

int ebb_buf_printf(ebb_buf *b, const char *fmt, ...) {
  char small[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(small, sizeof small, fmt, ap);
  va_end(ap);
  if (n < 0) return -1;
  if ((size_t)n < sizeof small) return ebb_buf_append(b, small, (size_t)n);
  if (ebb_buf_reserve(b, (size_t)n) != 0) return -1;
  va_start(ap, fmt);
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  b->len += (size_t)n;
  return 0;
}

int ebb_buf_int(ebb_buf *b, long long v) {
  char s[24], *p = s + sizeof s;
  /* negated in unsigned arithmetic, so LLONG_MIN is fine */
  unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
  do {
    *--p = (char)('0' + u % 10);
    u /= 10;
  } while (u);
  if (v < 0) *--p = '-';
  return ebb_buf_append(b, p, (size_t)(s + sizeof s - p));
}

int ebb_buf_json_string(ebb_buf *b, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  if (ebb_buf_reserve(b, n + 2) != 0) return -1;
  ebb_buf_putc(b, '"');
  size_t run = 0; /* start of the pending run of bytes that need no escape */
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') continue;
    if (c >= 0x80) {
      size_t k = ebb_utf8_seq((const unsigned char *)s + i, n - i);
      if (k > 0) {
        i += k - 1;
        continue;
      }
    }
    ebb_buf_append(b, s + run, i - run);
    run = i + 1;
    switch (c) {
      case '"': ebb_buf_append(b, "\\\"", 2); break;
      case '\\': ebb_buf_append(b, "\\\\", 2); break;
      case '\n': ebb_buf_append(b, "\\n", 2); break;
      case '\r': ebb_buf_append(b, "\\r", 2); break;
      case '\t': ebb_buf_append(b, "\\t", 2); break;
      case '\b': ebb_buf_append(b, "\\b", 2); break;
      case '\f': ebb_buf_append(b, "\\f", 2); break;
      default: {
        if (c >= 0x80) { /* not UTF-8 */
          ebb_buf_append(b, "\\ufffd", 6);
          break;
        }
        char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
        ebb_buf_append(b, u, 6);
      }
    }
  }
  ebb_buf_append(b, s + run, n - run);
  return ebb_buf_putc(b, '"');
}

const char *ebb_buf_cstr(ebb_buf *b) {
  if (b->oom) return NULL;
  if (b->data == NULL && ebb_buf_reserve(b, 0) != 0) return NULL;
  b->data[b->len] = '\0';
  return b->data;
}

char *ebb_buf_take(ebb_buf *b, size_t *len) {
  if (ebb_buf_cstr(b) == NULL) {
    ebb_buf_free(b);
    return NULL;
  }
  char *p = b->data;
  if (len) *len = b->len;
  ebb_buf_init(b);
  return p;
}

char *ebb_strdupf(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char *s = NULL;
  if (vasprintf(&s, fmt, ap) < 0) s = NULL;
  va_end(ap);
  return s;
}
