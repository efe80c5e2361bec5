/*
 * strmap.c: separate chaining, FNV-1a, doubling at a load factor of 1.
 */
#include "strmap.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct entry {
  struct entry *next;
  void *value;
  uint64_t hash;
  char key[];
} entry;

struct ebb_strmap {
  entry **slots;
  size_t cap, size;
};

static uint64_t hash(const char *s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

ebb_strmap *ebb_strmap_new(void) {
  ebb_strmap *m = calloc(1, sizeof *m);
  if (m == NULL) return NULL;
  m->cap = 64;
  if ((m->slots = calloc(m->cap, sizeof *m->slots)) == NULL) {
    free(m);
    return NULL;
  }
  return m;
}

void ebb_strmap_free(ebb_strmap *m) {
  if (m == NULL) return;
  for (size_t i = 0; i < m->cap; i++)
    for (entry *e = m->slots[i], *next; e; e = next) {
      next = e->next;
      free(e);
    }
  free(m->slots);
  free(m);
}

static entry **find(const ebb_strmap *m, const char *key, uint64_t h) {
  entry **p = &m->slots[h & (m->cap - 1)];
  while (*p && ((*p)->hash != h || strcmp((*p)->key, key) != 0)) p = &(*p)->next;
  return p;
}

void *ebb_strmap_get(const ebb_strmap *m, const char *key) {
  entry *e = *find(m, key, hash(key));
  return e ? e->value : NULL;
}

static void grow(ebb_strmap *m) {
  entry **slots = calloc(m->cap * 2, sizeof *slots);
  if (slots == NULL) return; /* longer chains, still correct */
  for (size_t i = 0; i < m->cap; i++)
    for (entry *e = m->slots[i], *next; e; e = next) {
      next = e->next;
      entry **dst = &slots[e->hash & (m->cap * 2 - 1)];
      e->next = *dst;
      *dst = e;
    }
  free(m->slots);
  m->slots = slots;
  m->cap *= 2;
}

int ebb_strmap_put(ebb_strmap *m, const char *key, void *value) {
  uint64_t h = hash(key);
  entry **p = find(m, key, h);
  if (*p) {
    (*p)->value = value;
    return 0;
  }
  size_t n = strlen(key);
  entry *e = malloc(sizeof *e + n + 1);
  if (e == NULL) return -1;
  memcpy(e->key, key, n + 1);
  e->hash = h;
  e->value = value;
  e->next = NULL;
  *p = e;
  if (++m->size > m->cap) grow(m);
  return 0;
}

void ebb_strmap_del(ebb_strmap *m, const char *key) {
  entry **p = find(m, key, hash(key));
  if (*p == NULL) return;
  entry *e = *p;
  *p = e->next;
  free(e);
  m->size--;
}

size_t ebb_strmap_size(const ebb_strmap *m) {
  return m->size;
}
