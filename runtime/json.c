/*
 * json.c: the JSON codec (see json.h). It owns parsing (to Lua values, or to
 * nothing when only validating), encoding Lua values, strict UTF-8 checking
 * in both directions, the null sentinel and the shared array metatable.
 *
 * Decoding and validation are one recursive-descent parser: with L == NULL
 * it builds nothing, so validation cannot drift from what decode accepts.
 * Strings without escapes are pushed straight from the input; strings with
 * escapes are first checked in one pass, then unescaped into a luaL_Buffer of
 * the raw length (unescaping never grows text). Encoding reads tables raw,
 * so no Lua code runs while a value is being written.
 */
#include "json.h"

#include <locale.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "sandbox.h"
#include "valuepath.h"

/* ------------------------------------------------------------------ */
/* UTF-8 and byte classes                                              */

/* How a byte inside a JSON string is handled: 0 copied as is (printable
 * ASCII), 1 the closing quote, 2 an escape, 3 a control character (an error
 * when decoding, escaped when encoding), 4 the start of a multi-byte UTF-8
 * sequence (or an invalid byte) to be checked. One table lookup per byte
 * keeps the common case to a single compare. */
static const unsigned char str_class[256] = {
    [0x00 ... 0x1f] = 3, ['"'] = 1, ['\\'] = 2, [0x80 ... 0xff] = 4,
};

/* Writes code point cp (valid, not a surrogate) as UTF-8; returns the length. */
static size_t utf8_put(char *out, unsigned long cp) {
  if (cp < 0x80) {
    out[0] = (char)cp;
    return 1;
  }
  if (cp < 0x800) {
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    out[0] = (char)(0xE0 | (cp >> 12));
    out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
  }
  out[0] = (char)(0xF0 | (cp >> 18));
  out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
  out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
  out[3] = (char)(0x80 | (cp & 0x3F));
  return 4;
}

static int hexval(unsigned c) {
  if (c - '0' < 10) return (int)(c - '0');
  c |= 0x20; /* ASCII lower case */
  if (c - 'a' < 6) return (int)(c - 'a' + 10);
  return -1;
}

/* Reads the 4 hex digits at p (bounds checked); -1 if they are not there. */
static long hex4(const unsigned char *p, const unsigned char *end) {
  if (end - p < 4) return -1;
  long v = 0;
  for (int i = 0; i < 4; i++) {
    int h = hexval(p[i]);
    if (h < 0) return -1;
    v = v << 4 | h;
  }
  return v;
}

/* ------------------------------------------------------------------ */
/* Numbers                                                             */

/* Converts a number literal already checked against the JSON grammar with
 * strtod. strtod follows the C locale's decimal point, which ebb does not
 * control (an embedding program may call setlocale), so when the first try
 * stops short the '.' is swapped for the locale's point and tried again, as
 * Lua's own lua_stringtonumber does. Long literals need a scratch copy: from
 * Lua's heap when L is given (so a failure raises a memory error and nothing
 * leaks), else from malloc. Returns 0, or -1 (unconvertible or no memory). */
static int str2d(lua_State *L, const char *s, size_t n, double *out) {
  char small[128];
  const char *dp = ".";
  size_t dpl = 1;
  for (int attempt = 0; attempt < 2; attempt++) {
    size_t need = n + dpl + 1;
    char *buf = small;
    if (need > sizeof small) {
      buf = L ? lua_newuserdatauv(L, need, 0) : malloc(need);
      if (buf == NULL) return -1;
    }
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
      if (s[i] == '.') {
        memcpy(buf + m, dp, dpl);
        m += dpl;
      } else {
        buf[m++] = s[i];
      }
    }
    buf[m] = '\0';
    char *e;
    *out = strtod(buf, &e);
    int ok = e == buf + m;
    if (buf != small) {
      if (L) lua_pop(L, 1);
      else free(buf);
    }
    if (ok) return 0;
    if (attempt == 0) {
      dp = localeconv()->decimal_point;
      dpl = strlen(dp);
      if (memchr(s, '.', n) == NULL || dpl == 0 || (dpl == 1 && dp[0] == '.')) return -1;
    }
  }
  return -1;
}

/* ------------------------------------------------------------------ */
/* Parser (decode and validate)                                        */

typedef struct {
  lua_State *L; /* NULL: validate only, push nothing */
  const unsigned char *start, *p, *end;
  char *err;
  size_t errlen;
  int mt; /* stack index of the array metatable (decode only) */
  int max_depth; /* arrays and objects that may enclose each other */
} parser;

/* A document may wrap event data (at most EBB_JSON_MAX_DEPTH deep, as the
 * encoder writes it) in an envelope: an export line, an append's body. */
#define DOCUMENT_DEPTH (EBB_JSON_MAX_DEPTH + EBB_JSON_ENVELOPE_DEPTH)


static int parse_fail(parser *ps, const unsigned char *at, const char *what) {
  if (ps->err && ps->errlen)
    snprintf(ps->err, ps->errlen, "invalid JSON at byte %zu: %s", (size_t)(at - ps->start), what);
  return -1;
}

