/*
 * pattern.c: Lua 5.4's string patterns (string.find, match, gmatch, gsub)
 * for the sandbox, with every matching step charged to the call's
 * instruction budget.
 *
 * The stock matcher runs in C, where the instruction hook never fires: one
 * call of string.find with a pattern like ".-.-.-.-.-b" backtracks for
 * seconds or hours and nothing can stop it. This file is a matcher of our
 * own that follows the semantics of Lua 5.4's (same classes, sets,
 * quantifiers, anchors, captures, %b, %f, back-references, the same error
 * messages and the same results), and counts its steps: each attempt to
 * match at a position, each character a quantifier or %b looks at, each
 * byte a back-reference or plain search compares. Every CHARGE_EVERY steps
 * the count goes to ebb_sandbox_charge, which raises the sandbox's kill
 * once the budget is spent, so a pathological pattern ends like an endless
 * loop (the kill cannot be caught by pcall).
 *
 * Plain finds (plain = true, or a pattern without magic characters) keep a
 * memchr/memcmp search, charged per candidate position.
 *
 * Memory: results and gsub's output go through luaL_Buffer and
 * lua_pushlstring, which allocate from the state's allocator and so count
 * against the memory cap.
 */
#include "pattern.h"

#include <ctype.h>
#include <string.h>

#include <lauxlib.h>

#include "sandbox.h"

#define ESC '%'
#define MAX_CAPTURES 32     /* LUA_MAXCAPTURES */
#define MAX_DEPTH 200       /* MAXCCALLS of lstrlib: "pattern too complex" */
#define CHARGE_EVERY 4096   /* steps counted locally before they are charged */
/* Instructions one step costs: a step (a backtrack into do_match, a
   character tried by a quantifier) takes about three times as long as a
   VM instruction, measured with a pathological pattern against a loop. */
#define STEP_COST 3
#define SPECIALS "^$*+?.([%-"

#define CAP_UNFINISHED (-1)
#define CAP_POSITION (-2)

typedef struct {
  const char *s0, *send; /* the subject */
  const char *pend;      /* end of the pattern */
  lua_State *L;
  int depth;             /* recursion left before "pattern too complex" */
  int level;             /* captures opened so far */
  long steps;            /* not yet charged */
  struct {
    const char *init;
    ptrdiff_t len;       /* a length, CAP_UNFINISHED or CAP_POSITION */
  } cap[MAX_CAPTURES];
} matcher;

static void charge(matcher *m, long n) {
  m->steps += n;
  if (m->steps >= CHARGE_EVERY) {
    long s = m->steps;
    m->steps = 0;
    ebb_sandbox_charge(m->L, s * STEP_COST);
  }
}

static void settle(matcher *m) {
  long s = m->steps;
  m->steps = 0;
  if (s > 0) ebb_sandbox_charge(m->L, s * STEP_COST);
}

static int class_has(int c, int cl) {
  int r;
  switch (tolower(cl)) {
    case 'a': r = isalpha(c); break;
    case 'c': r = iscntrl(c); break;
    case 'd': r = isdigit(c); break;
    case 'g': r = isgraph(c); break;
    case 'l': r = islower(c); break;
    case 'p': r = ispunct(c); break;
    case 's': r = isspace(c); break;
    case 'u': r = isupper(c); break;
    case 'w': r = isalnum(c); break;
    case 'x': r = isxdigit(c); break;
    case 'z': r = c == 0; break; /* deprecated, still in 5.4 */
    default: return cl == c;
  }
  if (isupper(cl)) r = !r;
  return r != 0;
}

/* The end of the single-character class starting at p. */
static const char *class_end(matcher *m, const char *p) {
  char c = *p++;
  if (c == ESC) {
    if (p == m->pend) luaL_error(m->L, "malformed pattern (ends with '%%')");
    return p + 1;
  }
  if (c == '[') {
    if (p < m->pend && *p == '^') p++;
    /* the first character of a set is never its end: "[]]" is a set of ']' */
    do {
      if (p == m->pend) luaL_error(m->L, "malformed pattern (missing ']')");
      c = *p++;
      if (c == ESC && p < m->pend) p++;
    } while (p == m->pend || *p != ']');
    return p + 1;
  }
  return p;
}

