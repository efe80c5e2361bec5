/*
 * serialize.c: the binary snapshot codec (see serialize.h). It owns the
 * snapshot format below, the shared ebb.object marker metatable, and the
 * Lua functions core.serialize / core.deserialize. Snapshots replace the
 * replay of an aggregate's events, so the one goal is that a decoded value
 * is indistinguishable from the encoded one to aggregate code; the second is
 * speed, since every Nth command pays for an encoding.
 *
 * Format (version 1). The first byte is EBB_SERIALIZE_VERSION, then exactly
 * one value; every value starts with a tag byte:
 *
 *   0x00 nil (top level only)       0x01 false        0x02 true
 *   0x03 ebb.null (light userdata NULL)
 *   0x04 integer: zigzag varint     0x05 float: 8 bytes, IEEE bits, LE
 *   0x06 string: varint length, bytes
 *   0x40-0x7F string of length tag-0x40 (0..63), bytes
 *   0x80-0xFF integer tag-0x80 (0..127)
 *   0x07 table, 0x08 table marked ebb.array, 0x09 table marked ebb.object:
 *        varint narr, varint nhash, narr values (the keys 1..narr, none
 *        nil), then nhash key/value pairs (neither nil)
 *   0x0A back-reference: varint n, the n-th table (from 1) in tag order
 *
 * Varints are LEB128 (7 bits a byte, low first, at most 10 bytes). Tables
 * are numbered as their tag is met, before their contents, so a table may
 * refer to itself or to any table enclosing it (cycles) as well as to any
 * earlier one (shared subtables).
 */
#include "serialize.h"

#include <lauxlib.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "sandbox.h"
#include "valuepath.h"

enum {
  T_NIL = 0x00,
  T_FALSE = 0x01,
  T_TRUE = 0x02,
  T_NULL = 0x03,
  T_INT = 0x04,
  T_FLOAT = 0x05,
  T_STR = 0x06,
  T_TABLE = 0x07,
  T_ARRAY = 0x08,
  T_OBJECT = 0x09,
  T_REF = 0x0A,
  T_SHORTSTR = 0x40, /* + length 0..63 */
  T_SMALLINT = 0x80, /* + value 0..127 */
};

#define SHORTSTR_MAX 63
#define SMALLINT_MAX 127
#define VARINT_MAX 10

/* The registry key of the object metatable: the address is unique to the
 * process, so no name can clash with another library's. */
static const char object_mt_key = 'o';

void ebb_serialize_push_object_mt(lua_State *L) {
  ebb_json_push_marker_mt(L, &object_mt_key, "object");
}

static inline size_t put_varint(unsigned char *p, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    p[n++] = (unsigned char)(v | 0x80);
    v >>= 7;
  }
  p[n++] = (unsigned char)v;
  return n;
}

/* Zigzag keeps small negative integers small: 0,-1,1,-2 -> 0,1,2,3. Done in
 * unsigned arithmetic so LUA_MININTEGER needs no special case. */
static inline uint64_t zigzag(lua_Integer v) {
  uint64_t u = (uint64_t)v << 1;
  return v < 0 ? ~u : u;
}

static inline lua_Integer unzigzag(uint64_t u) {
  return (lua_Integer)((u >> 1) ^ ((uint64_t)0 - (u & 1)));
}

/* ------------------------------------------------------------------ */
/* Encoder                                                             */

/* The tables already written, by address: an open-addressing hash set,
 * malloc'd. A Lua table keyed by the tables did the same at twice the cost
 * of the whole encoding. This is sound because, once ebb_serialize has set
 * up, the encoder calls nothing in Lua that allocates: no GC step can run,
 * so no finalizer can change the value graph or free a table and reuse its
 * address, and nothing can raise, so the set cannot leak. */
typedef struct {
  const void *p; /* NULL: empty */
  lua_Integer n; /* the table's number */
} ref_slot;

#define REFS_INITIAL 32 /* slots; a power of two */

typedef struct {
  lua_State *L;
  ebb_buf *out;
  char *err;
  size_t errlen;
  ref_slot *slots;
  size_t mask; /* number of slots - 1 */
  int amt;   /* stack index of the shared array metatable */
  int omt;   /* stack index of the shared object metatable */
  lua_Integer ntables;
  int64_t values;  /* values written since the last charge */
  size_t charged;  /* output length at the last charge */
  ebb__path_step path[EBB_SERIALIZE_MAX_DEPTH + 1]; /* see valuepath.h */
} encoder;

