/*
 * sandbox.c: the sandboxed, bounded Lua state in which user modules run (see
 * sandbox.h).
 *
 * It owns four things. (1) The allow-list of globals: only pure, deterministic
 * functions, with the library tables behind read-only proxies, so nothing a
 * module does can reach the file system, the clock, randomness, or another
 * module's view of the libraries. (2) Module loading: `require` and
 * ebb_sandbox_load_file read text chunks from fixed directories and give each
 * module an environment table of its own, and keep the text of every file
 * they read (ebb_sandbox_sources) so a rebuilt state runs the same code.
 * (3) The bounds: a counting allocator with a byte cap and a count hook with
 * an instruction budget and a limit on call depth. Work Lua does in C is
 * charged to the same budget: every allocation, pattern matching (the
 * matcher of pattern.c replaces the stock one), table.sort, and encoding
 * (json.c and serialize.c call ebb_sandbox_spend, which also counts their
 * output against the byte cap).
 * (4) The kill: once a bound is hit, every Lua instruction on every thread
 * raises an error until the outermost ebb_sandbox_call returns, so pcall,
 * xpcall and coroutines cannot swallow it.
 *
 * The kill only works while Lua runs hooks, so this file also closes the
 * paths where Lua code would run with hooks disabled: __gc finalizers
 * (refused by setmetatable), xpcall message handlers called for an error
 * raised from inside our hook (our xpcall skips them once killed), and
 * __close handlers of a coroutine that died from a hook error (never closed).
 */
#include "sandbox.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <lauxlib.h>
#include <lualib.h>

#include "pattern.h"

/* The hook runs every HOOK_EVERY instructions: often enough that a budget
   overrun is noticed within microseconds, rarely enough to cost nothing. */
#define HOOK_EVERY 1000
/* Once a call is killed (or while the message handler builds a traceback),
   allocations may exceed the cap by this much, so that raising the kill
   error and describing it cannot themselves fail for lack of memory. Killed
   code cannot use it: every Lua instruction it runs raises. */
#define KILL_HEADROOM ((size_t)1024 * 1024)
/* Allocation is work the hook does not see either (malloc, the collector
   that allocation drives, stack and CallInfo growth in deep recursion, C
   functions building big strings): each allocation costs ALLOC_COST
   instructions plus one per ALLOC_BYTES_PER_STEP bytes. Measured on the
   hostile suite, new memory costs about a nanosecond a byte to fault in,
   fill, copy on growth and collect: about one instruction's time per 8. */
#define ALLOC_COST 16
#define ALLOC_BYTES_PER_STEP 8
/* An allocation at least this big, asked for once the budget is spent, is
   refused, and so is any while the call is being killed: it comes from a C
   function (table.concat, string.format, a table's resize...) that would
   otherwise fill it, unseen by the hook, before the kill could land. */
#define BIG_ALLOC ((size_t)64 * 1024)
/* Nested Lua calls allowed before the call is killed. Lua's own limit is
   its stack size (about 200,000 levels), and overflowing it costs ~0.1 s
   of C work the hook cannot see; a loop of pcall'd overflows stalled the
   daemon for seconds. Checked by the hook, so the depth may overshoot by
   what HOOK_EVERY instructions can add. */
#define MAX_CALL_DEPTH 10000

struct ebb_sandbox {
  lua_State *L;
  size_t used;          /* bytes currently allocated by the state */
  size_t limit;
  int64_t budget;
  int64_t spent;        /* instructions counted in this call */
  size_t outside;       /* bytes of encoded output charged in this call (ebb_sandbox_spend) */
  int hook_every;
  int depth;            /* nesting of ebb_sandbox_call; bounds apply when > 0 */
  int killing;          /* the running call is being killed */
  int was_killed;       /* the last call was killed; reason[] says why */
  int in_handler;       /* our message handler is running (memory headroom) */
  int missing_file;     /* ebb_sandbox_load_file could not open its file */
  char reason[256];
  char *traceback;      /* malloc'd, of the last failed call, or NULL */
  char **dirs;          /* runtime_dir, then the module dirs */
  int has_runtime_dir;  /* dirs[0] is the runtime's own library */
  size_t n_dirs;
  ebb_sandbox_sources *sources; /* the text of every file loaded */
  int own_sources;              /* sources was made here, not passed in */
  /* A refused allocation, remembered so that Lua's retry of the very same
     request after its emergency collection can be recognised: only a request
     that cannot be met even after a full collection kills the call, so a
     program close to the cap with plenty of garbage is not killed. */
  int pending;
  void *pending_ptr;
  size_t pending_osize, pending_nsize;
};

/* Registry keys (addresses are unique and need no allocation). */
static char KEY_LOADED;   /* name -> value of required modules */
static char KEY_ENVMT;    /* metatable of module environments */
static char KEY_GUARDMT;  /* metatable of the require guard */
static char KEY_READONLY; /* marks the metatables of read-only proxies */
static char LOADING;      /* lightuserdata: module is being loaded */
static char POISONED;     /* thread extra space: died while killed */

static void sb_hook(lua_State *L, lua_Debug *ar);

static ebb_sandbox *sb_of(lua_State *L) {
  void *ud = NULL;
  lua_getallocf(L, &ud);
  return ud;
}

static void *sb_alloc(void *ud, void *ptr, size_t osize, size_t nsize);

/* The sandbox of L, or NULL when L is not a sandbox's state (the same C
   code also runs in plain Lua, in ebb.core under busted). */
static ebb_sandbox *sandbox_of(lua_State *L) {
  void *ud = NULL;
  return lua_getallocf(L, &ud) == sb_alloc ? ud : NULL;
}

/* ---------------------------------------------------------------- bounds */

/* Marks the running call killed and makes the hook fire on the very next
   instruction of the running thread and of the main thread. Other threads
   still carry the normal hook and notice within HOOK_EVERY instructions.
   Safe from the allocator and from a hook: lua_sethook only stores. */
static void kill_now(ebb_sandbox *sb, lua_State *running) {
  sb->killing = 1;
  sb->was_killed = 1;
  if (running != NULL && running != sb->L) lua_sethook(running, sb_hook, LUA_MASKCOUNT, 1);
  lua_sethook(sb->L, sb_hook, LUA_MASKCOUNT, 1);
}

static void kill_for_memory(ebb_sandbox *sb) {
  sb->pending = 0;
  snprintf(sb->reason, sizeof sb->reason, "memory limit of %zu bytes exceeded", sb->limit);
  kill_now(sb, NULL);
}