/* Whether c is in the set [ ... ] that runs from p ('[') to last (']'). */
static int in_set(int c, const char *p, const char *last) {
  int yes = 1;
  if (p[1] == '^') {
    yes = 0;
    p++;
  }
  while (++p < last) {
    if (*p == ESC) {
      p++;
      if (class_has(c, (unsigned char)*p)) return yes;
    } else if (p[1] == '-' && p + 2 < last) {
      if ((unsigned char)p[0] <= c && c <= (unsigned char)p[2]) return yes;
      p += 2;
    } else if ((unsigned char)*p == c) {
      return yes;
    }
  }
  return !yes;
}

/* Whether the character at s matches the class p..ep. */
static int single(matcher *m, const char *s, const char *p, const char *ep) {
  if (s >= m->send) return 0;
  int c = (unsigned char)*s;
  switch (*p) {
    case '.': return 1;
    case ESC: return class_has(c, (unsigned char)p[1]);
    case '[':
      charge(m, (long)((ep - p) / 2)); /* a set is scanned (twice, with class_end) per use */
      return in_set(c, p, ep - 1);
    default: return (unsigned char)*p == c;
  }
}

static const char *do_match(matcher *m, const char *s, const char *p);

static const char *balance(matcher *m, const char *s, const char *p) {
  if (p + 1 >= m->pend) luaL_error(m->L, "malformed pattern (missing arguments to '%%b')");
  if (s >= m->send || *s != *p) return NULL;
  char open = p[0], close = p[1];
  int n = 1;
  while (++s < m->send) {
    charge(m, 1);
    if (*s == close) {
      if (--n == 0) return s + 1;
    } else if (*s == open) {
      n++;
    }
  }
  return NULL;
}

/* The greedy quantifiers: as many as match, then back off one by one. */
static const char *greedy(matcher *m, const char *s, const char *p, const char *ep) {
  ptrdiff_t n = 0;
  while (single(m, s + n, p, ep)) {
    n++;
    charge(m, 1);
  }
  for (; n >= 0; n--) {
    const char *r = do_match(m, s + n, ep + 1);
    if (r != NULL) return r;
  }
  return NULL;
}

/* The lazy quantifier '-': as few as let the rest match. */
static const char *lazy(matcher *m, const char *s, const char *p, const char *ep) {
  for (;;) {
    const char *r = do_match(m, s, ep + 1);
    if (r != NULL) return r;
    if (!single(m, s, p, ep)) return NULL;
    s++;
  }
}

static const char *open_capture(matcher *m, const char *s, const char *p, ptrdiff_t what) {
  if (m->level >= MAX_CAPTURES) luaL_error(m->L, "too many captures");
  int l = m->level++;
  m->cap[l].init = s;
  m->cap[l].len = what;
  const char *r = do_match(m, s, p);
  if (r == NULL) m->level--;
  return r;
}

static const char *close_capture(matcher *m, const char *s, const char *p) {
  int l = m->level - 1;
  while (l >= 0 && m->cap[l].len != CAP_UNFINISHED) l--;
  if (l < 0) luaL_error(m->L, "invalid pattern capture");
  m->cap[l].len = s - m->cap[l].init;
  const char *r = do_match(m, s, p);
  if (r == NULL) m->cap[l].len = CAP_UNFINISHED;
  return r;
}

static int capture_index(matcher *m, int digit) {
  int l = digit - '1';
  if (l < 0 || l >= m->level || m->cap[l].len == CAP_UNFINISHED)
    return luaL_error(m->L, "invalid capture index %%%d", l + 1); /* 5.4.4's wording */
  return l;
}

static const char *back_reference(matcher *m, const char *s, int digit) {
  int l = capture_index(m, digit);
  size_t len = (size_t)m->cap[l].len;
  charge(m, (long)(len / 16));
  if ((size_t)(m->send - s) >= len && memcmp(m->cap[l].init, s, len) == 0) return s + len;
  return NULL;
}

/* Matches the pattern from p against the subject from s: the end of the
   match, or NULL. Tail positions loop instead of recursing. */
