/*
 * strmap.h: a hash map from C strings to pointers (keys are copied; values
 * belong to the caller). The daemon keys its per-stream command queues by it.
 */
#ifndef EBB_STRMAP_H
#define EBB_STRMAP_H

#include <stddef.h>

typedef struct ebb_strmap ebb_strmap;

ebb_strmap *ebb_strmap_new(void);            /* NULL on out of memory */
void ebb_strmap_free(ebb_strmap *m);         /* NULL-safe; values are not touched */
void *ebb_strmap_get(const ebb_strmap *m, const char *key);
/* 0, or -1 on out of memory. Replaces an existing value. */
int ebb_strmap_put(ebb_strmap *m, const char *key, void *value);
void ebb_strmap_del(ebb_strmap *m, const char *key);
size_t ebb_strmap_size(const ebb_strmap *m);

#endif