/* A refusal is final, and kills the call, unless the very next request is
   Lua retrying the same one after its emergency collection and that retry
   fits. Requests lauxlib makes directly (luaL_Buffer growth in string.rep,
   table.concat, ...) are never retried: the next request, whatever it is,
   settles them as final. */
static void refuse(ebb_sandbox *sb, void *ptr, size_t osize, size_t nsize) {
  if (sb->depth == 0 || sb->killing) return;
  if (sb->pending) {
    kill_for_memory(sb);
    return;
  }
  sb->pending = 1;
  sb->pending_ptr = ptr;
  sb->pending_osize = osize;
  sb->pending_nsize = nsize;
}

static void *sb_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  ebb_sandbox *sb = ud;
  size_t old = ptr != NULL ? osize : 0; /* for new blocks osize is a type tag */
  if (nsize == 0) {
    free(ptr);
    sb->used -= old;
    return NULL;
  }
  if (nsize > old) {
    size_t cap = sb->limit;
    if (sb->killing || sb->in_handler) cap += KILL_HEADROOM;
    size_t grow = nsize - old;
    if (grow > cap || sb->used > cap - grow) {
      refuse(sb, ptr, osize, nsize);
      return NULL;
    }
    if (sb->depth > 0) {
      sb->spent += ALLOC_COST + (int64_t)(grow / ALLOC_BYTES_PER_STEP);
      if (grow >= BIG_ALLOC && !sb->in_handler && (sb->killing || sb->spent > sb->budget)) {
        if (!sb->killing) {
          snprintf(sb->reason, sizeof sb->reason,
                   "instruction budget of %" PRId64 " exceeded (allocating %zu bytes)", sb->budget, grow);
          kill_now(sb, NULL);
        }
        return NULL;
      }
    }
  }
  void *p = realloc(ptr, nsize);
  if (p == NULL) {
    /* Lua assumes shrinking never fails; keep the bigger block. */
    if (nsize <= old) p = ptr;
    else return NULL;
  }
  if (nsize > old && sb->pending) {
    int retried = sb->pending_ptr == ptr && sb->pending_osize == osize && sb->pending_nsize == nsize;
    sb->pending = 0;
    if (!retried && sb->depth > 0 && !sb->killing) kill_for_memory(sb);
  }
  sb->used = sb->used - old + nsize;
  return p;
}

void ebb_sandbox_recharge(ebb_sandbox *sb) {
  if (!sb->killing) {
    sb->spent = 0;
    sb->outside = 0;
  }
}

/* Writes "instruction budget of N exceeded at file:line" (the place of the
   Lua function at the given stack level, when there is one) as the reason. */
static void budget_reason(ebb_sandbox *sb, lua_State *L, lua_Debug *ar) {
  int n = snprintf(sb->reason, sizeof sb->reason, "instruction budget of %" PRId64 " exceeded", sb->budget);
  if (n > 0 && (size_t)n < sizeof sb->reason && lua_getinfo(L, "Sl", ar)) {
    if (ar->currentline > 0)
      snprintf(sb->reason + n, sizeof sb->reason - n, " at %s:%d", ar->short_src, ar->currentline);
    else
      snprintf(sb->reason + n, sizeof sb->reason - n, " in %s", ar->short_src);
  }
}

int ebb_sandbox_spend(lua_State *L, int64_t steps, size_t bytes) {
  ebb_sandbox *sb = sandbox_of(L);
  if (sb == NULL || sb->depth == 0) return 0;
  if (sb->killing) return -1;
  sb->spent += steps;
  sb->outside += bytes;
  if (sb->outside > sb->limit || sb->used > sb->limit - sb->outside) {
    snprintf(sb->reason, sizeof sb->reason,
             "memory limit of %zu bytes exceeded (%zu bytes of encoded output on top of %zu in use)", sb->limit,
             sb->outside, sb->used);
    kill_now(sb, L);
    return -1;
  }
  if (sb->spent <= sb->budget) return 0;
  /* Charged from C: name the Lua function that called it (level 1), or the
     innermost Lua frame, whichever is found first. */
  lua_Debug ar;
  int level = 0;
  while (lua_getstack(L, level, &ar) && lua_getinfo(L, "S", &ar) && ar.what[0] == 'C') level++;
  if (lua_getstack(L, level, &ar)) {
    budget_reason(sb, L, &ar);
  } else {
    snprintf(sb->reason, sizeof sb->reason, "instruction budget of %" PRId64 " exceeded", sb->budget);
  }
  kill_now(sb, L);
  return -1;
}

int ebb_sandbox_spend_output(lua_State *L, int64_t *values, int value_cost, size_t *charged,
                             size_t out_len, size_t ahead) {
  size_t bytes = out_len - *charged + ahead;
  int64_t cost = *values * value_cost + (int64_t)(bytes / 2);
  *values = 0;
  *charged = out_len + ahead;
  return ebb_sandbox_spend(L, cost, bytes);
}

void ebb_sandbox_charge(lua_State *L, int64_t steps) {
  if (ebb_sandbox_spend(L, steps, 0) == 0) return;
  lua_pushstring(L, sandbox_of(L)->reason);
  lua_error(L);
}

/* The count hook: charges the budget and, once the call is killed, raises
   on every instruction. It also restores the normal period on threads left
   at period 1 by an earlier kill. */
static void sb_hook(lua_State *L, lua_Debug *ar) {
  ebb_sandbox *sb = sb_of(L);
  int every = lua_gethookcount(L);
  int want = sb->killing ? 1 : sb->hook_every;
  if (every != want) lua_sethook(L, sb_hook, LUA_MASKCOUNT, want);
  if (sb->depth == 0) return; /* host code between calls is not bounded */
  if (!sb->killing) {
    sb->spent += every;
    lua_Debug deep;
    if (sb->spent <= sb->budget) {
      if (!lua_getstack(L, MAX_CALL_DEPTH, &deep)) return;
      snprintf(sb->reason, sizeof sb->reason, "call depth of %d exceeded (endless recursion?)", MAX_CALL_DEPTH);
      if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0) {
        size_t n = strlen(sb->reason);
        snprintf(sb->reason + n, sizeof sb->reason - n, " at %s:%d", ar->short_src, ar->currentline);
      }
    } else {
      budget_reason(sb, L, ar);
    }
    kill_now(sb, L);
  }
  lua_pushstring(L, sb->reason);
  lua_error(L);
}

static void set_traceback(ebb_sandbox *sb, const char *tb) {
  free(sb->traceback);
  sb->traceback = tb != NULL ? strdup(tb) : NULL;
}

/* The message handler of ebb_sandbox_call. A C function, so it runs even
   when the error came from the hook; it records the traceback and returns
   the error object untouched. */