static int parse_too_deep(parser *ps) {
  char what[96];
  if (ps->max_depth == DOCUMENT_DEPTH)
    snprintf(what, sizeof what, "nesting deeper than %d (%d for a value, inside %d of envelope)",
             DOCUMENT_DEPTH, EBB_JSON_MAX_DEPTH, EBB_JSON_ENVELOPE_DEPTH);
  else
    snprintf(what, sizeof what, "nesting deeper than %d", ps->max_depth);
  return parse_fail(ps, ps->p, what);
}

/* Names the byte at `at`, which is where a value or delimiter should be. */
static int parse_unexpected(parser *ps, const unsigned char *at) {
  char what[48];
  if (at >= ps->end) return parse_fail(ps, at, "unexpected end of input");
  if (*at >= 0x20 && *at < 0x7F) snprintf(what, sizeof what, "unexpected character '%c'", *at);
  else snprintf(what, sizeof what, "unexpected byte 0x%02x", *at);
  return parse_fail(ps, at, what);
}

static inline void skip_ws(parser *ps) {
  const unsigned char *p = ps->p, *end = ps->end;
  while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
  ps->p = p;
}

/* Unescapes the checked string body [s, q) into out (room for q - s bytes:
 * unescaping never lengthens); returns the length. */
static size_t unescape(char *out, const unsigned char *s, const unsigned char *q) {
  size_t n = 0;
  while (s < q) {
    const unsigned char *bs = memchr(s, '\\', (size_t)(q - s));
    if (bs == NULL) bs = q;
    memcpy(out + n, s, (size_t)(bs - s));
    n += (size_t)(bs - s);
    if (bs == q) break;
    s = bs + 2;
    switch (bs[1]) {
      case 'b': out[n++] = '\b'; break;
      case 'f': out[n++] = '\f'; break;
      case 'n': out[n++] = '\n'; break;
      case 'r': out[n++] = '\r'; break;
      case 't': out[n++] = '\t'; break;
      case 'u': {
        unsigned long cp = (unsigned long)hex4(s, q);
        s += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF) { /* the scan checked the low half follows */
          cp = 0x10000 + ((cp - 0xD800) << 10) + ((unsigned long)hex4(s + 2, q) - 0xDC00);
          s += 6;
        }
        n += utf8_put(out + n, cp);
        break;
      }
      default: out[n++] = (char)bs[1]; break; /* '"', '\\', '/' */
    }
  }
  return n;
}

/* The same into a new Lua string. Kept out of line so the luaL_Buffer (about
 * 1 KiB) is not part of every recursive frame of the parser. */
static __attribute__((noinline)) void push_unescaped(lua_State *L, const unsigned char *s,
                                                    const unsigned char *q) {
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, (size_t)(q - s));
  luaL_pushresultsize(&b, unescape(out, s, q));
}

/* ps->p is at the opening quote. Checks the whole string first (escapes,
 * UTF-8, control characters) so that unescaping needs no error paths. */
static int parse_string(parser *ps) {
  const unsigned char *s = ps->p + 1, *q = s, *end = ps->end;
  int escaped = 0;
  for (;;) {
    while (q < end && str_class[*q] == 0) q++;
    if (q == end) return parse_fail(ps, ps->p, "unterminated string");
    switch (str_class[*q]) {
      case 1: goto closed;
      case 2: {
        const unsigned char *esc = q;
        escaped = 1;
        if (++q == end) return parse_fail(ps, ps->p, "unterminated string");
        switch (*q) {
          case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
            q++;
            break;
          case 'u': {
            long cp = hex4(q + 1, end);
            if (cp < 0) return parse_fail(ps, esc, "invalid \\u escape");
            q += 5;
            if (cp >= 0xDC00 && cp <= 0xDFFF)
              return parse_fail(ps, esc, "lone surrogate in \\u escape");
            if (cp >= 0xD800 && cp <= 0xDBFF) {
              long lo = (end - q >= 6 && q[0] == '\\' && q[1] == 'u') ? hex4(q + 2, end) : -1;
              if (lo < 0xDC00 || lo > 0xDFFF)
                return parse_fail(ps, esc, "lone surrogate in \\u escape");
              q += 6;
            }
            break;
          }
          default: return parse_fail(ps, esc, "invalid escape in string");
        }
        break;
      }
      case 3: return parse_fail(ps, q, "control character in string");
      default: {
        size_t n = ebb_utf8_seq(q, (size_t)(end - q));
        if (n == 0) return parse_fail(ps, q, "invalid UTF-8 in string");
        q += n;
      }
    }
  }
closed:
  ps->p = q + 1;
  if (ps->L) {
    if (escaped) push_unescaped(ps->L, s, q);
    else lua_pushlstring(ps->L, (const char *)s, (size_t)(q - s));
  }
  return 0;
}

#define IS_DIGIT(c) ((unsigned)((c) - '0') < 10)

/* Powers of ten that are exact doubles (10^22 is the largest). */
static const double pow10_exact[] = {
    1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};
#define MAX_EXACT_INT 9007199254740992.0 /* 2^53 */

