/*
 * buf.h: a growable byte buffer, the one way ebb builds text (JSON, SQL
 * results, HTTP responses). Out-of-memory is sticky: once an append fails,
 * `oom` stays set and later appends do nothing, so a caller may check once
 * at the end.
 */
#ifndef EBB_BUF_H
#define EBB_BUF_H

#include <stddef.h>

typedef struct ebb_buf {
  char *data;   /* always NUL-terminated when len > 0 or after ebb_buf_cstr */
  size_t len;
  size_t cap;
  int oom;
} ebb_buf;

#define EBB_BUF_INIT {NULL, 0, 0, 0}

void ebb_buf_init(ebb_buf *b);
void ebb_buf_free(ebb_buf *b);            /* frees and re-inits; harmless twice */
void ebb_buf_reset(ebb_buf *b);           /* len = 0, keeps the memory */
int ebb_buf_reserve(ebb_buf *b, size_t extra); /* 0 or -1 (oom) */
int ebb_buf_append(ebb_buf *b, const void *p, size_t n);
int ebb_buf_puts(ebb_buf *b, const char *s);
int ebb_buf_putc(ebb_buf *b, char c);
int ebb_buf_printf(ebb_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends v in decimal, as "%lld" would, without printf's cost (the
 * daemon writes several per answer). */
int ebb_buf_int(ebb_buf *b, long long v);
/* Appends s as a JSON string literal (quotes and escapes). A byte that is
 * not part of a UTF-8 sequence becomes U+FFFD, so the literal is valid JSON
 * even when s quotes what a client sent (error messages). */
int ebb_buf_json_string(ebb_buf *b, const char *s, size_t n);
/* The length of the strictly valid UTF-8 sequence at p (n >= 1 bytes
 * available): 1 to 4, or 0 if it is not one: a stray continuation byte, an
 * overlong form, a UTF-16 surrogate, past U+10FFFF, cut short (the ranges of
 * RFC 3629, table 3-7 of the Unicode standard). Inline: the JSON codec's
 * inner loop calls it. */
static inline size_t ebb_utf8_seq(const unsigned char *p, size_t n) {
  unsigned c = p[0];
  if (c < 0x80) return 1;
  if (c < 0xC2) return 0; /* continuation byte, or overlong 2-byte lead */
  if (c < 0xE0) return (n >= 2 && (p[1] & 0xC0) == 0x80) ? 2 : 0;
  if (c < 0xF0) {
    if (n < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
    if (c == 0xE0 && p[1] < 0xA0) return 0; /* overlong */
    if (c == 0xED && p[1] >= 0xA0) return 0; /* U+D800..U+DFFF */
    return 3;
  }
  if (c < 0xF5) {
    if (n < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
    if (c == 0xF0 && p[1] < 0x90) return 0; /* overlong */
    if (c == 0xF4 && p[1] >= 0x90) return 0; /* above U+10FFFF */
    return 4;
  }
  return 0;
}
/* A new string formatted like printf (free it), or NULL out of memory. */
char *ebb_strdupf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Returns the NUL-terminated text ("" for an empty buffer); NULL after oom. */
const char *ebb_buf_cstr(ebb_buf *b);
/* Hands the memory to the caller (malloc'd, NUL-terminated) and re-inits b. */
char *ebb_buf_take(ebb_buf *b, size_t *len);

#endif