/* "has ..." reads as a sentence after the path: "state.x has a metatable". */
static const ebb__path_style snapshot_path_style = {"state", "", 160, 12, 1};

/* Sets err to "<path>: <reason>" (or "<path> <reason>" when the reason
 * starts with "has ") and returns -1. */
#define enc_fail(e, steps, ...) \
  ebb__path_fail(&snapshot_path_style, (e)->L, (e)->path, (steps), (e)->err, (e)->errlen, __VA_ARGS__)

/* A pointer to n writable bytes at the end of out (plus the NUL that
 * ebb_buf keeps), or NULL when memory ran out. The common case is one
 * comparison, not a call into buf.c. */
static inline unsigned char *room(encoder *e, size_t n) {
  ebb_buf *b = e->out;
  if (b->len + n >= b->cap && ebb_buf_reserve(b, n) != 0) return NULL;
  return (unsigned char *)b->data + b->len;
}

#define OOM(e, steps) enc_fail((e), (steps), "out of memory")

static int enc_table(encoder *e, int t, int depth);

/* Inside the sandbox a snapshot is work the instruction hook cannot see,
 * written outside the state's allocator. Tables are written once, but a
 * string is written at every place it is reached: twenty keys holding one
 * 40 MiB string make 800 MiB. So, as json.c's encoder does, the work is
 * charged to the running call (ebb_sandbox_spend, which allocates nothing
 * and cannot raise): values and bytes as instructions, bytes against the
 * memory cap. */
#define SER_VALUE_COST 8
#define SER_CHARGE_EVERY 1024
#define SER_CHARGE_BYTES ((size_t)64 * 1024)

static int charge(encoder *e, size_t ahead, int depth) {
  if (ebb_sandbox_spend_output(e->L, &e->values, SER_VALUE_COST, &e->charged, e->out->len, ahead) == 0)
    return 0;
  return enc_fail(e, depth, "stopped: the call ran out of its bounds (instruction budget or memory)");
}

static inline size_t ref_hash(const void *p) {
  uint64_t h = (uint64_t)(uintptr_t)p * UINT64_C(0x9E3779B97F4A7C15);
  return (size_t)(h >> 32);
}

/* The slot of p: the one holding it, or the empty one where it belongs. */
static inline ref_slot *ref_find(encoder *e, const void *p) {
  size_t i = ref_hash(p) & e->mask;
  while (e->slots[i].p != NULL && e->slots[i].p != p) i = (i + 1) & e->mask;
  return &e->slots[i];
}

/* Makes room for one more table, keeping the load at most one half.
 * 0, or -1 when memory ran out. */
static int ref_grow(encoder *e) {
  size_t cap = e->mask + 1;
  if ((size_t)e->ntables + 1 <= cap / 2) return 0;
  if (cap > ((size_t)-1) / (4 * sizeof(ref_slot))) return -1;
  ref_slot *old = e->slots;
  ref_slot *slots = calloc(2 * cap, sizeof *slots);
  if (slots == NULL) return -1;
  e->slots = slots;
  e->mask = 2 * cap - 1;
  for (size_t i = 0; i < cap; i++)
    if (old[i].p != NULL) *ref_find(e, old[i].p) = old[i];
  free(old);
  return 0;
}

/* What a value of this type is called in a refusal. */
static const char *a_type(lua_State *L, int idx) {
  switch (lua_type(L, idx)) {
    case LUA_TFUNCTION: return "a function";
    case LUA_TTHREAD: return "a thread (coroutine)";
    case LUA_TLIGHTUSERDATA: return "a light userdata (other than ebb.null)";
    default: return "a userdata";
  }
}