static int parse_number(parser *ps) {
  const unsigned char *s = ps->p, *q = s, *end = ps->end;
  int neg = 0, isfloat = 0, big = 0;
  uint64_t u = 0;     /* all the digits read so far, while they fit */
  long scale = 0;     /* the value is u * 10^scale (with the exponent below) */
  if (*q == '-') {
    neg = 1;
    q++;
  }
  if (q == end || !IS_DIGIT(*q)) return parse_fail(ps, s, "invalid number");
  if (*q == '0') {
    if (++q < end && IS_DIGIT(*q)) return parse_fail(ps, s, "invalid number (leading zero)");
  } else {
    for (; q < end && IS_DIGIT(*q); q++) {
      unsigned d = (unsigned)(*q - '0');
      if (u > (UINT64_MAX - d) / 10) big = 1;
      else u = u * 10 + d;
    }
  }
  if (q < end && *q == '.') {
    if (++q == end || !IS_DIGIT(*q)) return parse_fail(ps, s, "invalid number");
    for (; q < end && IS_DIGIT(*q); q++) {
      unsigned d = (unsigned)(*q - '0');
      if (u > (UINT64_MAX - d) / 10) big = 1; /* only the slow path below then */
      else if (!big) {
        u = u * 10 + d;
        scale--;
      }
    }
    isfloat = 1;
  }
  if (q < end && (*q == 'e' || *q == 'E')) {
    int eneg = 0;
    long ev = 0;
    if (++q < end && (*q == '+' || *q == '-')) eneg = *q++ == '-';
    if (q == end || !IS_DIGIT(*q)) return parse_fail(ps, s, "invalid number");
    for (; q < end && IS_DIGIT(*q); q++)
      if (ev < 100000) ev = ev * 10 + (*q - '0'); /* beyond this only strtod decides */
    scale += eneg ? -ev : ev;
    isfloat = 1;
  }
  ps->p = q;
  if (!isfloat && !big) {
    /* exact integers, including LUA_MININTEGER whose magnitude is MAX + 1 */
    if (!neg && u <= (uint64_t)LUA_MAXINTEGER) {
      if (ps->L) lua_pushinteger(ps->L, (lua_Integer)u);
      return 0;
    }
    if (neg && u <= (uint64_t)LUA_MAXINTEGER + 1) {
      if (ps->L)
        lua_pushinteger(ps->L, u == (uint64_t)LUA_MAXINTEGER + 1 ? LUA_MININTEGER : -(lua_Integer)u);
      return 0;
    }
  }
  double d;
  if (!big && u <= (uint64_t)MAX_EXACT_INT && scale >= -22 && scale <= 22) {
    /* Clinger's fast path: u and 10^|scale| are exact doubles, so one IEEE
     * multiplication or division gives the correctly rounded value, as
     * strtod would, without its cost or its locale. */
    d = scale < 0 ? (double)u / pow10_exact[-scale] : (double)u * pow10_exact[scale];
    if (neg) d = -d;
  } else {
    if (str2d(ps->L, (const char *)s, (size_t)(q - s), &d) != 0)
      return parse_fail(ps, s, "number cannot be converted");
    /* A literal beyond double range would become inf, which could never be
     * written back as JSON, so it is refused here rather than stored. */
    if (isinf(d)) return parse_fail(ps, s, "number out of range");
  }
  if (ps->L) lua_pushnumber(ps->L, d);
  return 0;
}

static int parse_value(parser *ps, int depth);

static int parse_literal(parser *ps, const char *word, size_t n) {
  if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0) {
    char what[48]; /* the longest word is "false" */
    snprintf(what, sizeof what, "invalid literal (expected %s)", word);
    return parse_fail(ps, ps->p, what);
  }
  ps->p += n;
  return 0;
}

static int parse_object(parser *ps, int depth) {
  lua_State *L = ps->L;
  if (depth > ps->max_depth) return parse_too_deep(ps);
  ps->p++;
  if (L) {
    luaL_checkstack(L, 4, "JSON nesting");
    lua_createtable(L, 0, 0);
  }
  skip_ws(ps);
  if (ps->p < ps->end && *ps->p == '}') {
    ps->p++;
    return 0;
  }
  for (;;) {
    if (ps->p == ps->end) return parse_fail(ps, ps->p, "unexpected end of input");
    if (*ps->p != '"') return parse_fail(ps, ps->p, "expected a string key");
    if (parse_string(ps) != 0) return -1;
    skip_ws(ps);
    if (ps->p == ps->end || *ps->p != ':') return parse_fail(ps, ps->p, "expected ':'");
    ps->p++;
    if (parse_value(ps, depth) != 0) return -1;
    if (L) lua_rawset(L, -3); /* a repeated key overwrites: the last one wins */
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ',') {
      ps->p++;
      skip_ws(ps);
      continue;
    }
    if (ps->p < ps->end && *ps->p == '}') {
      ps->p++;
      return 0;
    }
    return parse_fail(ps, ps->p, "expected ',' or '}'");
  }
}

