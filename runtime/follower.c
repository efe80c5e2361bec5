/*
 * follower.c: the checkpointed reader of the global order (see follower.h):
 * `from` matching, skipped positions, reading and upcasting a batch, and the
 * checkpoint-ahead test. What a consumer does with the events, and where it
 * keeps its checkpoint, is its own.
 */
#define _GNU_SOURCE /* asprintf */
#include "follower.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const ebb_follow_state_names[EBB_FOLLOW_N_STATES] = {
    "catching_up", "live", "rebuilding", "faulted", "stopped"};

void ebb_follower_clear(ebb_follower *f) {
  if (f == NULL) return;
  for (size_t i = 0; i < f->n_from; i++) free(f->from[i]);
  free(f->from);
  free(f->skipped);
  f->from = NULL;
  f->skipped = NULL;
  f->n_from = f->n_skipped = 0;
}

int ebb_follower_add_from(ebb_follower *f, const char *s) {
  char **p = realloc(f->from, (f->n_from + 1) * sizeof *p);
  if (p == NULL) return -1;
  f->from = p;
  if ((p[f->n_from] = strdup(s)) == NULL) return -1;
  f->n_from++;
  return 0;
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

void ebb_follower_set_skipped(ebb_follower *f, int64_t *positions, size_t n) {
  free(f->skipped);
  if (n) qsort(positions, n, sizeof *positions, cmp_i64);
  f->skipped = positions;
  f->n_skipped = n;
}

void ebb_follower_take(ebb_follower *f, ebb_follower *src) {
  free(f->skipped);
  f->skipped = src->skipped;
  f->n_skipped = src->n_skipped;
  src->skipped = NULL;
  src->n_skipped = 0;
}

int ebb_follower_matches(const ebb_follower *f, const ebb_event *e) {
  if (f->n_from == 0) return 1; /* no from: every event (a publisher without nats_from) */
  size_t cat = ebb_stream_category_len(e->stream);
  for (size_t i = 0; i < f->n_from; i++) {
    const char *s = f->from[i];
    if (strcmp(s, e->type) == 0) return 1;
    if (strlen(s) == cat && strncmp(s, e->stream, cat) == 0) return 1;
  }
  return 0;
}

int ebb_follower_is_skipped(const ebb_follower *f, int64_t position) {
  size_t lo = 0, hi = f->n_skipped;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (f->skipped[mid] < position) lo = mid + 1;
    else hi = mid;
  }
  return lo < f->n_skipped && f->skipped[lo] == position;
}

static int keep_event(const void *ud, const ebb_event *e) {
  const ebb_follower *f = ud;
  return ebb_follower_matches(f, e) && !ebb_follower_is_skipped(f, e->position);
}

void ebb_follower_mark(ebb_follower *f, const ebb_event *e) {
  f->mark_position = e->position;
  snprintf(f->mark_id, sizeof f->mark_id, "%s", e->id);
}

int ebb_follower_read(ebb_follower *f, ebb_runtime *rt, int64_t head, int64_t limit,
                      ebb_follower_batch *b, ebb_error *err) {
  *b = (ebb_follower_batch){0};
  ebb_event_list_init(&b->events);
  ebb_event_list *l = &b->events;
  ebb_read_all q = {.after = f->position, .limit = limit};
  if (ebb_store_read_all(ebb_runtime_store(rt), &q, l, err) != 0) return -1;
  int64_t last = l->n ? l->items[l->n - 1].position : f->position;
  if ((int64_t)l->n < limit && head > last) last = head; /* nothing more to see up to head */
  if (l->n == 0) {
    /* Nothing after the checkpoint up to head: move the checkpoint on. */
    f->position = last;
    return 0;
  }
  /* The fingerprint to write with the checkpoint: the last event read. */
  ebb_follower_mark(f, &l->items[l->n - 1]);
  ebb_event_list_filter(l, keep_event, f);
  if (ebb_runtime_upcast_each(rt, l, err) != 0) return -2;
  size_t n = 0;
  while (n < l->n && l->items[n].upcast_error == NULL) n++;
  b->n = n;
  b->checkpoint = b->read_to = last;
  if (n < l->n) {
    b->bad = &l->items[n];
    b->checkpoint = b->bad->position - 1;
    if (n > 0) {
      ebb_follower_mark(f, &l->items[n - 1]);
      b->checkpoint = f->mark_position;
    }
  }
  return 1;
}

void ebb_follower_batch_free(ebb_follower_batch *b) {
  ebb_event_list_free(&b->events);
  b->n = 0;
  b->bad = NULL;
}

char *ebb_follower_ahead(const ebb_follower *f, ebb_store *store, const char *who) {
  ebb_error err;
  ebb_error_init(&err);
  int64_t head = 0;
  char *why = NULL;
  if (ebb_store_head(store, &head, &err) != 0) {
    ebb_error_clear(&err);
    return NULL;
  }
  if (f->position > head) {
    if (asprintf(&why, "its checkpoint (position %lld) is ahead of the store's head (%lld): the "
                       "store lost or was restored without events %s holds",
                 (long long)f->position, (long long)head, who) < 0)
      why = NULL;
    return why;
  }
  if (f->mark_position <= 0) return NULL;
  ebb_event_list l;
  ebb_event_list_init(&l);
  if (ebb_store_read_range(store, f->mark_position, f->mark_position, &l, &err) == 0 &&
      (l.n == 0 || strcmp(l.items[0].id, f->mark_id) != 0) &&
      asprintf(&why, "the event at position %lld is %s%s, not %s as when %s saw it: "
                     "the store was restored or lost events, and others now hold their positions",
               (long long)f->mark_position, l.n ? "event " : "gone", l.n ? l.items[0].id : "",
               f->mark_id, who) < 0)
    why = NULL;
  ebb_event_list_free(&l);
  ebb_error_clear(&err);
  return why;
}
