/*
 * json.h: ebb's own JSON <-> Lua value codec. It exists because ebb must keep
 * 64-bit integers exact through event data, commands and state, which
 * lua-cjson cannot (it turns every number into a double). This file owns the
 * mapping between JSON and Lua values:
 *
 *   JSON integer that fits int64   <-> Lua integer
 *   other JSON numbers             <-> Lua float (always written back with a
 *                                      '.' or an exponent, so it stays a float)
 *   string (strict UTF-8)          <-> string
 *   null                           <-> light userdata NULL (ebb_json_push_null)
 *   array                          <-> table whose metatable has __jsontype = "array"
 *                                      (decoded arrays share one such metatable)
 *   object                         <-> plain table with string keys
 *
 * Nesting is limited to EBB_JSON_MAX_DEPTH on both sides for a value (event
 * data, a state). A document that wraps such values (an export line
 * {"data": ...}, an append {"events": [{"data": ...}]}, an answer of the
 * daemon) is read with the _document functions, which allow
 * EBB_JSON_ENVELOPE_DEPTH more levels: whatever the encoder writes can be
 * read back inside them, and nothing deeper is stored.
 */
#ifndef EBB_JSON_H
#define EBB_JSON_H

#include <stddef.h>

#include <lua.h>

#include "buf.h"

#define EBB_JSON_MAX_DEPTH 256
#define EBB_JSON_ENVELOPE_DEPTH 3

/* Parses JSON text (RFC 8259, exactly one value, surrounding whitespace
 * allowed) and pushes the Lua value. Returns 0, or -1 with a message in err
 * (e.g. "invalid JSON at byte 17: expected ':'", the byte counted from 0) and
 * the stack as it was. Numbers too large for a double are refused. Must be
 * called in a protected Lua context (memory errors raise). */
int ebb_json_decode(lua_State *L, const char *text, size_t len, char *err, size_t errlen);

/* Appends the JSON text of the value at idx to out. Returns 0, or -1 with a
 * message naming the path of the offending value, the value itself being
 * called "data" (e.g. "cannot encode data.items[3]: sparse array",
 * "cannot encode data.x: function"); on -1, out is back to its old length.
 * Tables are read raw (no metamethods run). Protected context required.
 * Leaves the stack as it was. */
int ebb_json_encode(lua_State *L, int idx, ebb_buf *out, char *err, size_t errlen);

/* Checks that text is one valid JSON value without building anything (no Lua
 * needed): 0, or -1 with the same message ebb_json_decode would give. */
int ebb_json_validate(const char *text, size_t len, char *err, size_t errlen);
/* Both for a document: nesting up to EBB_JSON_MAX_DEPTH + EBB_JSON_ENVELOPE_DEPTH. */
int ebb_json_decode_document(lua_State *L, const char *text, size_t len, char *err,
                             size_t errlen);
int ebb_json_validate_document(const char *text, size_t len, char *err, size_t errlen);

/* Finds the top-level member `key` of a JSON object text and gives the exact
 * bytes of its value, so a caller can keep a value's text as it was written.
 * 1: found (the last occurrence), 0: absent, -1: text is not a valid object. */
int ebb_json_member(const char *text, size_t len, const char *key, const char **value,
                    size_t *value_len);

/* Calls fn with each top-level member of a JSON object text, in order: the
 * key's bytes as written (between the quotes; escaped: it holds a backslash,
 * so they are not the key itself) and the exact text of its value, until fn
 * returns non-zero (returned). 0 at the end, when the whole text was one
 * valid object (the checks of ebb_json_validate_document; fn may have run
 * for members before the fault); -1 if it was not. */
typedef int (*ebb_json_member_fn)(void *ud, const char *key, size_t key_len, int escaped,
                                  const char *value, size_t value_len);
int ebb_json_members(const char *text, size_t len, ebb_json_member_fn fn, void *ud);

/* The value of a JSON string literal text (such as a member ebb_json_member
 * found), unescaped into a malloc'd, NUL-terminated copy (*out_len: its length
 * when not NULL); NULL when text is not exactly one valid string, or without
 * memory. Needs no Lua. */
char *ebb_json_string_dup(const char *text, size_t len, size_t *out_len);

/* Calls fn with the exact text of each item of a JSON array text, in order,
 * until fn returns non-zero (returned). 0 at the end; -1 if text is not an array. */
int ebb_json_array_items(const char *text, size_t len,
                         int (*fn)(void *ud, const char *item, size_t item_len), void *ud);

/* The null sentinel: a light userdata holding NULL (the same value as cjson.null). */
void ebb_json_push_null(lua_State *L);

/* Pushes the shared metatable that marks tables as JSON arrays (created once
 * per state, kept in the registry). */
void ebb_json_push_array_mt(lua_State *L);

/* Pushes the shared marker metatable {__jsontype = kind} kept in the registry
 * under key, making it on first use. Scripts can reach such metatables through
 * getmetatable; one they changed (a __gc, a __mode) must not be put on new
 * tables, so a changed one is replaced by a fresh one. */
void ebb_json_push_marker_mt(lua_State *L, const void *key, const char *kind);

#endif