static int parse_array(parser *ps, int depth) {
  lua_State *L = ps->L;
  if (depth > ps->max_depth) return parse_too_deep(ps);
  ps->p++;
  if (L) {
    luaL_checkstack(L, 4, "JSON nesting");
    lua_createtable(L, 0, 0);
    lua_pushvalue(L, ps->mt);
    lua_setmetatable(L, -2);
  }
  skip_ws(ps);
  if (ps->p < ps->end && *ps->p == ']') {
    ps->p++;
    return 0;
  }
  for (lua_Integer n = 1;; n++) {
    if (parse_value(ps, depth) != 0) return -1;
    if (L) lua_rawseti(L, -2, n);
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ',') {
      ps->p++;
      continue;
    }
    if (ps->p < ps->end && *ps->p == ']') {
      ps->p++;
      return 0;
    }
    return parse_fail(ps, ps->p, "expected ',' or ']'");
  }
}

/* depth: how many arrays and objects enclose the value. */
static int parse_value(parser *ps, int depth) {
  skip_ws(ps);
  if (ps->p == ps->end) return parse_fail(ps, ps->p, "unexpected end of input");
  switch (*ps->p) {
    case '{': return parse_object(ps, depth + 1);
    case '[': return parse_array(ps, depth + 1);
    case '"': return parse_string(ps);
    case 't':
      if (parse_literal(ps, "true", 4) != 0) return -1;
      if (ps->L) lua_pushboolean(ps->L, 1);
      return 0;
    case 'f':
      if (parse_literal(ps, "false", 5) != 0) return -1;
      if (ps->L) lua_pushboolean(ps->L, 0);
      return 0;
    case 'n':
      if (parse_literal(ps, "null", 4) != 0) return -1;
      if (ps->L) lua_pushlightuserdata(ps->L, NULL);
      return 0;
    case '-': case '0': case '1': case '2': case '3': case '4':
    case '5': case '6': case '7': case '8': case '9':
      return parse_number(ps);
    default: return parse_unexpected(ps, ps->p);
  }
}

static int parse_document(parser *ps) {
  if (parse_value(ps, 0) != 0) return -1;
  skip_ws(ps);
  if (ps->p != ps->end) return parse_fail(ps, ps->p, "unexpected data after the value");
  return 0;
}

static int decode(lua_State *L, const char *text, size_t len, char *err, size_t errlen,
                  int max_depth) {
  int base = lua_gettop(L);
  luaL_checkstack(L, 6, "JSON");
  ebb_json_push_array_mt(L);
  parser ps = {L, (const unsigned char *)text, (const unsigned char *)text,
               (const unsigned char *)text + len, err, errlen, base + 1, max_depth};
  if (parse_document(&ps) != 0) {
    lua_settop(L, base);
    return -1;
  }
  lua_replace(L, base + 1); /* the value takes the metatable's slot */
  return 0;
}

int ebb_json_decode(lua_State *L, const char *text, size_t len, char *err, size_t errlen) {
  return decode(L, text, len, err, errlen, EBB_JSON_MAX_DEPTH);
}

int ebb_json_decode_document(lua_State *L, const char *text, size_t len, char *err,
                             size_t errlen) {
  return decode(L, text, len, err, errlen, DOCUMENT_DEPTH);
}

static int validate(const char *text, size_t len, char *err, size_t errlen, int max_depth) {
  parser ps = {NULL, (const unsigned char *)text, (const unsigned char *)text,
               (const unsigned char *)text + len, err, errlen, 0, max_depth};
  return parse_document(&ps);
}

int ebb_json_validate(const char *text, size_t len, char *err, size_t errlen) {
  return validate(text, len, err, errlen, EBB_JSON_MAX_DEPTH);
}

int ebb_json_validate_document(const char *text, size_t len, char *err, size_t errlen) {
  return validate(text, len, err, errlen, DOCUMENT_DEPTH);
}

int ebb_json_members(const char *text, size_t len, ebb_json_member_fn fn, void *ud) {
  char err[8];
  parser ps = {NULL, (const unsigned char *)text, (const unsigned char *)text,
               (const unsigned char *)text + len, err, sizeof err, 0, DOCUMENT_DEPTH};
  skip_ws(&ps);
  if (ps.p == ps.end || *ps.p != '{') return -1;
  ps.p++;
  skip_ws(&ps);
  if (ps.p < ps.end && *ps.p == '}') {
    ps.p++;
  } else {
    for (;;) {
      if (ps.p == ps.end || *ps.p != '"') return -1;
      const unsigned char *k = ps.p + 1;
      if (parse_string(&ps) != 0) return -1;
      size_t klen = (size_t)(ps.p - 1 - k);
      skip_ws(&ps);
      if (ps.p == ps.end || *ps.p != ':') return -1;
      ps.p++;
      skip_ws(&ps);
      const unsigned char *v = ps.p;
      if (parse_value(&ps, 1) != 0) return -1;
      int rc = fn(ud, (const char *)k, klen, memchr(k, '\\', klen) != NULL, (const char *)v,
                  (size_t)(ps.p - v));
      if (rc) return rc;
      skip_ws(&ps);
      if (ps.p < ps.end && *ps.p == ',') {
        ps.p++;
        skip_ws(&ps);
        continue;
      }
      if (ps.p < ps.end && *ps.p == '}') {
        ps.p++;
        break;
      }
      return -1;
    }
  }
  skip_ws(&ps);
  return ps.p == ps.end ? 0 : -1;
}