static int enc_value(encoder *e, int idx, int depth) {
  lua_State *L = e->L;
  unsigned char *p;
  if ((++e->values >= SER_CHARGE_EVERY || e->out->len - e->charged > SER_CHARGE_BYTES) && charge(e, 0, depth) != 0)
    return -1;
  switch (lua_type(L, idx)) {
    case LUA_TNIL:
    case LUA_TBOOLEAN:
      if ((p = room(e, 1)) == NULL) return OOM(e, depth);
      *p = lua_isnil(L, idx) ? T_NIL : lua_toboolean(L, idx) ? T_TRUE : T_FALSE;
      e->out->len += 1;
      return 0;
    case LUA_TNUMBER:
      if ((p = room(e, 1 + VARINT_MAX)) == NULL) return OOM(e, depth);
      if (lua_isinteger(L, idx)) {
        lua_Integer v = lua_tointeger(L, idx);
        if (v >= 0 && v <= SMALLINT_MAX) {
          *p = (unsigned char)(T_SMALLINT + v);
          e->out->len += 1;
        } else {
          *p = T_INT;
          e->out->len += 1 + put_varint(p + 1, zigzag(v));
        }
      } else {
        double x = (double)lua_tonumber(L, idx);
        uint64_t u;
        memcpy(&u, &x, sizeof u);
        *p = T_FLOAT;
        for (int i = 0; i < 8; i++) p[1 + i] = (unsigned char)(u >> (8 * i));
        e->out->len += 9;
      }
      return 0;
    case LUA_TSTRING: {
      size_t n;
      const char *s = lua_tolstring(L, idx, &n);
      if (n > SER_CHARGE_BYTES && charge(e, n, depth) != 0) return -1;
      if ((p = room(e, 1 + VARINT_MAX + n)) == NULL) return OOM(e, depth);
      if (n <= SHORTSTR_MAX) {
        *p++ = (unsigned char)(T_SHORTSTR + n);
      } else {
        *p = T_STR;
        p += 1 + put_varint(p + 1, n);
      }
      memcpy(p, s, n);
      e->out->len = (size_t)((char *)p + n - e->out->data);
      return 0;
    }
    case LUA_TTABLE: return enc_table(e, idx, depth);
    case LUA_TLIGHTUSERDATA:
      if (lua_touserdata(L, idx) == NULL) {
        if ((p = room(e, 1)) == NULL) return OOM(e, depth);
        *p = T_NULL;
        e->out->len += 1;
        return 0;
      }
      /* fall through */
    default: return enc_fail(e, depth, "cannot serialize %s", a_type(L, idx));
  }
}

/* The tag of a table whose metatable (at the top of the stack, not the
 * shared ones) is a marker all the same: its only field is __jsontype =
 * "array" or "object", so nothing but the marker is lost by decoding it as
 * the shared one. -1 for any other metatable. Leaves the stack as it was. */
static int marker_tag(lua_State *L) {
  int tag = -1;
  if (lua_getmetatable(L, -1)) {
    lua_pop(L, 1);
    return -1;
  }
  lua_pushnil(L);
  if (!lua_next(L, -2)) return -1;
  size_t kn, vn;
  if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING) {
    const char *k = lua_tolstring(L, -2, &kn), *v = lua_tolstring(L, -1, &vn);
    if (kn == 10 && memcmp(k, "__jsontype", 10) == 0) {
      if (vn == 5 && memcmp(v, "array", 5) == 0) tag = T_ARRAY;
      else if (vn == 6 && memcmp(v, "object", 6) == 0) tag = T_OBJECT;
    }
  }
  lua_pop(L, 1);
  if (lua_next(L, -2)) {
    lua_pop(L, 2);
    return -1;
  }
  return tag;
}

/* Writes the key at k (live on the stack) of the table at path `depth`. */
static int enc_key(encoder *e, int k, int depth) {
  lua_State *L = e->L;
  switch (lua_type(L, k)) {
    case LUA_TTABLE:
      e->path[depth].kind = EBB__STEP_KEYOF;
      return enc_table(e, k, depth + 1);
    case LUA_TFUNCTION:
    case LUA_TTHREAD:
    case LUA_TUSERDATA: return enc_fail(e, depth, "cannot serialize %s key", a_type(L, k));
    case LUA_TLIGHTUSERDATA:
      if (lua_touserdata(L, k) != NULL)
        return enc_fail(e, depth, "cannot serialize %s key", a_type(L, k));
      /* fall through */
    default: return enc_value(e, k, depth); /* a scalar: cannot fail but for memory */
  }
}