static const char *do_match(matcher *m, const char *s, const char *p) {
  if (m->depth-- == 0) luaL_error(m->L, "pattern too complex");
  charge(m, 1);
  while (p != m->pend) {
    if (*p == '(') {
      if (p + 1 < m->pend && p[1] == ')') s = open_capture(m, s, p + 2, CAP_POSITION);
      else s = open_capture(m, s, p + 1, CAP_UNFINISHED);
      break;
    }
    if (*p == ')') {
      s = close_capture(m, s, p + 1);
      break;
    }
    if (*p == '$' && p + 1 == m->pend) {
      if (s != m->send) s = NULL;
      break;
    }
    if (*p == ESC && p + 1 < m->pend && p[1] == 'b') {
      s = balance(m, s, p + 2);
      if (s == NULL) break;
      p += 4;
      continue;
    }
    if (*p == ESC && p + 1 < m->pend && p[1] == 'f') {
      p += 2;
      if (p >= m->pend || *p != '[') luaL_error(m->L, "missing '[' after '%%f' in pattern");
      const char *ep = class_end(m, p);
      int before = s == m->s0 ? '\0' : (unsigned char)s[-1];
      int here = s < m->send ? (unsigned char)*s : '\0';
      if (!in_set(before, p, ep - 1) && in_set(here, p, ep - 1)) {
        p = ep;
        continue;
      }
      s = NULL;
      break;
    }
    if (*p == ESC && p + 1 < m->pend && isdigit((unsigned char)p[1])) {
      s = back_reference(m, s, (unsigned char)p[1]);
      if (s == NULL) break;
      p += 2;
      continue;
    }
    /* a single-character class, perhaps with a quantifier */
    const char *ep = class_end(m, p);
    char q = ep < m->pend ? *ep : '\0';
    if (!single(m, s, p, ep)) {
      if (q == '*' || q == '?' || q == '-') {
        p = ep + 1;
        continue;
      }
      s = NULL;
      break;
    }
    if (q == '?') {
      const char *r = do_match(m, s + 1, ep + 1);
      if (r != NULL) {
        s = r;
        break;
      }
      p = ep + 1;
      continue;
    }
    if (q == '+') {
      s = greedy(m, s + 1, p, ep);
      break;
    }
    if (q == '*') {
      s = greedy(m, s, p, ep);
      break;
    }
    if (q == '-') {
      s = lazy(m, s, p, ep);
      break;
    }
    s++;
    p = ep;
    charge(m, 1);
  }
  m->depth++;
  return s;
}

static void reset(matcher *m) {
  m->level = 0;
  m->depth = MAX_DEPTH;
}

static void init(matcher *m, lua_State *L, const char *s, size_t ls, const char *p, size_t lp) {
  m->L = L;
  m->s0 = s;
  m->send = s + ls;
  m->pend = p + lp;
  m->steps = 0;
  reset(m);
}

/* Pushes capture i of a match s..e (the whole match when there are none). */
static void push_capture(matcher *m, int i, const char *s, const char *e) {
  if (i >= m->level) {
    if (i != 0) luaL_error(m->L, "invalid capture index %%%d", i + 1);
    lua_pushlstring(m->L, s, (size_t)(e - s));
    return;
  }
  ptrdiff_t len = m->cap[i].len;
  if (len == CAP_UNFINISHED) luaL_error(m->L, "unfinished capture");
  if (len == CAP_POSITION) lua_pushinteger(m->L, (m->cap[i].init - m->s0) + 1);
  else lua_pushlstring(m->L, m->cap[i].init, (size_t)len);
}

/* Pushes every capture (or the whole match when s is given and there are
   none) and returns how many. */
static int push_captures(matcher *m, const char *s, const char *e) {
  int n = (m->level == 0 && s != NULL) ? 1 : m->level;
  luaL_checkstack(m->L, n, "too many captures");
  for (int i = 0; i < n; i++) push_capture(m, i, s, e);
  return n;
}