typedef struct {
  const char *key;
  size_t klen;
  const char *value;
  size_t value_len;
  int found;
} member_search;

static int match_member(void *ud, const char *k, size_t klen, int escaped, const char *v,
                        size_t vlen) {
  member_search *m = ud;
  /* Raw comparison: a key spelled with escapes is not matched, and the
   * caller falls back to the decoded value. */
  (void)escaped;
  if (klen == m->klen && memcmp(k, m->key, klen) == 0) { /* the last occurrence wins, as in decode */
    m->value = v;
    m->value_len = vlen;
    m->found = 1;
  }
  return 0;
}

int ebb_json_member(const char *text, size_t len, const char *key, const char **value,
                    size_t *value_len) {
  member_search m = {key, strlen(key), NULL, 0, 0};
  if (ebb_json_members(text, len, match_member, &m) != 0) return -1;
  if (m.found) {
    *value = m.value;
    *value_len = m.value_len;
  }
  return m.found;
}

char *ebb_json_string_dup(const char *text, size_t len, size_t *out_len) {
  char err[8];
  parser ps = {NULL, (const unsigned char *)text, (const unsigned char *)text,
               (const unsigned char *)text + len, err, sizeof err, 0, DOCUMENT_DEPTH};
  skip_ws(&ps);
  const unsigned char *open = ps.p;
  if (ps.p == ps.end || *ps.p != '"' || parse_string(&ps) != 0) return NULL;
  const unsigned char *close = ps.p - 1;
  skip_ws(&ps);
  if (ps.p != ps.end) return NULL;
  char *out = malloc((size_t)(close - open));
  if (out == NULL) return NULL;
  size_t n = unescape(out, open + 1, close);
  out[n] = '\0';
  if (out_len) *out_len = n;
  return out;
}

int ebb_json_array_items(const char *text, size_t len,
                         int (*fn)(void *ud, const char *item, size_t item_len), void *ud) {
  char err[8];
  parser ps = {NULL, (const unsigned char *)text, (const unsigned char *)text,
               (const unsigned char *)text + len, err, sizeof err, 0, DOCUMENT_DEPTH};
  skip_ws(&ps);
  if (ps.p == ps.end || *ps.p != '[') return -1;
  ps.p++;
  skip_ws(&ps);
  if (ps.p < ps.end && *ps.p == ']') return 0;
  for (;;) {
    const unsigned char *v = ps.p;
    if (parse_value(&ps, 1) != 0) return -1;
    int rc = fn(ud, (const char *)v, (size_t)(ps.p - v));
    if (rc) return rc;
    skip_ws(&ps);
    if (ps.p < ps.end && *ps.p == ',') {
      ps.p++;
      skip_ws(&ps);
      continue;
    }
    if (ps.p < ps.end && *ps.p == ']') return 0;
    return -1;
  }
}

/* ------------------------------------------------------------------ */
/* Sentinels                                                           */

/* The registry key of the array metatable: the address of this constant is
 * unique to the process, so no name can clash with another library's. */
static const char array_mt_key = 'a';

void ebb_json_push_null(lua_State *L) {
  lua_pushlightuserdata(L, NULL);
}

static int mt_is_pristine(lua_State *L, int idx, const char *kind) {
  idx = lua_absindex(L, idx);
  if (lua_getmetatable(L, idx)) {
    lua_pop(L, 1);
    return 0;
  }
  int fields = 0, ok = 1;
  lua_pushnil(L);
  while (ok && lua_next(L, idx)) {
    fields++;
    ok = lua_type(L, -2) == LUA_TSTRING && strcmp(lua_tostring(L, -2), "__jsontype") == 0 &&
         lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), kind) == 0;
    lua_pop(L, ok ? 1 : 2); /* on a mismatch the key goes too: the walk stops */
  }
  return ok && fields == 1;
}

void ebb_json_push_marker_mt(lua_State *L, const void *key, const char *kind) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, key) == LUA_TTABLE && mt_is_pristine(L, -1, kind)) return;
  lua_pop(L, 1);
  lua_createtable(L, 0, 1);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "__jsontype");
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, key);
}

void ebb_json_push_array_mt(lua_State *L) {
  ebb_json_push_marker_mt(L, &array_mt_key, "array");
}

/* ------------------------------------------------------------------ */
/* Encoder                                                             */

/* Appends that skip the call into buf.c while there is room: the encoder
 * writes many tiny pieces (",", ":", "null"), and the call and capacity
 * check per piece were a third of its time. The NUL that ebb_buf keeps
 * after the text is written once, at the end of ebb_json_encode. An oom
 * buffer takes the slow path, which keeps refusing. */