static int enc_table(encoder *e, int t, int depth) {
  lua_State *L = e->L;
  unsigned char *p;

  /* Seen before: a back-reference keeps it one table (and ends cycles). */
  const void *addr = lua_topointer(L, t);
  ref_slot *slot = ref_find(e, addr);
  if (slot->p != NULL) {
    if ((p = room(e, 1 + VARINT_MAX)) == NULL) return OOM(e, depth);
    *p = T_REF;
    e->out->len += 1 + put_varint(p + 1, (uint64_t)slot->n);
    return 0;
  }
  if (depth >= EBB_SERIALIZE_MAX_DEPTH)
    return enc_fail(e, depth, "nested deeper than %d tables", EBB_SERIALIZE_MAX_DEPTH);
  if (!lua_checkstack(L, 8)) return enc_fail(e, depth, "Lua stack overflow");

  int tag = T_TABLE;
  if (lua_getmetatable(L, t)) {
    if (lua_rawequal(L, -1, e->amt)) tag = T_ARRAY;
    else if (lua_rawequal(L, -1, e->omt)) tag = T_OBJECT;
    else tag = marker_tag(L);
    lua_pop(L, 1);
    if (tag < 0)
      return enc_fail(e, depth,
                      "has a metatable; snapshots keep only plain tables and ebb.array/ebb.object markers");
  }

  /* Numbered before its contents, as the decoder numbers it. */
  if (ref_grow(e) != 0) return OOM(e, depth);
  slot = ref_find(e, addr);
  slot->p = addr;
  slot->n = ++e->ntables;

  /* Two bytes are kept for narr and nhash, which are known only at the
   * end; the contents move up in the rare case that they need more. */
  if ((p = room(e, 3)) == NULL) return OOM(e, depth);
  p[0] = (unsigned char)tag;
  size_t hdr = e->out->len + 1;
  e->out->len += 3;

  /* The array part: 1, 2, ... up to the first nil. */
  lua_Integer narr = 0;
  int v = lua_gettop(L) + 1;
  e->path[depth].kind = EBB__STEP_INDEX;
  while (lua_rawgeti(L, t, narr + 1) != LUA_TNIL) {
    e->path[depth].index = ++narr;
    if (enc_value(e, v, depth + 1) != 0) return -1;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);

  /* The rest: every key but 1..narr. */
  uint64_t nhash = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    if (lua_isinteger(L, -2)) {
      lua_Integer k = lua_tointeger(L, -2);
      if (k >= 1 && k <= narr) {
        lua_pop(L, 1);
        continue;
      }
    }
    if (enc_key(e, v, depth) != 0) return -1;
    e->path[depth].kind = EBB__STEP_KEY;
    e->path[depth].key = v;
    if (enc_value(e, v + 1, depth + 1) != 0) return -1;
    lua_pop(L, 1);
    nhash++;
  }

  unsigned char sizes[2 * VARINT_MAX];
  size_t k = put_varint(sizes, (uint64_t)narr);
  k += put_varint(sizes + k, nhash);
  if (k > 2) {
    if (room(e, k - 2) == NULL) return OOM(e, depth);
    char *d = e->out->data;
    memmove(d + hdr + k, d + hdr + 2, e->out->len - hdr - 2);
    e->out->len += k - 2;
  }
  memcpy(e->out->data + hdr, sizes, k);
  return 0;
}

int ebb_serialize(lua_State *L, int idx, ebb_buf *out, char *err, size_t errlen) {
  encoder e;
  int base = lua_gettop(L);
  size_t oldlen = out->len;
  idx = lua_absindex(L, idx);
  if (err && errlen) err[0] = '\0';
  e.L = L;
  e.out = out;
  e.err = err;
  e.errlen = errlen;
  e.ntables = 0;
  e.values = 0;
  e.charged = out->len;
  if (!lua_checkstack(L, 8)) return enc_fail(&e, 0, "Lua stack overflow");
  /* The only Lua allocations: the marker metatables, made once per state. */
  ebb_json_push_array_mt(L);
  e.amt = lua_gettop(L);
  ebb_serialize_push_object_mt(L);
  e.omt = lua_gettop(L);

  e.slots = calloc(REFS_INITIAL, sizeof *e.slots);
  e.mask = REFS_INITIAL - 1;
  unsigned char *p = e.slots ? room(&e, 1) : NULL;
  int rc = p == NULL ? OOM(&e, 0) : 0;
  if (rc == 0) {
    *p = EBB_SERIALIZE_VERSION;
    out->len++;
    rc = enc_value(&e, idx, 0);
  }
  if (rc == 0) rc = charge(&e, 0, 0);
  free(e.slots);
  if (rc != 0) out->len = oldlen;
  if (out->data && !out->oom) out->data[out->len] = '\0';
  lua_settop(L, base);
  return rc;
}

