/*
 * browse.c: the bodies of the routes that let a client find its way around
 * the store and the modules without knowing names in advance: GET /streams
 * (a page of stream names with where each starts and ends) and GET /modules
 * (what the loaded aggregates and projections accept). The console's forms
 * and lists are built from these; so can any other client.
 */
#include <string.h>

#include "daemon.h"

typedef struct listing {
  ebb_buf *out;
  int64_t n;
  char next[EBB_MAX_NAME + 1];
} listing;

static int on_stream(void *ud, const ebb_stream_info *info) {
  listing *l = ud;
  ebb_buf *b = l->out;
  if (l->n++) ebb_buf_putc(b, ',');
  ebb_buf_puts(b, "{\"stream\":");
  ebb_buf_json_string(b, info->stream, strlen(info->stream));
  ebb_buf_printf(b,
                 ",\"version\":%lld,\"first_position\":%lld,\"last_position\":%lld,"
                 "\"last_recorded_at\":",
                 (long long)info->version, (long long)info->first_position,
                 (long long)info->last_position);
  ebb_buf_json_string(b, info->recorded_at, strlen(info->recorded_at));
  ebb_buf_printf(b, ",\"deleted\":%s}", info->deleted ? "true" : "false");
  snprintf(l->next, sizeof l->next, "%s", info->stream);
  return 0;
}

int ebb__streams_json(ebb_store *s, const ebb_list_streams *q, ebb_buf *out, ebb_error *err) {
  listing l = {.out = out};
  ebb_buf_puts(out, "{\"streams\":[");
  if (ebb_store_list_streams(s, q, on_stream, &l, err)) return err->code;
  /* A full page may have more behind it: next is where the following page
   * starts (after=); null when this page was the last. */
  ebb_buf_puts(out, "],\"next\":");
  if (l.n == q->limit) ebb_buf_json_string(out, l.next, strlen(l.next));
  else ebb_buf_puts(out, "null");
  ebb_buf_putc(out, '}');
  return 0;
}

void ebb__modules_json(ebb_daemon *d, ebb_buf *out) {
  ebb_error err;
  ebb_error_init(&err);
  ebb_buf_puts(out, "{\"aggregates\":");
  size_t mark = out->len;
  if (ebb_runtime_modules(d->rt, out, &err) != 0) {
    /* What the modules could not say is shown, not hidden behind a 500: the
     * rest of the answer still helps. */
    out->len = mark;
    ebb_buf_puts(out, "[],\"aggregates_error\":");
    ebb_buf_json_string(out, err.message, strlen(err.message));
    ebb_error_clear(&err);
  }
  ebb_buf_puts(out, ",\"projections\":");
  if (d->projections == NULL) ebb_buf_puts(out, "[]");
  else ebb_projections_status(d->projections, NULL, out);
  ebb_buf_puts(out, ",\"reactors\":");
  if (d->reactors == NULL) ebb_buf_puts(out, "[]");
  else ebb_reactors_status(d->reactors, NULL, out);
  ebb_buf_putc(out, '}');
}
