/*
 * valuepath.h: the path of a value being encoded, for error messages. It is
 * shared by the two encoders of Lua values, json.c and serialize.c, so that
 * both name the failing value the same way: the root ("data", "state"),
 * then ".name" for an identifier key, ["text"] for any other string key
 * (quotes and backslashes escaped, other bytes outside printable ASCII as
 * \xNN), [n] for an array index and for other scalar keys, and [<key>] for
 * the inside of a table used as a key.
 *
 * An encoder keeps one step per level while it descends and only turns the
 * steps into text when something fails, so the path costs nothing on the
 * way down. Internal to the runtime: the names are ebb__-prefixed.
 */
#ifndef EBB_VALUEPATH_H
#define EBB_VALUEPATH_H

#include <stddef.h>

#include <lua.h>

enum {
  EBB__STEP_INDEX, /* an array index */
  EBB__STEP_KEY,   /* a key of a table, live on the Lua stack */
  EBB__STEP_KEYOF  /* inside a table that is itself a key */
};

/* One step of the path from the root to the value being written. */
typedef struct {
  int kind;          /* EBB__STEP_* */
  int key;           /* EBB__STEP_KEY: stack index of the key (live while lua_next runs) */
  lua_Integer index; /* EBB__STEP_INDEX: the array index */
} ebb__path_step;

/* How one codec words its error messages around the path. */
typedef struct {
  const char *root;   /* the name of the whole value: "data", "state" */
  const char *prefix; /* text before the path: "cannot encode ", or "" */
  size_t reason_cap;  /* bytes kept of the formatted reason, at most 160 */
  size_t min_room;    /* bytes the path gets however small err is */
  int has_verb;       /* a reason starting "has " follows the path after a
                         space ("state.x has a metatable"), not after ": " */
} ebb__path_style;

/* Writes "<prefix><path>: <reason>" to err (errlen bytes) for the value
 * reached by steps[0..nsteps-1], the reason formatted from fmt. A long path
 * is cut (ending in "...") so that the reason always fits. Does nothing when
 * err is NULL or errlen is 0. Always returns -1, the encoders' failure
 * value, so that a caller can return its result. Each encoder wraps it in a
 * one-line enc_fail macro rather than a variadic function, which keeps the
 * printf format check at every call site. */
int ebb__path_fail(const ebb__path_style *st, lua_State *L, const ebb__path_step *steps,
                   int nsteps, char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));

#endif