static int sb_msgh(lua_State *L) {
  ebb_sandbox *sb = sb_of(L);
  sb->in_handler = 1;
  const char *msg;
  if (lua_type(L, 1) == LUA_TSTRING) msg = lua_tostring(L, 1);
  else msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  luaL_traceback(L, L, msg, 1);
  set_traceback(sb, lua_tostring(L, -1));
  lua_settop(L, 1);
  sb->in_handler = 0;
  return 1;
}

static int push_reason(lua_State *L) {
  ebb_sandbox *sb = lua_touserdata(L, 1);
  lua_pushstring(L, sb->reason);
  return 1;
}

int ebb_sandbox_call(ebb_sandbox *sb, int nargs, int nresults) {
  lua_State *L = sb->L;
  int outer = sb->depth == 0;
  int func = lua_gettop(L) - nargs;
  if (outer) {
    sb->spent = 0;
    sb->outside = 0;
    sb->killing = 0;
    sb->was_killed = 0;
    sb->pending = 0;
    sb->reason[0] = '\0';
    set_traceback(sb, NULL);
    lua_sethook(L, sb_hook, LUA_MASKCOUNT, sb->hook_every);
  }
  if (!lua_checkstack(L, 2)) {
    /* The function's slot is freed, and the interned message needs no
       allocation. */
    lua_settop(L, func - 1);
    lua_pushliteral(L, "not enough memory");
    return LUA_ERRMEM;
  }
  lua_pushcfunction(L, sb_msgh);
  lua_insert(L, func);
  sb->depth++;
  int status = lua_pcall(L, nargs, nresults, func);
  sb->depth--;
  lua_remove(L, func);
  sb->in_handler = 0;
  /* A refusal nothing settled yet (lauxlib's buffers raise the memory error
     without a retry and without calling the handler) is final too. */
  if (outer && sb->pending && !sb->killing) kill_for_memory(sb);
  if (outer && sb->killing) {
    /* Whatever the killed code left (its last error, or results if a C
       function ignored the refusal) is replaced by the reason, and the
       garbage of the runaway is collected now, not during the next call. */
    lua_settop(L, func - 1);
    lua_gc(L, LUA_GCCOLLECT);
    lua_pushcfunction(L, push_reason);
    lua_pushlightuserdata(L, sb);
    lua_pcall(L, 1, 1, 0); /* on failure the memory error message is left */
    sb->killing = 0;
    lua_sethook(L, sb_hook, LUA_MASKCOUNT, sb->hook_every);
    if (status == LUA_OK) status = LUA_ERRRUN;
  }
  return status;
}

const char *ebb_sandbox_traceback(ebb_sandbox *sb) {
  return sb->traceback != NULL ? sb->traceback : "";
}

const char *ebb_sandbox_killed(ebb_sandbox *sb) {
  /* Asked during a call (say after a host lua_pcall failed with a memory
     error), a refusal still pending is final: Lua's retry would have come
     before any host code ran. */
  if (sb->depth > 0 && sb->pending && !sb->killing) kill_for_memory(sb);
  return sb->was_killed ? sb->reason : NULL;
}

size_t ebb_sandbox_memory(ebb_sandbox *sb) {
  return sb->used;
}

lua_State *ebb_sandbox_state(ebb_sandbox *sb) {
  return sb->L;
}

/* -------------------------------------------------------- module loading */

/* A fresh module environment: globals land in it, reads fall back to the
   safe globals; its metatable is hidden so the safe globals stay out of
   reach (writing to them would change every module's world). */
static void push_env(lua_State *L) {
  lua_createtable(L, 0, 4);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &KEY_ENVMT);
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_setfield(L, -2, "_G");
}

/* --------------------------------------------------------- kept sources
 *
 * The text of every Lua file a sandbox loads is kept, by path. A host that
 * rebuilds its sandbox after a kill passes the same sources to the new one,
 * which then runs the code that was running, not whatever the file holds
 * now (an edit saved without a reload, perhaps broken). */

typedef struct {
  char *path;
  char *text;
  size_t len;
} source;

struct ebb_sandbox_sources {
  source *items;
  size_t n, cap;
};

ebb_sandbox_sources *ebb_sandbox_sources_new(void) {
  return calloc(1, sizeof(ebb_sandbox_sources));
}

void ebb_sandbox_sources_free(ebb_sandbox_sources *src) {
  if (src == NULL) return;
  for (size_t i = 0; i < src->n; i++) {
    free(src->items[i].path);
    free(src->items[i].text);
  }
  free(src->items);
  free(src);
}

/* The kept text of path, reading (and keeping) the file the first time.
   NULL with errno set when it cannot be read (ENOMEM included). */
static const source *source_get(ebb_sandbox_sources *src, const char *path) {
  for (size_t i = 0; i < src->n; i++)
    if (strcmp(src->items[i].path, path) == 0) return &src->items[i];
  if (src->n == src->cap) {
    size_t cap = src->cap ? src->cap * 2 : 16;
    source *p = realloc(src->items, cap * sizeof *p);
    if (p == NULL) return errno = ENOMEM, NULL;
    src->items = p;
    src->cap = cap;
  }
  FILE *f = fopen(path, "rb");
  if (f == NULL) return NULL;
  char *text = NULL;
  size_t len = 0, cap = 0;
  int e = 0;
  for (;;) {
    if (len == cap) {
      cap = cap ? cap * 2 : 8192;
      char *p = realloc(text, cap);
      if (p == NULL) {
        e = ENOMEM;
        break;
      }
      text = p;
    }
    size_t got = fread(text + len, 1, cap - len, f);
    len += got;
    if (got == 0) {
      if (ferror(f)) e = EIO;
      break;
    }
  }
  fclose(f);
  char *copy = e == 0 ? strdup(path) : NULL;
  if (copy == NULL) {
    free(text);
    return errno = e ? e : ENOMEM, NULL;
  }
  source *it = &src->items[src->n++];
  it->path = copy;
  it->text = text;
  it->len = len;
  return it;
}

typedef struct text_reader {
  const char *p;
  size_t n;
  int newline;  /* give a "\n" first, for a skipped '#' line */
} text_reader;

static const char *read_text(lua_State *L, void *ud, size_t *size) {
  (void)L;
  text_reader *r = ud;
  if (r->newline) {
    r->newline = 0;
    *size = 1;
    return "\n";
  }
  *size = r->n;
  r->n = 0;
  return *size > 0 ? r->p : NULL;
}

/* Pushes the text chunk at path as a function with its own environment, or
   raises. Chunk name "@"..chunkname, so messages read "order.lua:12: ...".
   Like luaL_loadfilex it skips a UTF-8 BOM and a first '#' line (keeping
   line numbers), but it never accepts a binary chunk. The text comes from
   the kept sources (read from disk the first time). */
