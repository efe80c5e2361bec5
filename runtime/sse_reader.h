/*
 * sse_reader.h: reads a Server-Sent Events stream (the client side of
 * `GET /subscribe`, for `ebb events --follow --url`). The bytes of the
 * stream go in as they arrive, in pieces of any size; complete events come
 * out through a callback. The daemon's side of the stream is sse.c.
 *
 * The line protocol is the WHATWG one: lines end in CRLF, LF or CR;
 * "field: value" lines build an event; a blank line dispatches it. Comment
 * lines (":heartbeat") and blocks without data are skipped; "retry" and
 * unknown fields are ignored. One line or one event's data over
 * EBB_SSE_MAX_EVENT bytes is refused with EBB_ETOOLARGE.
 */
#ifndef EBB_SSE_READER_H
#define EBB_SSE_READER_H

#include <stddef.h>

#include "buf.h"
#include "error.h"

#define EBB_SSE_MAX_EVENT ((size_t)64 << 20)

/* Called for every complete event: id and event are its own "id:" and
 * "event:" fields or NULL, data its "data:" lines joined with "\n". The
 * strings are valid during the call only. Non-zero stops the reader and is
 * handed back by ebb_sse_reader_feed. */
typedef int (*ebb_sse_on_event)(void *ud, const char *id, const char *event, const char *data);

typedef struct ebb_sse_reader {
  ebb_buf line, data, id, event;
  int has_data, has_id, has_event;
  int after_cr;  /* the last line ended in CR: a LF that follows is part of it */
  ebb_sse_on_event on_event;
  void *ud;
} ebb_sse_reader;

void ebb_sse_reader_init(ebb_sse_reader *r, ebb_sse_on_event on_event, void *ud);
/* Frees the buffers; harmless twice. */
void ebb_sse_reader_free(ebb_sse_reader *r);

/* Takes the next n bytes of the stream. Returns 0, the callback's non-zero
 * answer (a positive number: stop), or a negative EBB_E* code with err set.
 * A last event not ended by a blank line is never dispatched, as the
 * standard says. */
int ebb_sse_reader_feed(ebb_sse_reader *r, const char *p, size_t n, ebb_error *err);

#endif