/* ------------------------------------------------------------------ */
/* Decoder                                                             */

typedef struct {
  lua_State *L;
  const unsigned char *start, *p, *end;
  char *err;
  size_t errlen;
  int refs; /* stack index of the array of tables made so far, by number */
  lua_Integer ntables;
  /* Bytes not yet claimed by a table's declared size. Each array element
   * takes at least one byte of input and each pair two, so a valid input
   * never declares more than it holds; a corrupt one cannot make us
   * allocate far more than its own length. */
  size_t budget;
} decoder;

static int dec_fail(decoder *d, const char *fmt, ...) {
  if (d->err == NULL || d->errlen == 0) return -1;
  char reason[128];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(reason, sizeof reason, fmt, ap);
  va_end(ap);
  snprintf(d->err, d->errlen, "corrupt snapshot at byte %zu: %s", (size_t)(d->p - d->start), reason);
  return -1;
}

static int get_varint(decoder *d, uint64_t *out) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (d->p >= d->end) return dec_fail(d, "truncated");
    unsigned c = *d->p++;
    if (shift == 63 && c > 1) return dec_fail(d, "varint overflows 64 bits");
    v |= (uint64_t)(c & 0x7F) << shift;
    if (c < 0x80) {
      *out = v;
      return 0;
    }
  }
  return dec_fail(d, "varint overflows 64 bits");
}

static int dec_table(decoder *d, int tag, int depth);

/* Pushes one value (nil included: the caller decides where nil may be). */
static int dec_value(decoder *d, int depth) {
  lua_State *L = d->L;
  if (d->p >= d->end) return dec_fail(d, "truncated");
  unsigned c = *d->p++;
  if (c >= T_SMALLINT) {
    lua_pushinteger(L, (lua_Integer)(c - T_SMALLINT));
    return 0;
  }
  if (c >= T_SHORTSTR) {
    size_t n = c - T_SHORTSTR;
    if ((size_t)(d->end - d->p) < n) return dec_fail(d, "truncated string");
    lua_pushlstring(L, (const char *)d->p, n);
    d->p += n;
    return 0;
  }
  uint64_t u = 0;
  switch (c) {
    case T_NIL: lua_pushnil(L); return 0;
    case T_FALSE: lua_pushboolean(L, 0); return 0;
    case T_TRUE: lua_pushboolean(L, 1); return 0;
    case T_NULL: ebb_json_push_null(L); return 0;
    case T_INT:
      if (get_varint(d, &u) != 0) return -1;
      lua_pushinteger(L, unzigzag(u));
      return 0;
    case T_FLOAT: {
      if (d->end - d->p < 8) return dec_fail(d, "truncated float");
      double x;
      u = 0;
      for (int i = 0; i < 8; i++) u |= (uint64_t)d->p[i] << (8 * i);
      memcpy(&x, &u, sizeof x);
      d->p += 8;
      lua_pushnumber(L, (lua_Number)x);
      return 0;
    }
    case T_STR:
      if (get_varint(d, &u) != 0) return -1;
      if ((uint64_t)(d->end - d->p) < u) return dec_fail(d, "truncated string");
      lua_pushlstring(L, (const char *)d->p, (size_t)u);
      d->p += u;
      return 0;
    case T_TABLE:
    case T_ARRAY:
    case T_OBJECT: return dec_table(d, (int)c, depth);
    case T_REF:
      if (get_varint(d, &u) != 0) return -1;
      if (u < 1 || u > (uint64_t)d->ntables) return dec_fail(d, "back-reference to unknown table %llu", (unsigned long long)u);
      lua_rawgeti(L, d->refs, (lua_Integer)u);
      return 0;
    default: d->p--; return dec_fail(d, "unknown tag 0x%02x", c);
  }
}

