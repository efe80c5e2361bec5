/*
 * sse_reader.c: the Server-Sent Events line protocol, client side (see
 * sse_reader.h). It keeps only the line being read and the fields of the
 * event being built, so a stream that follows for days holds no more than
 * its largest event.
 */
#include "sse_reader.h"

#include <string.h>

void ebb_sse_reader_init(ebb_sse_reader *r, ebb_sse_on_event on_event, void *ud) {
  memset(r, 0, sizeof *r);
  ebb_buf_init(&r->line);
  ebb_buf_init(&r->data);
  ebb_buf_init(&r->id);
  ebb_buf_init(&r->event);
  r->on_event = on_event;
  r->ud = ud;
}

void ebb_sse_reader_free(ebb_sse_reader *r) {
  ebb_buf_free(&r->line);
  ebb_buf_free(&r->data);
  ebb_buf_free(&r->id);
  ebb_buf_free(&r->event);
}

static int field_is(const char *f, size_t n, const char *name) {
  return n == strlen(name) && memcmp(f, name, n) == 0;
}

static int dispatch(ebb_sse_reader *r, ebb_error *err) {
  int rc = 0;
  if (r->has_data) {
    const char *data = ebb_buf_cstr(&r->data);
    const char *id = r->has_id ? ebb_buf_cstr(&r->id) : "";
    const char *event = r->has_event ? ebb_buf_cstr(&r->event) : "";
    if (data == NULL || id == NULL || event == NULL)
      return ebb_error_set(err, EBB_ENOMEM, "out of memory");
    rc = r->on_event(r->ud, r->has_id ? id : NULL, r->has_event ? event : NULL, data);
    /* A callback's negative answer must not pass for an ebb error code. */
    if (rc < 0) rc = 1;
  }
  ebb_buf_reset(&r->data);
  ebb_buf_reset(&r->id);
  ebb_buf_reset(&r->event);
  r->has_data = r->has_id = r->has_event = 0;
  return rc;
}

static int take_line(ebb_sse_reader *r, ebb_error *err) {
  const char *line = r->line.data;
  size_t n = r->line.len;
  if (n == 0) return dispatch(r, err);
  if (line[0] == ':') return 0;
  const char *colon = memchr(line, ':', n);
  size_t flen = colon ? (size_t)(colon - line) : n;
  const char *value = colon ? colon + 1 : line + n;
  if (colon && value < line + n && *value == ' ') value++;
  size_t vlen = (size_t)(line + n - value);
  if (field_is(line, flen, "data")) {
    if (r->has_data) ebb_buf_putc(&r->data, '\n');
    ebb_buf_append(&r->data, value, vlen);
    r->has_data = 1;
    if (r->data.len > EBB_SSE_MAX_EVENT)
      return ebb_error_set(err, EBB_ETOOLARGE, "an event in the stream is over %zu bytes",
                           EBB_SSE_MAX_EVENT);
  } else if (field_is(line, flen, "id")) {
    if (memchr(value, '\0', vlen)) return 0; /* the standard ignores such ids */
    ebb_buf_reset(&r->id);
    ebb_buf_append(&r->id, value, vlen);
    r->has_id = 1;
  } else if (field_is(line, flen, "event")) {
    ebb_buf_reset(&r->event);
    ebb_buf_append(&r->event, value, vlen);
    r->has_event = 1;
  }
  if (r->data.oom || r->id.oom || r->event.oom)
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  return 0;
}

int ebb_sse_reader_feed(ebb_sse_reader *r, const char *p, size_t n, ebb_error *err) {
  size_t i = 0;
  while (i < n) {
    if (r->after_cr) {
      r->after_cr = 0;
      if (p[i] == '\n') {
        i++;
        continue;
      }
    }
    size_t j = i;
    while (j < n && p[j] != '\r' && p[j] != '\n') j++;
    if (r->line.len + (j - i) > EBB_SSE_MAX_EVENT)
      return ebb_error_set(err, EBB_ETOOLARGE, "a line in the event stream is over %zu bytes",
                           EBB_SSE_MAX_EVENT);
    if (ebb_buf_append(&r->line, p + i, j - i) != 0)
      return ebb_error_set(err, EBB_ENOMEM, "out of memory");
    if (j == n) break;
    r->after_cr = p[j] == '\r';
    i = j + 1;
    int rc = take_line(r, err);
    ebb_buf_reset(&r->line);
    if (rc != 0) return rc;
  }
  return 0;
}
