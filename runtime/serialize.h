/*
 * serialize.h: the binary snapshot codec. Aggregate state is saved every N
 * events and loaded later instead of replaying them, so a snapshot must give
 * back a value the aggregate code cannot tell from the one that was saved:
 * integers stay integers, floats keep every bit (NaN, -0.0), strings keep
 * every byte, tables keep every key of every type, a table reachable twice
 * comes back as one table (cycles included), and the ebb.array / ebb.object
 * markers come back as markers. Unlike JSON (json.h) it is not meant to be
 * read by anything but ebb_deserialize, and its output is not deterministic
 * (table order follows lua_next).
 *
 * Nesting is limited to EBB_SERIALIZE_MAX_DEPTH tables on both sides.
 */
#ifndef EBB_SERIALIZE_H
#define EBB_SERIALIZE_H

#include <stddef.h>

#include <lua.h>

#include "buf.h"

#define EBB_SERIALIZE_MAX_DEPTH 200
/* The first byte of every encoding; a decoder refuses any other. */
#define EBB_SERIALIZE_VERSION 1

/* Appends a self-describing binary encoding of the value at idx to out.
 * Returns 0, or -1 with a message naming the path of the offending value,
 * the value itself being called "state" ("state.items[3].f: cannot
 * serialize a function"); on -1, out is back to its old length. Tables are
 * read raw (no metamethods run). Protected context required (may raise
 * memory errors); leaves the stack as it was. */
int ebb_serialize(lua_State *L, int idx, ebb_buf *out, char *err, size_t errlen);

/* Pushes the value encoded in data[0..len). Returns 0, or -1 with a message
 * (truncated or corrupt input, unknown tag, trailing bytes) and the stack as
 * it was. Never reads outside data[0..len). Protected context required. */
int ebb_deserialize(lua_State *L, const char *data, size_t len, char *err, size_t errlen);

/* Pushes the shared metatable {__jsontype = "object"} that marks decoded
 * tables as JSON objects (created once per state, kept in the registry). */
void ebb_serialize_push_object_mt(lua_State *L);

/* The Lua face, registered in `ebb.core` by lua_core.c:
 * serialize(v) -> string (raises on a value it cannot keep);
 * deserialize(s) -> v | nil, message. */
int ebb_serialize_lua(lua_State *L);
int ebb_deserialize_lua(lua_State *L);

#endif