static void load_chunk(lua_State *L, const char *path, const char *chunkname, int *missing) {
  ebb_sandbox *sb = sb_of(L);
  const char *name = lua_pushfstring(L, "@%s", chunkname);
  errno = 0;
  const source *src = source_get(sb->sources, path);
  if (src == NULL) {
    int e = errno;
    if (missing != NULL && (e == ENOENT || e == ENOTDIR)) *missing = 1;
    luaL_error(L, "cannot open %s: %s", path, strerror(e));
  }
  text_reader r = {src->text, src->len, 0};
  if (r.n >= 3 && memcmp(r.p, "\xEF\xBB\xBF", 3) == 0) r.p += 3, r.n -= 3;
  if (r.n > 0 && r.p[0] == '#') {
    const char *nl = memchr(r.p, '\n', r.n);
    size_t skip = nl != NULL ? (size_t)(nl - r.p) + 1 : r.n;
    r.newline = nl != NULL;
    r.p += skip;
    r.n -= skip;
  } else if (r.n > 0 && r.p[0] == LUA_SIGNATURE[0]) {
    luaL_error(L, "cannot load %s: binary chunks are not allowed", chunkname);
  }
  if (lua_load(L, read_text, &r, name, "t") != LUA_OK) lua_error(L);
  lua_remove(L, -2); /* the chunk name */
  push_env(L);
  if (lua_setupvalue(L, -2, 1) == NULL) lua_pop(L, 1);
}

/* ebb_sandbox_load_file's body, run inside ebb_sandbox_call. */
static int l_loadfile(lua_State *L) {
  ebb_sandbox *sb = sb_of(L);
  const char *path = lua_touserdata(L, 1);
  const char *chunkname = lua_touserdata(L, 2);
  lua_settop(L, 0);
  load_chunk(L, path, chunkname, &sb->missing_file);
  lua_call(L, 0, 1);
  return 1;
}

int ebb_sandbox_load_file(ebb_sandbox *sb, const char *path, const char *chunkname, ebb_error *err) {
  lua_State *L = sb->L;
  if (chunkname == NULL) chunkname = path;
  if (!lua_checkstack(L, 3))
    return ebb_error_set(err, EBB_ENOMEM, "cannot load %s: out of memory", chunkname);
  lua_pushcfunction(L, l_loadfile);
  lua_pushlightuserdata(L, (void *)path);
  lua_pushlightuserdata(L, (void *)chunkname);
  sb->missing_file = 0;
  int status = ebb_sandbox_call(sb, 2, 1);
  if (status == LUA_OK) return 0;
  int code = EBB_ESCRIPT;
  if (sb->was_killed) {
    ebb_error_set(err, code, "loading %s: %s", chunkname, sb->reason);
  } else {
    if (sb->missing_file) code = EBB_ENOTFOUND;
    else if (status == LUA_ERRMEM) code = EBB_ENOMEM;
    if (lua_type(L, -1) == LUA_TSTRING)
      ebb_error_set(err, code, "%s", lua_tostring(L, -1));
    else
      ebb_error_set(err, code, "loading %s: error object is a %s value", chunkname, luaL_typename(L, -1));
  }
  lua_pop(L, 1);
  return code;
}

/* Module names are dotted identifiers: `^[%w_]+(%.[%w_]+)*$`, which rules
   out paths, "..", and anything a file system would read specially. */
static int valid_module_name(const char *s, size_t len) {
  if (len == 0 || len > 200) return 0;
  size_t seg = 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '.') {
      if (seg == 0) return 0;
      seg = 0;
    } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_') {
      seg++;
    } else {
      return 0;
    }
  }
  return seg > 0;
}

static int is_file(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Finds dir/a/b.lua or dir/a/b/init.lua, dirs in order. rel gets the path
   below the directory, used as the chunk name. */
static int find_module(ebb_sandbox *sb, const char *name, char *path, size_t pathsz, char *rel,
                       size_t relsz) {
  char base[256];
  size_t i;
  for (i = 0; name[i] != '\0' && i + 1 < sizeof base; i++) base[i] = name[i] == '.' ? '/' : name[i];
  base[i] = '\0';
  static const char *const patterns[] = {"%s.lua", "%s/init.lua"};
  for (size_t d = 0; d < sb->n_dirs; d++) {
    for (size_t p = 0; p < 2; p++) {
      int n = snprintf(rel, relsz, patterns[p], base);
      if (n < 0 || (size_t)n >= relsz) continue;
      n = snprintf(path, pathsz, "%s/%s", sb->dirs[d], rel);
      if (n < 0 || (size_t)n >= pathsz) continue;
      if (is_file(path)) return (int)d + 1;
    }
  }
  return 0;
}

/* __close of the guard require keeps while a module runs: if the module
   failed, forget the LOADING mark so a later require tries again instead of
   reporting a loop. A C function, so it runs even during a kill. */
static int guard_close(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &KEY_LOADED); /* 3 */
  lua_rawgeti(L, 1, 1);                           /* 4: name */
  lua_pushvalue(L, 4);
  lua_rawget(L, 3);
  if (lua_touserdata(L, -1) == &LOADING) {
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_rawset(L, 3);
  }
  return 0;
}

static void push_proxy(lua_State *L, const char *name, int real);

static int sb_require(lua_State *L) {
  ebb_sandbox *sb = sb_of(L);
  size_t len;
  const char *name = luaL_checklstring(L, 1, &len);
  if (!valid_module_name(name, len))
    return luaL_error(L, "invalid module name '%s' (expected dotted names of letters, digits and _)", name);
  lua_settop(L, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &KEY_LOADED); /* 2 */
  lua_pushvalue(L, 1);
  lua_rawget(L, 2);
  if (lua_touserdata(L, 3) == &LOADING)
    return luaL_error(L, "module '%s' is required recursively (a loop of requires)", name);
  if (!lua_isnil(L, 3)) return 1;
  lua_pop(L, 1);

  char path[PATH_MAX], rel[PATH_MAX];
  int found = find_module(sb, name, path, sizeof path, rel, sizeof rel);
  if (!found) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    lua_pushfstring(L, "module '%s' not found in ", name);
    luaL_addvalue(&b);
    if (sb->n_dirs == 0) luaL_addstring(&b, "(no module directories)");
    for (size_t d = 0; d < sb->n_dirs; d++) {
      if (d > 0) luaL_addstring(&b, ", ");
      luaL_addstring(&b, sb->dirs[d]);
    }
    luaL_pushresult(&b);
    luaL_where(L, 1);
    lua_insert(L, -2);
    lua_concat(L, 2);
    return lua_error(L);
  }

  lua_pushvalue(L, 1);
  lua_pushlightuserdata(L, &LOADING);
  lua_rawset(L, 2);
  lua_createtable(L, 1, 0); /* 3: guard */
  lua_pushvalue(L, 1);
  lua_rawseti(L, 3, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &KEY_GUARDMT);
  lua_setmetatable(L, 3);
  lua_toclose(L, 3);

  load_chunk(L, path, rel, NULL);
  lua_call(L, 0, 1); /* 4 */
  if (lua_isnil(L, 4)) {
    lua_pop(L, 1);
    lua_pushboolean(L, 1);
  }
  if (found == 1 && sb->has_runtime_dir && lua_istable(L, 4)) {
    /* The runtime's own library is shared by every module: nobody may change
       it for the others (ebb.reject turned into a no-op, say). */
    push_proxy(L, name, 4);
    lua_replace(L, 4);
  }
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 4);
  lua_rawset(L, 2);
  return 1; /* closing the guard now finds the value, not LOADING */
}