/* Lua 5.4's posrelatI: a start position made absolute, at least 1. */
static size_t start_at(lua_Integer pos, size_t len) {
  if (pos > 0) return (size_t)pos;
  if (pos == 0) return 1;
  if (pos < -(lua_Integer)len) return 1;
  return len + (size_t)pos + 1;
}

static int has_specials(const char *p, size_t lp) {
  for (size_t i = 0; i < lp; i++)
    if (strchr(SPECIALS, p[i]) != NULL && p[i] != '\0') return 1;
  return 0;
}

/* The plain search: memchr for the first byte, memcmp for the rest. */
static const char *plain_find(matcher *m, const char *s, size_t ls, const char *p, size_t lp) {
  if (lp == 0) return s;
  if (lp > ls) return NULL;
  const char *last = s + (ls - lp);
  while (s <= last) {
    const char *hit = memchr(s, *p, (size_t)(last - s) + 1);
    if (hit == NULL) return NULL;
    charge(m, 1 + (long)(lp / 16));
    if (memcmp(hit + 1, p + 1, lp - 1) == 0) return hit;
    s = hit + 1;
  }
  return NULL;
}

static int find_or_match(lua_State *L, int find) {
  size_t ls, lp;
  const char *s = luaL_checklstring(L, 1, &ls);
  const char *p = luaL_checklstring(L, 2, &lp);
  size_t at = start_at(luaL_optinteger(L, 3, 1), ls) - 1;
  if (at > ls) {
    luaL_pushfail(L);
    return 1;
  }
  matcher m;
  init(&m, L, s, ls, p, lp);
  if (find && (lua_toboolean(L, 4) || !has_specials(p, lp))) {
    const char *hit = plain_find(&m, s + at, ls - at, p, lp);
    settle(&m);
    if (hit == NULL) {
      luaL_pushfail(L);
      return 1;
    }
    lua_pushinteger(L, (hit - s) + 1);
    lua_pushinteger(L, (lua_Integer)((size_t)(hit - s) + lp));
    return 2;
  }
  int anchor = lp > 0 && *p == '^';
  if (anchor) p++;
  const char *from = s + at;
  do {
    reset(&m);
    const char *e = do_match(&m, from, p);
    if (e != NULL) {
      settle(&m);
      if (find) {
        lua_pushinteger(L, (from - s) + 1);
        lua_pushinteger(L, e - s);
        return push_captures(&m, NULL, NULL) + 2;
      }
      return push_captures(&m, from, e);
    }
  } while (from++ < m.send && !anchor);
  settle(&m);
  luaL_pushfail(L);
  return 1;
}

static int pat_find(lua_State *L) {
  return find_or_match(L, 1);
}

static int pat_match(lua_State *L) {
  return find_or_match(L, 0);
}

/* gmatch's state, a userdata upvalue of the iterator; the subject and the
   pattern are upvalues too, so they stay alive. */
typedef struct {
  const char *from;      /* where the next search starts */
  const char *last;      /* end of the last match, which may not match empty again */
  matcher m;
} gmatch_state;

static int gmatch_next(lua_State *L) {
  gmatch_state *g = lua_touserdata(L, lua_upvalueindex(3));
  size_t lp;
  const char *p = lua_tolstring(L, lua_upvalueindex(2), &lp);
  g->m.L = L;
  for (const char *src = g->from; src <= g->m.send; src++) {
    reset(&g->m);
    const char *e = do_match(&g->m, src, p);
    if (e != NULL && e != g->last) {
      settle(&g->m);
      g->from = g->last = e;
      return push_captures(&g->m, src, e);
    }
  }
  settle(&g->m);
  g->from = g->m.send + 1; /* done: later calls find nothing at once */
  return 0;
}

static int pat_gmatch(lua_State *L) {
  size_t ls, lp;
  const char *s = luaL_checklstring(L, 1, &ls);
  const char *p = luaL_checklstring(L, 2, &lp);
  size_t at = start_at(luaL_optinteger(L, 3, 1), ls) - 1;
  if (at > ls) at = ls + 1;
  lua_settop(L, 2);
  gmatch_state *g = lua_newuserdatauv(L, sizeof *g, 0);
  init(&g->m, L, s, ls, p, lp);
  g->from = s + at;
  g->last = NULL;
  lua_pushcclosure(L, gmatch_next, 3);
  return 1;
}