static inline void out_bytes(ebb_buf *b, const void *p, size_t n) {
  if (b->len + n < b->cap && !b->oom) {
    memcpy(b->data + b->len, p, n);
    b->len += n;
  } else {
    ebb_buf_append(b, p, n);
  }
}

static inline void out_char(ebb_buf *b, char c) {
  if (b->len + 1 < b->cap && !b->oom) b->data[b->len++] = c;
  else ebb_buf_append(b, &c, 1);
}

typedef struct {
  lua_State *L;
  ebb_buf *out;
  char *err;
  size_t errlen;
  int jt; /* stack index of the string "__jsontype" */
  /* Work not yet charged to the sandbox (see charge()). */
  int64_t values;  /* values written since the last charge */
  size_t charged;  /* output length at the last charge */
  /* The path from the root to the value being written (valuepath.h). JSON
   * keys are always strings, so only index and key steps occur. */
  ebb__path_step path[EBB_JSON_MAX_DEPTH + 1];
} encoder;

static const ebb__path_style json_path_style = {"data", "cannot encode ", 128, 8, 0};

/* Sets err to "cannot encode <path>: <reason>" and returns -1. */
#define enc_fail(e, steps, ...) \
  ebb__path_fail(&json_path_style, (e)->L, (e)->path, (steps), (e)->err, (e)->errlen, __VA_ARGS__)

/* Inside the sandbox, encoding is work the instruction hook cannot see, and
 * its output lives outside the state's allocator: a table reached twice in
 * one value is written twice, so {t, t} nested 40 deep would run for hours
 * into an unbounded buffer. So the encoder charges what it does to the
 * running call: each value as ENC_VALUE_COST instructions, each output byte
 * as half of one, and the output bytes against the memory
 * cap (ebb_sandbox_spend). Charged every ENC_CHARGE_EVERY values or
 * ENC_CHARGE_BYTES bytes, and before a long string is copied. Outside a
 * sandbox this costs a counter. */
#define ENC_VALUE_COST 16
#define ENC_CHARGE_EVERY 1024
#define ENC_CHARGE_BYTES ((size_t)64 * 1024)

/* Charges the work since the last charge plus `ahead` bytes about to be
 * written. -1 once the call is killed, with err set to the reason. */
static int charge(encoder *e, size_t ahead, int steps) {
  if (ebb_sandbox_spend_output(e->L, &e->values, ENC_VALUE_COST, &e->charged, e->out->len, ahead) == 0)
    return 0;
  return enc_fail(e, steps, "stopped: the call ran out of its bounds (instruction budget or memory)");
}

/* Describes a key that makes a table neither an array nor an object. */
static const char *key_kind(lua_State *L, int idx) {
  switch (lua_type(L, idx)) {
    case LUA_TNUMBER: return lua_isinteger(L, idx) ? "integer key" : "float key";
    case LUA_TBOOLEAN: return "boolean key";
    case LUA_TTABLE: return "table key";
    case LUA_TFUNCTION: return "function key";
    case LUA_TLIGHTUSERDATA:
    case LUA_TUSERDATA: return "userdata key";
    case LUA_TTHREAD: return "thread key";
    default: return "string key";
  }
}

static void enc_integer(ebb_buf *b, lua_Integer v) {
  char s[24], *p = s + sizeof s;
  /* negate in unsigned arithmetic so LUA_MININTEGER is fine */
  uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
  do {
    *--p = (char)('0' + u % 10);
    u /= 10;
  } while (u);
  if (v < 0) *--p = '-';
  out_bytes(b, p, (size_t)(s + sizeof s - p));
}

/* The common case of enc_float without snprintf and strtod (0.1, 19.99,
 * 1234.5): x is the double nearest to m / 10^k for some integer m of at most
 * 15 digits, found with the smallest k. Reading "m with the point k digits
 * from the right" back gives that double (m and 10^k are exact, and IEEE
 * division rounds correctly, as strtod does), so the check below proves the
 * round trip. A decimal of at most 15 digits that reads back to x is unique
 * and is what %.15g prints, and in this range %g uses plain notation, so the
 * text is the same as the slow path's. Returns 0 to leave x to it. */
static int enc_float_fast(ebb_buf *b, double x) {
  double ax = fabs(x);
  if (x == 0) {
    if (signbit(x)) out_bytes(b, "-0.0", 4);
    else out_bytes(b, "0.0", 3);
    return 1;
  }
  if (ax < 1e-4 || ax >= 1e15) return 0;
  for (int k = 0; k <= 15; k++) {
    double y = ax * pow10_exact[k];
    if (y >= MAX_EXACT_INT) return 0;
    double m = nearbyint(y);
    if (m / pow10_exact[k] != ax) continue;
    /* m has at most 16 digits; place the point k digits from the right */
    char digits[24], t[48];
    uint64_t um = (uint64_t)m;
    int nd = 0;
    do {
      digits[nd++] = (char)('0' + um % 10);
      um /= 10;
    } while (um);
    /* %.15g would have printed at most 15 significant digits; with 16 let
     * the slow path decide between 16 and 17 so both paths agree */
    if (nd > 15) return 0;
    size_t n = 0;
    if (x < 0) t[n++] = '-';
    if (nd <= k) { /* 0.00ddd */
      t[n++] = '0';
      t[n++] = '.';
      for (int i = 0; i < k - nd; i++) t[n++] = '0';
      for (int i = nd - 1; i >= 0; i--) t[n++] = digits[i];
    } else {
      for (int i = nd - 1; i >= k; i--) t[n++] = digits[i];
      t[n++] = '.';
      if (k == 0) t[n++] = '0';
      for (int i = k - 1; i >= 0; i--) t[n++] = digits[i];
    }
    out_bytes(b, t, n);
    return 1;
  }
  return 0;
}