/* ------------------------------------------------------ replaced globals */

static int sb_print(lua_State *L) {
  int n = lua_gettop(L);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addstring(&b, "[lua] ");
  for (int i = 1; i <= n; i++) {
    if (i > 1) luaL_addchar(&b, '\t');
    luaL_tolstring(L, i, NULL);
    luaL_addvalue(&b);
  }
  luaL_addchar(&b, '\n');
  luaL_pushresult(&b);
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  fwrite(s, 1, len, stderr);
  fflush(stderr);
  return 0;
}

/* load, forced to text, with a fresh environment unless one is passed (the
   stock load would hand the chunk the shared safe globals). */
static int sb_load(lua_State *L) {
  int has_env = !lua_isnone(L, 4);
  lua_settop(L, 4);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_pushliteral(L, "t");
  if (has_env) lua_pushvalue(L, 4);
  else push_env(L);
  lua_call(L, 4, LUA_MULTRET);
  return lua_gettop(L) - 4;
}

/* The stock setmetatable, refusing __gc: finalizers run with hooks
   disabled, so a loop in one could not be stopped. Lua only marks an object
   for finalization if __gc is present when the metatable is set, so
   checking here is enough. */
static int sb_setmetatable(lua_State *L) {
  int t = lua_type(L, 2);
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_argexpected(L, t == LUA_TNIL || t == LUA_TTABLE, 2, "nil or table");
  if (t == LUA_TTABLE) {
    lua_pushliteral(L, "__gc");
    if (lua_rawget(L, 2) != LUA_TNIL)
      return luaL_error(L, "setmetatable: a metatable with a __gc field is not allowed in the sandbox "
                           "(finalizers run without the instruction budget)");
    lua_pop(L, 1);
  }
  if (luaL_getmetafield(L, 1, "__metatable") != LUA_TNIL)
    return luaL_error(L, "cannot change a protected metatable");
  lua_settop(L, 2);
  lua_setmetatable(L, 1);
  return 1;
}

/* rawset, refusing the read-only library proxies (it would bypass their
   __newindex and change string.format for every module). */
static int sb_rawset(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checkany(L, 2);
  luaL_checkany(L, 3);
  if (lua_getmetatable(L, 1)) {
    int ro = lua_rawgetp(L, -1, &KEY_READONLY) != LUA_TNIL;
    lua_pop(L, 2);
    if (ro) return luaL_error(L, "rawset: cannot modify a read-only library table");
  }
  lua_settop(L, 3);
  lua_rawset(L, 1);
  return 1;
}

static int sb_collectgarbage(lua_State *L) {
  const char *opt = luaL_optstring(L, 1, "collect");
  if (strcmp(opt, "count") != 0)
    return luaL_error(L, "collectgarbage('%s') is not allowed in the sandbox; only collectgarbage('count') is",
                      opt);
  int kb = lua_gc(L, LUA_GCCOUNT, 0);
  int b = lua_gc(L, LUA_GCCOUNTB, 0);
  lua_pushnumber(L, (lua_Number)kb + ((lua_Number)b / 1024));
  return 1;
}

/* xpcall whose message handler is a C wrapper around the user's: once the
   call is killed the user's handler is skipped, because for an error raised
   from inside our hook it would run with hooks disabled, unstoppable. */
static int xpcall_handler(lua_State *L) {
  if (sb_of(L)->killing) {
    lua_settop(L, 1);
    return 1;
  }
  int n = lua_gettop(L);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, n, 1);
  return 1;
}

static int finish_pcall(lua_State *L, int status, lua_KContext extra) {
  if (status != LUA_OK && status != LUA_YIELD) {
    lua_pushboolean(L, 0);
    lua_pushvalue(L, -2);
    return 2;
  }
  return lua_gettop(L) - (int)extra;
}

