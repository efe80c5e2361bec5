/*
 * state_cache.c: LRU map from stream name to folded state (see state_cache.h).
 * A chained hash table for lookup and a doubly linked list for recency.
 */
#include "state_cache.h"

#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

typedef struct entry {
  struct entry *prev, *next; /* recency list: head is the most recent */
  struct entry *chain;       /* hash bucket */
  uint64_t hash;
  int ref;
  int64_t version, position;
  char stream[]; /* NUL-terminated key */
} entry;

struct ebb_state_cache {
  entry **buckets;
  size_t nbuckets; /* a power of two */
  size_t size, max;
  entry *head, *tail;
  uint64_t hits, misses, evictions;
};

static uint64_t hash_of(const char *s) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

ebb_state_cache *ebb_state_cache_new(size_t max) {
  ebb_state_cache *c = calloc(1, sizeof *c);
  if (c == NULL) return NULL;
  c->max = max;
  c->nbuckets = 16;
  while (c->nbuckets < max * 2 && c->nbuckets < ((size_t)1 << 30)) c->nbuckets *= 2;
  c->buckets = calloc(c->nbuckets, sizeof *c->buckets);
  if (c->buckets == NULL) {
    free(c);
    return NULL;
  }
  return c;
}

static void unlink_entry(ebb_state_cache *c, entry *e) {
  entry **p = &c->buckets[e->hash & (c->nbuckets - 1)];
  while (*p != e) p = &(*p)->chain;
  *p = e->chain;
  if (e->prev) e->prev->next = e->next;
  else c->head = e->next;
  if (e->next) e->next->prev = e->prev;
  else c->tail = e->prev;
  c->size--;
}

void ebb_state_cache_clear(ebb_state_cache *c, lua_State *L) {
  if (c == NULL) return;
  while (c->head) {
    entry *e = c->head;
    unlink_entry(c, e);
    luaL_unref(L, LUA_REGISTRYINDEX, e->ref);
    free(e);
  }
}

void ebb_state_cache_free(ebb_state_cache *c, lua_State *L) {
  if (c == NULL) return;
  ebb_state_cache_clear(c, L);
  free(c->buckets);
  free(c);
}

int ebb_state_cache_take(ebb_state_cache *c, const char *stream, int *ref, int64_t *version,
                         int64_t *position) {
  uint64_t h = hash_of(stream);
  for (entry *e = c->buckets[h & (c->nbuckets - 1)]; e; e = e->chain) {
    if (e->hash != h || strcmp(e->stream, stream) != 0) continue;
    unlink_entry(c, e);
    *ref = e->ref;
    *version = e->version;
    *position = e->position;
    free(e);
    c->hits++;
    return 1;
  }
  c->misses++;
  return 0;
}

int ebb_state_cache_has(const ebb_state_cache *c, const char *stream) {
  uint64_t h = hash_of(stream);
  for (const entry *e = c->buckets[h & (c->nbuckets - 1)]; e; e = e->chain)
    if (e->hash == h && strcmp(e->stream, stream) == 0) return 1;
  return 0;
}

void ebb_state_cache_put(ebb_state_cache *c, lua_State *L, const char *stream, int ref,
                         int64_t version, int64_t position) {
  size_t n = strlen(stream);
  entry *e = c->max ? malloc(sizeof *e + n + 1) : NULL;
  if (e == NULL) {
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    return;
  }
  /* A put without a take (a state query racing nothing) may meet an old entry. */
  int old_ref;
  int64_t v, p;
  if (ebb_state_cache_take(c, stream, &old_ref, &v, &p)) {
    c->hits--;
    luaL_unref(L, LUA_REGISTRYINDEX, old_ref);
  } else {
    c->misses--;
  }
  memcpy(e->stream, stream, n + 1);
  e->hash = hash_of(stream);
  e->ref = ref;
  e->version = version;
  e->position = position;
  size_t b = e->hash & (c->nbuckets - 1);
  e->chain = c->buckets[b];
  c->buckets[b] = e;
  e->prev = NULL;
  e->next = c->head;
  if (c->head) c->head->prev = e;
  c->head = e;
  if (c->tail == NULL) c->tail = e;
  c->size++;
  while (c->size > c->max) {
    entry *last = c->tail;
    unlink_entry(c, last);
    luaL_unref(L, LUA_REGISTRYINDEX, last->ref);
    free(last);
    c->evictions++;
  }
}

void ebb_state_cache_stats_get(const ebb_state_cache *c, ebb_state_cache_stats *out) {
  out->size = c->size;
  out->max = c->max;
  out->hits = c->hits;
  out->misses = c->misses;
  out->evictions = c->evictions;
}