/* The shortest of %.15g, %.16g, %.17g that reads back to the same double
 * (%.17g always does). Both snprintf and strtod use the current locale, so
 * the round-trip check is consistent; the locale's decimal point is then
 * replaced by '.', and ".0" is added to integral-looking text so the value
 * reads back as a float. */
static int enc_float(encoder *e, double x, int steps) {
  if (isnan(x)) return enc_fail(e, steps, "NaN");
  if (isinf(x)) return enc_fail(e, steps, x > 0 ? "infinity" : "-infinity");
  if (enc_float_fast(e->out, x)) return 0;
  char s[64], t[64];
  for (int prec = 15; prec <= 17; prec++) {
    snprintf(s, sizeof s, "%.*g", prec, x);
    if (prec == 17 || strtod(s, NULL) == x) break;
  }
  size_t n = 0;
  int plain = 1; /* only a sign and digits so far */
  for (const char *p = s; *p;) {
    char c = *p;
    if (IS_DIGIT(c) || c == '-' || c == '+' || c == 'e') {
      if (c == 'e') plain = 0;
      t[n++] = c;
      p++;
    } else { /* the decimal point, possibly several bytes in some locales */
      t[n++] = '.';
      plain = 0;
      while (*p && !IS_DIGIT(*p) && *p != 'e') p++;
    }
  }
  if (plain) {
    t[n++] = '.';
    t[n++] = '0';
  }
  out_bytes(e->out, t, n);
  return 0;
}

/* Checks UTF-8 and writes s as a JSON string in one pass. */
static int enc_string(encoder *e, const char *str, size_t len, int steps, const char *what) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *s = (const unsigned char *)str, *end = s + len, *run = s, *p = s;
  ebb_buf *b = e->out;
  if (len > ENC_CHARGE_BYTES && charge(e, len, steps) != 0) return -1;
  if (b->len + len + 3 > b->cap) ebb_buf_reserve(b, len + 2); /* the common size, at once */
  out_char(b, '"');
  for (;;) {
    while (p < end && str_class[*p] == 0) p++;
    if (p == end) break;
    if (str_class[*p] == 4) {
      size_t n = ebb_utf8_seq(p, (size_t)(end - p));
      if (n == 0) return enc_fail(e, steps, "%s is not valid UTF-8", what);
      p += n;
      continue;
    }
    out_bytes(b, run, (size_t)(p - run));
    switch (*p) {
      case '"': out_bytes(b, "\\\"", 2); break;
      case '\\': out_bytes(b, "\\\\", 2); break;
      case '\n': out_bytes(b, "\\n", 2); break;
      case '\r': out_bytes(b, "\\r", 2); break;
      case '\t': out_bytes(b, "\\t", 2); break;
      case '\b': out_bytes(b, "\\b", 2); break;
      case '\f': out_bytes(b, "\\f", 2); break;
      default: {
        char u[6] = {'\\', 'u', '0', '0', hex[*p >> 4], hex[*p & 15]};
        out_bytes(b, u, 6);
      }
    }
    run = ++p;
  }
  out_bytes(b, run, (size_t)(end - run));
  out_char(b, '"');
  return 0;
}

static int enc_value(encoder *e, int idx, int steps);

/* Writes the table at t as an array: its keys must be exactly 1..n. */
static int enc_array(encoder *e, int t, int steps, int marked) {
  lua_State *L = e->L;
  lua_Integer n = (lua_Integer)lua_rawlen(L, t), count = 0;
  /* lua_rawlen gives a border; the keys are exactly 1..n when every key is
   * an integer in 1..n and there are n of them. */
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    if (lua_isinteger(L, -1)) {
      lua_Integer k = lua_tointeger(L, -1);
      if (k < 1 || k > n) return enc_fail(e, steps, "sparse array");
      count++;
    } else if (lua_type(L, -1) == LUA_TSTRING) {
      return enc_fail(e, steps, marked ? "array with a string key" : "mixed integer and string keys");
    } else {
      return enc_fail(e, steps, "%s", key_kind(L, -1));
    }
  }
  if (count != n) return enc_fail(e, steps, "sparse array");
  out_char(e->out, '[');
  e->path[steps].kind = EBB__STEP_INDEX;
  for (lua_Integer i = 1; i <= n; i++) {
    if (i > 1) out_char(e->out, ',');
    lua_rawgeti(L, t, i);
    e->path[steps].index = i;
    if (enc_value(e, lua_gettop(L), steps + 1) != 0) return -1;
    lua_pop(L, 1);
  }
  out_char(e->out, ']');
  return 0;
}