static int sb_xpcall(lua_State *L) {
  int n = lua_gettop(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_pushvalue(L, 2);
  lua_pushcclosure(L, xpcall_handler, 1);
  lua_replace(L, 2);
  lua_pushboolean(L, 1);
  lua_pushvalue(L, 1);
  lua_rotate(L, 3, 2);
  int status = lua_pcallk(L, n - 2, LUA_MULTRET, 2, 2, finish_pcall);
  return finish_pcall(L, status, 2);
}

/* ---------------------------------------------------------- coroutines
 *
 * resume, wrap and close are lcorolib's, except for one thing. A coroutine
 * that dies from the kill error dies inside our hook, where Lua has turned
 * hooks off for that thread, and they stay off. Closing it (wrap does so on
 * error, coroutine.close on request) would run its __close handlers with no
 * hook: a loop there would never end. Such threads are marked in their
 * extra space and never closed; their pending __close handlers are dropped.
 */

static void mark_if_killed(lua_State *co) {
  if (sb_of(co)->killing) *(void **)lua_getextraspace(co) = &POISONED;
}

static int is_poisoned(lua_State *co) {
  return *(void **)lua_getextraspace(co) == &POISONED;
}

static lua_State *get_co(lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  luaL_argexpected(L, co, 1, "coroutine");
  return co;
}

static int aux_resume(lua_State *L, lua_State *co, int narg) {
  int nres;
  if (!lua_checkstack(co, narg)) {
    lua_pushliteral(L, "too many arguments to resume");
    return -1;
  }
  lua_xmove(L, co, narg);
  int status = lua_resume(co, L, narg, &nres);
  if (status == LUA_OK || status == LUA_YIELD) {
    if (!lua_checkstack(L, nres + 1)) {
      lua_pop(co, nres);
      lua_pushliteral(L, "too many results to resume");
      return -1;
    }
    lua_xmove(co, L, nres);
    return nres;
  }
  mark_if_killed(co);
  lua_xmove(co, L, 1);
  return -1;
}

static int sb_co_resume(lua_State *L) {
  lua_State *co = get_co(L);
  int r = aux_resume(L, co, lua_gettop(L) - 1);
  if (r < 0) {
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;
  }
  lua_pushboolean(L, 1);
  lua_insert(L, -(r + 1));
  return r + 1;
}

static int close_thread(lua_State *co, lua_State *from) {
#if LUA_VERSION_RELEASE_NUM >= 50406
  return lua_closethread(co, from);
#else
  (void)from;
  return lua_resetthread(co);
#endif
}

static int aux_wrap(lua_State *L) {
  lua_State *co = lua_tothread(L, lua_upvalueindex(1));
  int r = aux_resume(L, co, lua_gettop(L));
  if (r < 0) {
    int stat = lua_status(co);
    if (stat != LUA_OK && stat != LUA_YIELD && !is_poisoned(co)) {
      stat = close_thread(co, L); /* close its to-be-closed variables */
      lua_xmove(co, L, 1);
    }
    if (stat != LUA_ERRMEM && lua_type(L, -1) == LUA_TSTRING) {
      luaL_where(L, 1);
      lua_insert(L, -2);
      lua_concat(L, 2);
    }
    return lua_error(L);
  }
  return r;
}

static int sb_co_wrap(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_State *co = lua_newthread(L);
  lua_pushvalue(L, 1);
  lua_xmove(L, co, 1);
  lua_pushcclosure(L, aux_wrap, 1);
  return 1;
}

static int sb_co_close(lua_State *L) {
  lua_State *co = get_co(L);
  if (is_poisoned(co)) {
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "coroutine was killed by the sandbox; its pending __close handlers are not run");
    return 2;
  }
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

/* -------------------------------------------------------------------- os
 *
 * Deterministic only: no clock, no environment, no processes. os.time
 * converts a date table and os.date formats a given time, both in UTC so
 * that a replay on a host in another time zone computes the same thing. */

#define L_MAXDATEFIELD (INT_MAX / 2)

static int date_field(lua_State *L, const char *key, int d, int delta) {
  int isnum;
  int t = lua_getfield(L, 1, key);
  lua_Integer res = lua_tointegerx(L, -1, &isnum);
  if (!isnum) {
    if (t != LUA_TNIL) return luaL_error(L, "field '%s' is not an integer", key);
    if (d < 0) return luaL_error(L, "field '%s' missing in date table", key);
    res = d;
  } else {
    if (!(res >= 0 ? res - delta <= L_MAXDATEFIELD : INT_MIN + delta <= res))
      return luaL_error(L, "field '%s' is out-of-bound", key);
    res -= delta;
  }
  lua_pop(L, 1);
  return (int)res;
}

static void set_date_field(lua_State *L, const char *key, int value, int delta) {
  lua_pushinteger(L, (lua_Integer)value + delta);
  lua_setfield(L, 1, key);
}

static int sb_os_time(lua_State *L) {
  if (lua_type(L, 1) != LUA_TTABLE)
    return luaL_argerror(L, 1, "date table expected (the sandbox has no clock; os.time only converts a UTC date table)");
  lua_settop(L, 1);
  struct tm ts;
  memset(&ts, 0, sizeof ts);
  ts.tm_year = date_field(L, "year", -1, 1900);
  ts.tm_mon = date_field(L, "month", -1, 1);
  ts.tm_mday = date_field(L, "day", -1, 0);
  ts.tm_hour = date_field(L, "hour", 12, 0);
  ts.tm_min = date_field(L, "min", 0, 0);
  ts.tm_sec = date_field(L, "sec", 0, 0);
  errno = 0;
  time_t t = timegm(&ts);
  if ((t == (time_t)-1 && errno != 0) || t != (time_t)(lua_Integer)t)
    return luaL_error(L, "time result cannot be represented in this installation");
  /* normalise the table's fields, as the stock os.time does */
  set_date_field(L, "year", ts.tm_year, 1900);
  set_date_field(L, "month", ts.tm_mon, 1);
  set_date_field(L, "day", ts.tm_mday, 0);
  set_date_field(L, "hour", ts.tm_hour, 0);
  set_date_field(L, "min", ts.tm_min, 0);
  set_date_field(L, "sec", ts.tm_sec, 0);
  set_date_field(L, "yday", ts.tm_yday, 1);
  set_date_field(L, "wday", ts.tm_wday, 1);
  lua_pushboolean(L, 0);
  lua_setfield(L, 1, "isdst");
  lua_pushinteger(L, (lua_Integer)t);
  return 1;
}

static int sb_os_date(lua_State *L) {
  size_t len;
  const char *fmt = luaL_optlstring(L, 1, "%c", &len);
  if (lua_isnoneornil(L, 2))
    return luaL_argerror(L, 2, "time expected (the sandbox has no clock; pass the time to format)");
  lua_pushvalue(L, lua_upvalueindex(1));
  if (fmt[0] == '!') {
    lua_pushlstring(L, fmt, len);
  } else {
    lua_pushliteral(L, "!");
    lua_pushlstring(L, fmt, len);
    lua_concat(L, 2);
  }
  lua_pushvalue(L, 2);
  lua_call(L, 2, 1);
  return 1;
}

/* ------------------------------------------------------------- set-up */

static int ro_newindex(lua_State *L) {
  return luaL_error(L, "attempt to modify read-only library table '%s'", lua_tostring(L, lua_upvalueindex(1)));
}

/* The iterator pairs() returns for a proxy: next over the real table, which
   stays an upvalue, so no script ever holds the writable table. */
static int ro_next(lua_State *L) {
  lua_settop(L, 2);
  if (lua_next(L, lua_upvalueindex(1))) return 2;
  lua_pushnil(L);
  return 1;
}

static int ro_pairs(lua_State *L) {
  lua_pushvalue(L, lua_upvalueindex(1)); /* the real table */
  lua_pushcclosure(L, ro_next, 1);
  lua_pushvalue(L, 1);
  lua_pushnil(L);
  return 3;
}

/* Pushes a read-only proxy of the table at index real: reads go through,
   writes raise (rawset included), the metatable is hidden, pairs walks the
   real table without handing it out. */
static void push_proxy(lua_State *L, const char *name, int real) {
  real = lua_absindex(L, real);
  lua_newtable(L);              /* proxy */
  lua_createtable(L, 0, 5);     /* its metatable */
  lua_pushvalue(L, real);
  lua_setfield(L, -2, "__index");
  lua_pushstring(L, name);
  lua_pushcclosure(L, ro_newindex, 1);
  lua_setfield(L, -2, "__newindex");
  lua_pushvalue(L, real);
  lua_pushcclosure(L, ro_pairs, 1);
  lua_setfield(L, -2, "__pairs");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  lua_pushboolean(L, 1);
  lua_rawsetp(L, -2, &KEY_READONLY);
  lua_setmetatable(L, -2);
}

/* Sets G[name] to a read-only proxy of the library table at index real. */
static void set_proxy(lua_State *L, int G, const char *name, int real, int next) {
  (void)next;
  push_proxy(L, name, real);
  lua_setfield(L, G, name);
}

static void copy_field(lua_State *L, int from, int to, const char *name) {
  lua_getfield(L, from, name);
  lua_setfield(L, to, name);
}

/* C loops that allocate nothing escape both the instruction hook and the
 * memory cap: string.rep of an empty string and table.move over a huge
 * range would spin for ever. These wrappers refuse such counts. */
#define MAX_C_LOOP ((lua_Integer)1 << 26)

/* string.rep builds its result by doubling what it has written, a few
 * large copies, where Lua's own copies one repetition at a time: 40 MB of
 * a one-byte string took 0.2 s of C work the hook cannot see. The result's
 * allocation is what the budget charges. */
static int sb_string_rep(lua_State *L) {
  size_t l, lsep;
  const char *s = luaL_checklstring(L, 1, &l);
  lua_Integer n = luaL_checkinteger(L, 2);
  const char *sep = luaL_optlstring(L, 3, "", &lsep);
  if (n <= 0 || l + lsep == 0) {
    lua_pushliteral(L, "");
    return 1;
  }
  size_t unit = l + lsep;
  if (unit < l || unit > ((size_t)INT64_MAX >> 1) / (lua_Unsigned)n)
    return luaL_error(L, "resulting string too large");
  size_t total = unit * (size_t)n - lsep;
  luaL_Buffer b;
  char *p = luaL_buffinitsize(L, &b, total);
  /* The result is the first `total` bytes of (s sep) repeated. */
  size_t done = l < total ? l : total;
  memcpy(p, s, done);
  if (done < total && lsep) {
    size_t k = lsep < total - done ? lsep : total - done;
    memcpy(p + done, sep, k);
    done += k;
  }
  while (done < total) {
    size_t k = done < total - done ? done : total - done;
    memcpy(p + done, p, k);
    done += k;
  }
  luaL_pushresultsize(&b, total);
  return 1;
}

static int sb_table_move(lua_State *L) {
  lua_Integer f = luaL_checkinteger(L, 2), e = luaL_checkinteger(L, 3);
  if (e >= f && (lua_Unsigned)e - (lua_Unsigned)f > (lua_Unsigned)MAX_C_LOOP)
    return luaL_error(L, "table.move: the range %I..%I is too large for the sandbox", f, e);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

/* table.sort compares in C, where the hook does not run: charge what a
   sort of n elements may cost up front (n log2 n comparisons). */
static int sb_table_sort(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Unsigned n = lua_rawlen(L, 1);
  int64_t cost = 0;
  for (lua_Unsigned m = n; m > 1; m >>= 1) cost += (int64_t)n;
  ebb_sandbox_charge(L, cost);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, 0);
  return 0;
}

/* getmetatable, except for the runtime's marker metatables (a field __ebb
   or __jsontype): those are shared by every module, so one that changed
   them (clearing __ebb, say) would change how the runtime treats every
   other module's values. For them it returns a fresh copy: reading works
   as before, writing changes nothing but the copy. */
static int sb_getmetatable(lua_State *L) {
  luaL_checkany(L, 1);
  if (!lua_getmetatable(L, 1)) {
    lua_pushnil(L);
    return 1;
  }
  int mt = lua_gettop(L);
  if (luaL_getmetafield(L, 1, "__metatable") != LUA_TNIL) return 1;
  lua_pushliteral(L, "__ebb");
  int marker = lua_rawget(L, mt) != LUA_TNIL;
  lua_pushliteral(L, "__jsontype");
  marker = lua_rawget(L, mt) != LUA_TNIL || marker;
  lua_settop(L, mt);
  if (!marker) return 1;
  lua_newtable(L);
  lua_pushnil(L);
  while (lua_next(L, mt)) {
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, -4);
  }
  return 1;
}

