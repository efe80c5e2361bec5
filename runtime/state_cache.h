/*
 * state_cache.h: the bounded cache of folded aggregate state.
 *
 * Maps a stream name to the registry reference of its folded state in the
 * runtime's Lua state, with the version and position it was folded to.
 * A command *takes* its entry out (so a failed command cannot leave a
 * half-changed state behind) and *puts* the new state back only after its
 * events are committed. The least recently put entry goes first once the
 * cache holds `max` entries, so memory stays bounded however many streams
 * exist.
 */
#ifndef EBB_STATE_CACHE_H
#define EBB_STATE_CACHE_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>

typedef struct ebb_state_cache ebb_state_cache;

typedef struct ebb_state_cache_stats {
  size_t size, max;
  uint64_t hits, misses, evictions;
} ebb_state_cache_stats;

/* max = 0 disables the cache (take always misses, put releases). NULL on out of memory. */
ebb_state_cache *ebb_state_cache_new(size_t max);
/* Releases every reference in L and frees the cache. NULL-safe. */
void ebb_state_cache_free(ebb_state_cache *c, lua_State *L);
/* 1 and the entry's fields when the stream is cached (the entry leaves the
 * cache and its reference now belongs to the caller), else 0. */
int ebb_state_cache_take(ebb_state_cache *c, const char *stream, int *ref, int64_t *version,
                         int64_t *position);
/* Whether the stream is cached; counts neither a hit nor a miss. */
int ebb_state_cache_has(const ebb_state_cache *c, const char *stream);
/* Stores a reference the caller owned (it now belongs to the cache). If the
 * entry cannot be stored it is released in L. */
void ebb_state_cache_put(ebb_state_cache *c, lua_State *L, const char *stream, int ref,
                         int64_t version, int64_t position);
/* Drops every entry (after modules are reloaded, their states are stale). */
void ebb_state_cache_clear(ebb_state_cache *c, lua_State *L);
void ebb_state_cache_stats_get(const ebb_state_cache *c, ebb_state_cache_stats *out);

#endif