/* Writes the table at t as an object; lua_next has already pushed its first
 * key and value. One pass: a non-string key found later is an error. */
static int enc_object(encoder *e, int t, int steps) {
  lua_State *L = e->L;
  ebb_buf *b = e->out;
  int first = 1;
  out_char(b, '{');
  e->path[steps].kind = EBB__STEP_KEY;
  do {
    if (lua_type(L, -2) != LUA_TSTRING) {
      if (lua_isinteger(L, -2)) return enc_fail(e, steps, "mixed integer and string keys");
      return enc_fail(e, steps, "%s", key_kind(L, -2));
    }
    size_t kn;
    const char *k = lua_tolstring(L, -2, &kn);
    e->path[steps].key = lua_gettop(L) - 1;
    if (!first) out_char(b, ',');
    first = 0;
    if (enc_string(e, k, kn, steps + 1, "key") != 0) return -1;
    out_char(b, ':');
    if (enc_value(e, lua_gettop(L), steps + 1) != 0) return -1;
    lua_pop(L, 1);
  } while (lua_next(L, t));
  out_char(b, '}');
  return 0;
}

static int enc_table(encoder *e, int t, int steps) {
  lua_State *L = e->L;
  if (steps >= EBB_JSON_MAX_DEPTH) return enc_fail(e, steps, "nesting deeper than 256");
  luaL_checkstack(L, 6, "JSON nesting");
  int kind = 0; /* 'a' or 'o' when the metatable says so */
  if (lua_getmetatable(L, t)) {
    lua_pushvalue(L, e->jt);
    if (lua_rawget(L, -2) == LUA_TSTRING) {
      size_t n;
      const char *s = lua_tolstring(L, -1, &n);
      if (n == 5 && memcmp(s, "array", 5) == 0) kind = 'a';
      else if (n == 6 && memcmp(s, "object", 6) == 0) kind = 'o';
    }
    lua_pop(L, 2);
  }
  if (kind == 'a') return enc_array(e, t, steps, 1);
  lua_pushnil(L);
  if (!lua_next(L, t)) {
    out_bytes(e->out, "{}", 2);
    return 0;
  }
  if (lua_type(L, -2) == LUA_TSTRING) return enc_object(e, t, steps);
  if (kind == 'o') return enc_fail(e, steps, "object with a non-string key");
  if (!lua_isinteger(L, -2)) return enc_fail(e, steps, "%s", key_kind(L, -2));
  lua_pop(L, 2);
  return enc_array(e, t, steps, 0);
}

/* steps: the length of the path to this value (0 for the root). */
static int enc_value(encoder *e, int idx, int steps) {
  lua_State *L = e->L;
  ebb_buf *b = e->out;
  if ((++e->values >= ENC_CHARGE_EVERY || b->len - e->charged > ENC_CHARGE_BYTES) && charge(e, 0, steps) != 0)
    return -1;
  switch (lua_type(L, idx)) {
    case LUA_TNIL: out_bytes(b, "null", 4); return 0;
    case LUA_TBOOLEAN:
      if (lua_toboolean(L, idx)) out_bytes(b, "true", 4);
      else out_bytes(b, "false", 5);
      return 0;
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) {
        enc_integer(b, lua_tointeger(L, idx));
        return 0;
      }
      return enc_float(e, (double)lua_tonumber(L, idx), steps);
    case LUA_TSTRING: {
      size_t n;
      const char *s = lua_tolstring(L, idx, &n);
      return enc_string(e, s, n, steps, "string");
    }
    case LUA_TLIGHTUSERDATA:
      if (lua_touserdata(L, idx) == NULL) {
        out_bytes(b, "null", 4);
        return 0;
      }
      return enc_fail(e, steps, "light userdata");
    case LUA_TTABLE: return enc_table(e, idx, steps);
    default: return enc_fail(e, steps, "%s", luaL_typename(L, idx));
  }
}

int ebb_json_encode(lua_State *L, int idx, ebb_buf *out, char *err, size_t errlen) {
  int top = lua_gettop(L);
  size_t mark = out->len;
  encoder e;
  e.L = L;
  e.out = out;
  e.err = err;
  e.errlen = errlen;
  e.values = 0;
  e.charged = out->len;
  idx = lua_absindex(L, idx);
  luaL_checkstack(L, 8, "JSON");
  lua_pushliteral(L, "__jsontype");
  e.jt = lua_gettop(L);
  int rc = enc_value(&e, idx, 0);
  if (rc == 0) rc = charge(&e, 0, 0);
  lua_settop(L, top);
  if (rc == 0 && out->oom) {
    if (err && errlen) snprintf(err, errlen, "cannot encode data: out of memory");
    rc = -1;
  }
  if (rc != 0 && out->data != NULL) out->len = mark; /* the caller's text stays as it was */
  if (out->data != NULL) out->data[out->len] = '\0';
  return rc;
}