static int sb_init(lua_State *L) {
  enum { BASE = 1, CO, TAB, STR, MATH, UTF8, OS, G, OSLIB };
  luaL_requiref(L, LUA_GNAME, luaopen_base, 0);
  luaL_requiref(L, LUA_COLIBNAME, luaopen_coroutine, 0);
  luaL_requiref(L, LUA_TABLIBNAME, luaopen_table, 0);
  luaL_requiref(L, LUA_STRLIBNAME, luaopen_string, 0);
  luaL_requiref(L, LUA_MATHLIBNAME, luaopen_math, 0);
  luaL_requiref(L, LUA_UTF8LIBNAME, luaopen_utf8, 0);
  /* os is opened only to borrow date and difftime; it is not registered */
  lua_pushcfunction(L, luaopen_os);
  lua_call(L, 0, 1);
  lua_newtable(L); /* G: the safe globals */
  lua_newtable(L); /* OSLIB: the sandbox's os */

  /* Removed from the real tables, since strings reach theirs through the
     string metatable: ("").dump would otherwise still work. */
  lua_pushnil(L);
  lua_setfield(L, STR, "dump");
  lua_pushnil(L);
  lua_setfield(L, MATH, "random");
  lua_pushnil(L);
  lua_setfield(L, MATH, "randomseed");
  lua_pushcfunction(L, sb_string_rep);
  lua_setfield(L, STR, "rep");
  lua_getfield(L, TAB, "move");
  lua_pushcclosure(L, sb_table_move, 1);
  lua_setfield(L, TAB, "move");
  lua_getfield(L, TAB, "sort");
  lua_pushcclosure(L, sb_table_sort, 1);
  lua_setfield(L, TAB, "sort");
  ebb__pattern_install(L, STR);
  /* getmetatable("").__index.format = ... would change strings for every
     module: hide the string metatable. */
  lua_pushliteral(L, "");
  if (lua_getmetatable(L, -1)) {
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 1);
  }
  lua_pop(L, 1);

  static const char *const base_names[] = {
      "assert", "error", "ipairs", "next", "pairs", "pcall", "rawequal", "rawget", "rawlen",
      "select", "tonumber", "tostring", "type", "_VERSION", NULL};
  for (const char *const *n = base_names; *n != NULL; n++) copy_field(L, BASE, G, *n);
  lua_getfield(L, BASE, "load");
  lua_pushcclosure(L, sb_load, 1);
  lua_setfield(L, G, "load");
  lua_pushcfunction(L, sb_setmetatable);
  lua_setfield(L, G, "setmetatable");
  lua_pushcfunction(L, sb_getmetatable);
  lua_setfield(L, G, "getmetatable");
  lua_pushcfunction(L, sb_rawset);
  lua_setfield(L, G, "rawset");
  lua_pushcfunction(L, sb_xpcall);
  lua_setfield(L, G, "xpcall");
  lua_pushcfunction(L, sb_print);
  lua_setfield(L, G, "print");
  lua_pushcfunction(L, sb_collectgarbage);
  lua_setfield(L, G, "collectgarbage");
  lua_pushcfunction(L, sb_require);
  lua_setfield(L, G, "require");

  lua_pushcfunction(L, sb_co_resume);
  lua_setfield(L, CO, "resume");
  lua_pushcfunction(L, sb_co_wrap);
  lua_setfield(L, CO, "wrap");
  lua_getfield(L, CO, "close");
  lua_pushcclosure(L, sb_co_close, 1);
  lua_setfield(L, CO, "close");

  lua_pushcfunction(L, sb_os_time);
  lua_setfield(L, OSLIB, "time");
  lua_getfield(L, OS, "date");
  lua_pushcclosure(L, sb_os_date, 1);
  lua_setfield(L, OSLIB, "date");
  copy_field(L, OS, OSLIB, "difftime");

  lua_getfield(L, BASE, "next");
  int next = lua_gettop(L);
  set_proxy(L, G, LUA_STRLIBNAME, STR, next);
  set_proxy(L, G, LUA_TABLIBNAME, TAB, next);
  set_proxy(L, G, LUA_MATHLIBNAME, MATH, next);
  set_proxy(L, G, LUA_UTF8LIBNAME, UTF8, next);
  set_proxy(L, G, LUA_COLIBNAME, CO, next);
  set_proxy(L, G, LUA_OSLIBNAME, OSLIB, next);
  lua_pop(L, 1);

  /* The safe globals become the state's globals (what lua_getglobal and
     tracebacks see); the stock global table, with dofile and friends, is
     dropped. G deliberately holds no _G: a module that cleared its own _G
     would otherwise find the shared table behind it. */
  lua_pushvalue(L, G);
  lua_rawseti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushvalue(L, G);
  lua_setfield(L, -2, LUA_GNAME);
  lua_pop(L, 1);

  lua_createtable(L, 0, 2);
  lua_pushvalue(L, G);
  lua_setfield(L, -2, "__index");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  lua_rawsetp(L, LUA_REGISTRYINDEX, &KEY_ENVMT);

  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &KEY_LOADED);

  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, guard_close);
  lua_setfield(L, -2, "__close");
  lua_rawsetp(L, LUA_REGISTRYINDEX, &KEY_GUARDMT);
  return 0;
}