/* gsub's replacement string: %0..%9 and %%. */
static void add_template(matcher *m, luaL_Buffer *b, const char *s, const char *e) {
  size_t l;
  const char *t = lua_tolstring(m->L, 3, &l);
  const char *end = t + l;
  while (t < end) {
    const char *pct = memchr(t, ESC, (size_t)(end - t));
    if (pct == NULL) {
      luaL_addlstring(b, t, (size_t)(end - t));
      return;
    }
    luaL_addlstring(b, t, (size_t)(pct - t));
    t = pct + 1;
    if (t < end && *t == ESC) {
      luaL_addchar(b, ESC);
    } else if (t < end && isdigit((unsigned char)*t)) {
      if (*t == '0') {
        luaL_addlstring(b, s, (size_t)(e - s));
      } else {
        push_capture(m, *t - '1', s, e); /* a position capture is added as its digits */
        luaL_addvalue(b);
      }
    } else {
      luaL_error(m->L, "invalid use of '%c' in replacement string", ESC);
    }
    t++;
  }
}

/* Adds the replacement of the match s..e; a false or nil value from a
   table or function keeps the original text (and returns 0: unchanged). */
static int add_replacement(matcher *m, luaL_Buffer *b, const char *s, const char *e, int tr) {
  lua_State *L = m->L;
  charge(m, 4); /* the replacement's own work: copying, converting */
  if (tr == LUA_TNUMBER || tr == LUA_TSTRING) {
    add_template(m, b, s, e);
    return 1;
  }
  if (tr == LUA_TFUNCTION) {
    lua_pushvalue(L, 3);
    int n = push_captures(m, s, e);
    lua_call(L, n, 1);
  } else {
    push_capture(m, 0, s, e);
    lua_gettable(L, 3);
  }
  if (!lua_toboolean(L, -1)) {
    lua_pop(L, 1);
    luaL_addlstring(b, s, (size_t)(e - s));
    return 0;
  }
  if (!lua_isstring(L, -1)) luaL_error(L, "invalid replacement value (a %s)", luaL_typename(L, -1));
  luaL_addvalue(b);
  return 1;
}

static int pat_gsub(lua_State *L) {
  size_t ls, lp;
  const char *src = luaL_checklstring(L, 1, &ls);
  const char *p = luaL_checklstring(L, 2, &lp);
  const char *last = NULL;
  int tr = lua_type(L, 3);
  lua_Integer max = luaL_optinteger(L, 4, (lua_Integer)ls + 1);
  luaL_argexpected(L, tr == LUA_TNUMBER || tr == LUA_TSTRING || tr == LUA_TFUNCTION || tr == LUA_TTABLE, 3,
                   "string/function/table");
  int anchor = lp > 0 && *p == '^';
  matcher m;
  init(&m, L, src, ls, p, lp);
  if (anchor) p++;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  lua_Integer n = 0;
  int changed = 0;
  while (n < max) {
    reset(&m);
    const char *e = do_match(&m, src, p);
    if (e != NULL && e != last) {
      n++;
      changed = add_replacement(&m, &b, src, e, tr) | changed;
      src = last = e;
    } else if (src < m.send) {
      luaL_addchar(&b, *src++);
    } else {
      break;
    }
    if (anchor) break;
  }
  settle(&m);
  if (!changed) {
    lua_pushvalue(L, 1);
  } else {
    luaL_addlstring(&b, src, (size_t)(m.send - src));
    luaL_pushresult(&b);
  }
  lua_pushinteger(L, n);
  return 2;
}

void ebb__pattern_install(lua_State *L, int strlib) {
  static const luaL_Reg fns[] = {
      {"find", pat_find}, {"match", pat_match}, {"gmatch", pat_gmatch}, {"gsub", pat_gsub}, {NULL, NULL}};
  strlib = lua_absindex(L, strlib);
  for (const luaL_Reg *f = fns; f->name != NULL; f++) {
    lua_pushcfunction(L, f->func);
    lua_setfield(L, strlib, f->name);
  }
}