static int dec_table(decoder *d, int tag, int depth) {
  lua_State *L = d->L;
  uint64_t narr = 0, nhash = 0;
  if (depth >= EBB_SERIALIZE_MAX_DEPTH)
    return dec_fail(d, "nested deeper than %d tables", EBB_SERIALIZE_MAX_DEPTH);
  if (!lua_checkstack(L, 6)) return dec_fail(d, "Lua stack overflow");
  if (get_varint(d, &narr) != 0 || get_varint(d, &nhash) != 0) return -1;
  if (narr > d->budget || nhash > (d->budget - narr) / 2 || narr > INT_MAX || nhash > INT_MAX)
    return dec_fail(d, "table sizes exceed the input");
  d->budget -= narr + 2 * nhash;

  lua_createtable(L, (int)narr, (int)nhash);
  int t = lua_gettop(L);
  if (tag != T_TABLE) {
    if (tag == T_ARRAY) ebb_json_push_array_mt(L);
    else ebb_serialize_push_object_mt(L);
    lua_setmetatable(L, t);
  }
  lua_pushvalue(L, t);
  lua_rawseti(L, d->refs, ++d->ntables);

  for (uint64_t i = 1; i <= narr; i++) {
    if (dec_value(d, depth + 1) != 0) return -1;
    if (lua_isnil(L, -1)) return dec_fail(d, "nil in a table");
    lua_rawseti(L, t, (lua_Integer)i);
  }
  for (uint64_t i = 0; i < nhash; i++) {
    if (dec_value(d, depth + 1) != 0) return -1;
    if (lua_isnil(L, -1)) return dec_fail(d, "nil table key");
    if (lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1)) {
      lua_Number x = lua_tonumber(L, -1);
      if (x != x) return dec_fail(d, "NaN table key");
    }
    if (dec_value(d, depth + 1) != 0) return -1;
    if (lua_isnil(L, -1)) return dec_fail(d, "nil in a table");
    lua_rawset(L, t);
  }
  return 0;
}

int ebb_deserialize(lua_State *L, const char *data, size_t len, char *err, size_t errlen) {
  decoder d;
  int base = lua_gettop(L);
  if (err && errlen) err[0] = '\0';
  d.L = L;
  d.start = d.p = (const unsigned char *)data;
  d.end = d.start + len;
  d.err = err;
  d.errlen = errlen;
  d.ntables = 0;
  d.budget = len;
  if (len == 0) return dec_fail(&d, "empty");
  if (d.p[0] != EBB_SERIALIZE_VERSION) return dec_fail(&d, "unknown format version %u", (unsigned)d.p[0]);
  d.p++;
  if (!lua_checkstack(L, 4)) return dec_fail(&d, "Lua stack overflow");
  lua_newtable(L);
  d.refs = lua_gettop(L);
  int rc = dec_value(&d, 0);
  if (rc == 0 && d.p != d.end) rc = dec_fail(&d, "%zu trailing bytes", (size_t)(d.end - d.p));
  if (rc != 0) {
    lua_settop(L, base);
    return -1;
  }
  lua_replace(L, d.refs); /* the value takes the reference array's slot */
  return 0;
}

/* ------------------------------------------------------------------ */
/* Lua face                                                            */

/* serialize writes into an ebb_buf held by a full userdata, so that a
 * memory error raised in the middle of encoding cannot leak it (the __gc
 * frees it). */
static int buf_gc(lua_State *L) {
  ebb_buf_free(lua_touserdata(L, 1));
  return 0;
}

/* serialize(v) -> string; raises with the path of a value it cannot keep */
int ebb_serialize_lua(lua_State *L) {
  char err[512];
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  ebb_buf *b = lua_newuserdatauv(L, sizeof *b, 0);
  ebb_buf_init(b);
  if (luaL_newmetatable(L, "ebb.serialize.buf")) {
    lua_pushcfunction(L, buf_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  int rc = ebb_serialize(L, 1, b, err, sizeof err);
  if (rc == 0) lua_pushlstring(L, b->data, b->len);
  ebb_buf_free(b);
  if (rc != 0) {
    lua_pushstring(L, err);
    return lua_error(L);
  }
  return 1;
}

/* deserialize(s) -> value | nil, message */
int ebb_deserialize_lua(lua_State *L) {
  char err[256];
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  if (ebb_deserialize(L, s, len, err, sizeof err) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  return 1;
}