static int sb_panic(lua_State *L) {
  const char *msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "(error object is not a string)";
  fprintf(stderr, "ebb: unprotected error in the Lua sandbox: %s\n", msg);
  fflush(stderr);
  return 0; /* Lua aborts */
}

int ebb_sandbox_new(ebb_sandbox **out, const ebb_sandbox_options *opt, ebb_error *err) {
  *out = NULL;
  ebb_sandbox *sb = calloc(1, sizeof *sb);
  if (sb == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory creating the Lua sandbox");
  sb->limit = opt != NULL && opt->memory_limit > 0 ? opt->memory_limit : EBB_SANDBOX_DEFAULT_MEMORY;
  sb->budget = opt != NULL && opt->instruction_budget > 0 ? opt->instruction_budget : EBB_SANDBOX_DEFAULT_BUDGET;
  sb->hook_every = sb->budget < HOOK_EVERY ? (int)sb->budget : HOOK_EVERY;

  size_t n = opt != NULL ? opt->n_module_dirs + 1 : 0;
  sb->dirs = calloc(n > 0 ? n : 1, sizeof *sb->dirs);
  if (sb->dirs == NULL) goto oom;
  sb->sources = opt != NULL ? opt->sources : NULL;
  if (sb->sources == NULL) {
    if ((sb->sources = ebb_sandbox_sources_new()) == NULL) goto oom;
    sb->own_sources = 1;
  }
  if (opt != NULL && opt->runtime_dir != NULL) {
    if ((sb->dirs[sb->n_dirs++] = strdup(opt->runtime_dir)) == NULL) goto oom;
    sb->has_runtime_dir = 1;
  }
  for (size_t i = 0; opt != NULL && i < opt->n_module_dirs; i++) {
    if (opt->module_dirs[i] == NULL) continue;
    if ((sb->dirs[sb->n_dirs++] = strdup(opt->module_dirs[i])) == NULL) goto oom;
  }

  sb->L = lua_newstate(sb_alloc, sb);
  if (sb->L == NULL) {
    ebb_error_set(err, EBB_ENOMEM, "cannot create a Lua state within the memory limit of %zu bytes", sb->limit);
    ebb_sandbox_free(sb);
    return EBB_ENOMEM;
  }
  *(void **)lua_getextraspace(sb->L) = NULL; /* threads copy it: "not poisoned" */
  lua_atpanic(sb->L, sb_panic);
  lua_pushcfunction(sb->L, sb_init);
  int status = lua_pcall(sb->L, 0, 0, 0);
  if (status != LUA_OK) {
    int code = status == LUA_ERRMEM ? EBB_ENOMEM : EBB_ESCRIPT;
    const char *msg = lua_type(sb->L, -1) == LUA_TSTRING ? lua_tostring(sb->L, -1) : "unknown error";
    ebb_error_set(err, code, "cannot set up the Lua sandbox (memory limit %zu bytes): %s", sb->limit, msg);
    ebb_sandbox_free(sb);
    return code;
  }
  lua_sethook(sb->L, sb_hook, LUA_MASKCOUNT, sb->hook_every);
  *out = sb;
  return 0;

oom:
  ebb_sandbox_free(sb);
  return ebb_error_set(err, EBB_ENOMEM, "out of memory creating the Lua sandbox");
}

void ebb_sandbox_free(ebb_sandbox *sb) {
  if (sb == NULL) return;
  if (sb->L != NULL) lua_close(sb->L);
  for (size_t i = 0; i < sb->n_dirs; i++) free(sb->dirs[i]);
  free(sb->dirs);
  if (sb->own_sources) ebb_sandbox_sources_free(sb->sources);
  free(sb->traceback);
  free(sb);
}
