/*
 * readers.c: the pool of read-only runtimes (see readers.h).
 */
#include "readers.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct idle {
  ebb_runtime *rt;
  unsigned generation;
  struct idle *next;
} idle;

struct ebb_readers {
  ebb_runtime_options ro;
  char *data_dir, *store, *aggregates_dir, *lua_dir;
  pthread_mutex_t mu;
  idle *free_list;          /* runtimes given back, with the generation they were opened in */
  unsigned generation;
  /* Which generation each runtime out on loan belongs to is looked up here. */
  idle *lent;
  int mu_ready;
};

int ebb_readers_new(ebb_readers **out, const ebb_runtime_options *ro, ebb_error *err) {
  *out = NULL;
  ebb_readers *r = calloc(1, sizeof *r);
  if (r == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  r->ro = *ro;
  r->data_dir = strdup(ro->data_dir);
  r->store = ro->store ? strdup(ro->store) : NULL;
  r->aggregates_dir = ro->aggregates_dir ? strdup(ro->aggregates_dir) : NULL;
  r->lua_dir = ro->lua_dir ? strdup(ro->lua_dir) : NULL;
  if (r->data_dir == NULL || (ro->store && !r->store) || (ro->aggregates_dir && !r->aggregates_dir) ||
      (ro->lua_dir && !r->lua_dir)) {
    ebb_readers_free(r);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  }
  r->ro.data_dir = r->data_dir;
  r->ro.store = r->store;
  r->ro.aggregates_dir = r->aggregates_dir;
  r->ro.lua_dir = r->lua_dir;
  r->ro.cache_size = -1;
  r->ro.snapshots_read_only = 1;
  pthread_mutex_init(&r->mu, NULL);
  r->mu_ready = 1;
  *out = r;
  return 0;
}

ebb_runtime *ebb_readers_take(ebb_readers *r, ebb_error *err) {
  pthread_mutex_lock(&r->mu);
  idle *i = r->free_list;
  ebb_runtime *stale = NULL;
  while (i && i->generation != r->generation) { /* opened before a reload */
    r->free_list = i->next;
    stale = i->rt;
    free(i);
    pthread_mutex_unlock(&r->mu);
    ebb_runtime_close(stale);
    pthread_mutex_lock(&r->mu);
    i = r->free_list;
  }
  unsigned generation = r->generation;
  ebb_runtime *rt = NULL;
  if (i) {
    r->free_list = i->next;
    rt = i->rt;
    i->next = r->lent;
    r->lent = i;
    pthread_mutex_unlock(&r->mu);
    return rt;
  }
  pthread_mutex_unlock(&r->mu);
  /* Opening takes milliseconds (the modules load): outside the lock. */
  if (ebb_runtime_open(&rt, &r->ro, err) != 0) return NULL;
  i = malloc(sizeof *i);
  if (i == NULL) {
    ebb_runtime_close(rt);
    ebb_error_set(err, EBB_ENOMEM, "out of memory");
    return NULL;
  }
  i->rt = rt;
  i->generation = generation;
  pthread_mutex_lock(&r->mu);
  i->next = r->lent;
  r->lent = i;
  pthread_mutex_unlock(&r->mu);
  return rt;
}

void ebb_readers_give(ebb_readers *r, ebb_runtime *rt) {
  pthread_mutex_lock(&r->mu);
  idle **pp = &r->lent;
  while (*pp && (*pp)->rt != rt) pp = &(*pp)->next;
  idle *i = *pp;
  if (i) {
    *pp = i->next;
    i->next = r->free_list;
    r->free_list = i;
  }
  pthread_mutex_unlock(&r->mu);
  if (i == NULL) ebb_runtime_close(rt); /* not ours: cannot happen, but never leak it */
}

void ebb_readers_reload(ebb_readers *r) {
  pthread_mutex_lock(&r->mu);
  r->generation++;
  pthread_mutex_unlock(&r->mu);
}

void ebb_readers_free(ebb_readers *r) {
  if (r == NULL) return;
  for (idle *i = r->free_list, *next; i; i = next) {
    next = i->next;
    ebb_runtime_close(i->rt);
    free(i);
  }
  for (idle *i = r->lent, *next; i; i = next) {
    next = i->next;
    ebb_runtime_close(i->rt);
    free(i);
  }
  if (r->mu_ready) pthread_mutex_destroy(&r->mu);
  free(r->data_dir);
  free(r->store);
  free(r->aggregates_dir);
  free(r->lua_dir);
  free(r);
}
