/*
 * runtime.c: the command path (see runtime.h).
 *
 * C owns the order of things and every resource; Lua only ever runs inside
 * ebb_sandbox_call. A command is decided in one protected call (decide())
 * that folds the stream, runs the handler and encodes the new events into C
 * memory owned by a `decision`; only after Lua is done does C append, so a
 * Lua failure of any kind cannot leave half an append behind.
 */
#include "runtime.h"

#include <dirent.h>
#include <sys/stat.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "json.h"
#include "module_dir.h"
#include "paths.h"
#include "sandbox.h"
#include "serialize.h"
#include "state_cache.h"
#include "uuid.h"

#define FOLD_CHUNK 1024
#define MAX_SPARE 256

struct ebb_runtime;
static void free_spares(struct ebb_runtime *rt);

struct ebb_runtime {
  ebb_store *store;
  ebb_sandbox *sb;
  int modules_ref;  /* registry: module name and type -> module table */
  int owners_ref;   /* registry: event type -> the module that declares its schema */
  struct schema_entry *schemas; /* event type -> current schema, for a quick check in C */
  size_t n_schemas;
  struct fingerprint_entry *fingerprints; /* aggregate type -> the fingerprint of its code */
  size_t n_fingerprints;
  int snapshots;                /* take and load snapshots */
  int snapshots_read_only;      /* ... but only load them */
  char *lua_dir;                /* the runtime's Lua library (part of every fingerprint) */
  char *aggregates_dir;
  size_t memory_limit;
  int64_t instruction_budget;
  int tainted;                  /* a call was killed: rebuild the Lua state before the next */
  /* What the running modules were loaded from, kept so that the rebuild
   * after a kill (recover) brings back the code that was running, not what
   * the directory holds now: the file names found, the text of every file
   * read, and (while recovering) the fingerprints computed then. */
  ebb_sandbox_sources *sources;
  char **module_names;
  size_t n_module_names;
  int reuse_names;              /* load_sandbox takes module_names as they are */
  int recovering;               /* ... and keeps the fingerprints too */
  uint64_t generation;          /* counts Lua states built: references die with theirs */
  struct pending_snapshot *pending; /* taken, not yet written (see ebb_runtime_flush) */
  size_t n_pending;
  ebb_state_cache *cache;
  char *types[32];              /* "aggregate\0type\0": ebb_runtime_stream_of's answers ... */
  size_t n_types;
  uint64_t types_generation;    /* ... for this Lua state */
  struct ebb_decided *spare;    /* finished decisions kept for reuse */
  size_t n_spare;
  ebb_buf problems; /* what loading the modules found, one line each */
  struct {                      /* see ebb_runtime_preload */
    int set, complete, final;
    char stream[EBB_MAX_NAME + 1];
    ebb_event_list events;
    char *unknown_command_id;
  } preload;
};

ebb_store *ebb_runtime_store(ebb_runtime *rt) {
  return rt->store;
}

/* ---------------------------------------------------------------- JSON of events */

/* Literal text of known length (no strlen at run time). */
#define PUT_LIT(out, s) ebb_buf_append((out), (s), sizeof(s) - 1)

void ebb_event_to_json(const ebb_event *e, ebb_buf *out) {
  size_t slen = strlen(e->stream);
  /* the whole object at once, give or take a few escapes */
  ebb_buf_reserve(out, 160 + 2 * slen + e->data_len + e->metadata_len + 48);
  PUT_LIT(out, "{\"position\":");
  ebb_buf_int(out, (long long)e->position);
  PUT_LIT(out, ",\"stream\":");
  ebb_buf_json_string(out, e->stream, slen);
  PUT_LIT(out, ",\"version\":");
  ebb_buf_int(out, (long long)e->version);
  PUT_LIT(out, ",\"id\":");
  ebb_buf_json_string(out, e->id, strlen(e->id));
  PUT_LIT(out, ",\"type\":");
  ebb_buf_json_string(out, e->type, strlen(e->type));
  PUT_LIT(out, ",\"schema\":");
  ebb_buf_int(out, (long long)e->schema);
  PUT_LIT(out, ",\"data\":");
  ebb_buf_append(out, e->data, e->data_len);
  PUT_LIT(out, ",\"metadata\":");
  ebb_buf_append(out, e->metadata, e->metadata_len);
  PUT_LIT(out, ",\"recorded_at\":");
  ebb_buf_json_string(out, e->recorded_at, strlen(e->recorded_at));
  if (e->upcast_error) {
    ebb_buf_puts(out, ",\"upcast_error\":");
    ebb_buf_json_string(out, e->upcast_error, strlen(e->upcast_error));
  }
  ebb_buf_putc(out, '}');
}

void ebb_append_answer(ebb_buf *out, const char *stream, const ebb_append_result *r,
                       const ebb_event_in *in, size_t n) {
  PUT_LIT(out, "{\"stream\":");
  ebb_buf_json_string(out, stream, strlen(stream));
  PUT_LIT(out, ",\"version\":");
  ebb_buf_int(out, (long long)r->version);
  PUT_LIT(out, ",\"position\":");
  ebb_buf_int(out, (long long)r->position);
  PUT_LIT(out, ",\"events\":[");
  for (size_t i = 0; i < n; i++) {
    ebb_event e = {
        .position = r->first_position + (int64_t)i,
        .version = r->first_version + (int64_t)i,
        .schema = in[i].schema,
        .stream = (char *)stream,
        .id = (char *)in[i].id,
        .type = (char *)in[i].type,
        .data = (char *)in[i].data,
        .data_len = in[i].data_len,
        .metadata = (char *)in[i].metadata,
        .metadata_len = in[i].metadata_len,
        .recorded_at = (char *)in[i].recorded_at,
    };
    if (i) ebb_buf_putc(out, ',');
    ebb_event_to_json(&e, out);
  }
  PUT_LIT(out, "]}");
}

/* `apply` sees no global position (with_position 0), since a command's new
 * events have none before their commit and a state must fold the same
 * either way; projections see it. */
void ebb_event_push(lua_State *L, const ebb_event *e, int with_position) {
  char msg[256];
  lua_createtable(L, 0, 10);
  if (with_position) {
    lua_pushinteger(L, e->position);
    lua_setfield(L, -2, "position");
    /* The id part of the stream ("o-1" in "Order-o-1"), so that no consumer
     * parses stream names; a stream without one has none. */
    const char *dash = strchr(e->stream, '-');
    if (dash) {
      lua_pushstring(L, dash + 1);
      lua_setfield(L, -2, "aggregate_id");
    }
  }
  lua_pushstring(L, e->stream);
  lua_setfield(L, -2, "stream");
  lua_pushinteger(L, e->version);
  lua_setfield(L, -2, "version");
  lua_pushstring(L, e->id);
  lua_setfield(L, -2, "id");
  lua_pushstring(L, e->type);
  lua_setfield(L, -2, "type");
  lua_pushinteger(L, e->schema);
  lua_setfield(L, -2, "schema");
  lua_pushstring(L, e->recorded_at);
  lua_setfield(L, -2, "recorded_at");
  if (ebb_json_decode(L, e->data, e->data_len, msg, sizeof msg) != 0)
    luaL_error(L, "stored event at position %I has unreadable data: %s", (lua_Integer)e->position,
               msg);
  lua_setfield(L, -2, "data");
  if (ebb_json_decode(L, e->metadata, e->metadata_len, msg, sizeof msg) != 0)
    luaL_error(L, "stored event at position %I has unreadable metadata: %s",
               (lua_Integer)e->position, msg);
  lua_setfield(L, -2, "metadata");
}

/* ---------------------------------------------------------------- modules */

/* Validates the module at index 1 (loaded from file name at index 2) and
 * registers it. Returns nothing when registered or not an aggregate, else a
 * problem string. Runs protected. */
static int l_register(lua_State *L) {
  const char *file = lua_tostring(L, 2);
  int registry = lua_upvalueindex(1);
  if (!lua_istable(L, 1)) {
    lua_pushfstring(L, "%s: the module returns %s, expected a table", file, luaL_typename(L, 1));
    return 1;
  }
  int has_type = lua_getfield(L, 1, "type") != LUA_TNIL;
  int has_handle = lua_getfield(L, 1, "handle") != LUA_TNIL;
  lua_pop(L, 2);
  if (!has_type && !has_handle) return 0; /* a helper library, not an aggregate */
  if (lua_getfield(L, 1, "type") != LUA_TSTRING || lua_rawlen(L, -1) == 0) {
    lua_pushfstring(L, "%s: `type` must be a non-empty string", file);
    return 1;
  }
  const char *type = lua_tostring(L, -1);
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_validate_name("`type`", type, &err) != 0 || strchr(type, '-') != NULL) {
    lua_pushfstring(L, "%s: %s", file,
                    err.code ? err.message : "`type` must not contain '-' (it names the category)");
    return 1;
  }
  lua_pop(L, 1);
  if (lua_getfield(L, 1, "initial") != LUA_TFUNCTION) {
    lua_pushfstring(L, "%s: `initial` must be a function returning the initial state", file);
    return 1;
  }
  lua_pop(L, 1);
  static const char *const tables[] = {"apply", "handle"};
  for (int t = 0; t < 2; t++) {
    if (lua_getfield(L, 1, tables[t]) != LUA_TTABLE) {
      lua_pushfstring(L, "%s: `%s` must be a table of functions keyed by %s type", file, tables[t],
                      t == 0 ? "event" : "command");
      return 1;
    }
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      if (lua_type(L, -2) != LUA_TSTRING || !lua_isfunction(L, -1)) {
        lua_pushfstring(L, "%s: %s[%s] must be a function keyed by a name, not %s", file,
                        tables[t], luaL_tolstring(L, -2, NULL), luaL_typename(L, -2));
        return 1;
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  int t = lua_getfield(L, 1, "snapshot_every");
  if (t != LUA_TNIL && (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1)) {
    lua_pushfstring(L, "%s: `snapshot_every` must be a positive integer", file);
    return 1;
  }
  lua_pop(L, 1);
  t = lua_getfield(L, 1, "schemas");
  if (t != LUA_TNIL) {
    if (t != LUA_TTABLE) {
      lua_pushfstring(L, "%s: `schemas` must be a table of event type -> schema version", file);
      return 1;
    }
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      if (lua_type(L, -2) != LUA_TSTRING || !lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1) {
        lua_pushfstring(L, "%s: schemas[%s] must be a positive integer", file,
                        luaL_tolstring(L, -2, NULL));
        return 1;
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  t = lua_getfield(L, 1, "upcast");
  if (t != LUA_TNIL) {
    if (t != LUA_TTABLE) {
      lua_pushfstring(L, "%s: `upcast` must be a table of event type -> {[schema] = function}", file);
      return 1;
    }
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      if (lua_type(L, -2) != LUA_TSTRING || !lua_istable(L, -1)) {
        lua_pushfstring(L, "%s: upcast[%s] must be a table of schema -> function", file,
                        luaL_tolstring(L, -2, NULL));
        return 1;
      }
      lua_pushnil(L);
      while (lua_next(L, -2)) {
        if (!lua_isinteger(L, -2) || lua_tointeger(L, -2) < 1 || !lua_isfunction(L, -1)) {
          lua_pushfstring(L, "%s: upcast[%s] must map schema numbers to functions", file,
                          lua_tostring(L, -4));
          return 1;
        }
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  /* Registered under its type ("Order") and its file name ("order"). */
  lua_pushvalue(L, 1);
  lua_getfield(L, 1, "type");
  if (lua_rawget(L, registry) != LUA_TNIL) {
    lua_pushfstring(L, "%s: another module already declares type %s", file, type);
    return 1;
  }
  lua_pop(L, 2);
  /* The event types whose schema it declares or upcasts are its own: each
   * stored event is upcast by exactly one module. */
  int owners = lua_upvalueindex(2);
  static const char *const declaring[2] = {"schemas", "upcast"};
  for (int pass = 0; pass < 2; pass++) /* check everything, then record */
    for (int k = 0; k < 2; k++) {
      if (lua_getfield(L, 1, declaring[k]) != LUA_TTABLE) {
        lua_pop(L, 1);
        continue;
      }
      lua_pushnil(L);
      while (lua_next(L, -2)) {
        lua_pop(L, 1);
        lua_pushvalue(L, -1);
        if (pass == 0) {
          if (lua_rawget(L, owners) != LUA_TNIL && !lua_rawequal(L, -1, 1)) {
            lua_getfield(L, -1, "type"); /* key, owner, owner's type */
            lua_pushfstring(L, "%s: event type %s is already declared by the %s aggregate", file,
                            lua_tostring(L, -3), lua_tostring(L, -1));
            return 1;
          }
          lua_pop(L, 1);
        } else {
          lua_pushvalue(L, 1);
          lua_rawset(L, owners);
        }
      }
      lua_pop(L, 1);
    }
  lua_getfield(L, 1, "type");
  lua_pushvalue(L, 1);
  lua_rawset(L, registry);
  size_t n = strlen(file);
  lua_pushlstring(L, file, n > 4 ? n - 4 : n);
  lua_pushvalue(L, 1);
  lua_rawset(L, registry);
  lua_pushboolean(L, 1); /* an aggregate */
  return 1;
}

/* ---------------------------------------------------------------- fingerprints */

typedef struct fingerprint_entry {
  char *type;
  char *value; /* "code:<hex>" or "declared:<snapshot_version>" */
} fingerprint_entry;

/* A file's bytes folded into h (h unchanged if it cannot be read). */
static uint64_t hash_file(uint64_t h, const char *path) {
  ebb_file_hash(path, &h);
  return h;
}

static int names_cmp(const void *a, const void *b);

/* Folds every .lua file below dir (sorted, recursively) into h, by relative
 * name and content; top-level files flagged in skip (aggregates) are left out. */
static uint64_t hash_tree(uint64_t h, const char *dir, const char *rel, char **skip, int *kinds,
                          size_t nskip, int depth) {
  char path[4096];
  snprintf(path, sizeof path, "%s%s%s", dir, rel[0] ? "/" : "", rel);
  DIR *d = depth < 16 ? opendir(path) : NULL;
  if (d == NULL) return h;
  char **names = NULL;
  size_t n = 0;
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    if (de->d_name[0] == '.') continue;
    char **p = realloc(names, (n + 1) * sizeof *names);
    if (p == NULL) break;
    names = p;
    if ((names[n] = strdup(de->d_name)) != NULL) n++;
  }
  closedir(d);
  if (names) qsort(names, n, sizeof *names, names_cmp);
  for (size_t i = 0; i < n; i++) {
    char sub[2048], full[4096];
    snprintf(sub, sizeof sub, "%s%s%s", rel, rel[0] ? "/" : "", names[i]);
    snprintf(full, sizeof full, "%s/%s", dir, sub);
    struct stat st;
    int skipped = 0;
    for (size_t k = 0; depth == 0 && k < nskip; k++)
      if (kinds[k] == 1 && strcmp(skip[k], names[i]) == 0) skipped = 1;
    size_t len = strlen(names[i]);
    if (skipped || stat(full, &st) != 0) {
    } else if (S_ISDIR(st.st_mode)) {
      h = hash_tree(h, dir, sub, skip, kinds, nskip, depth + 1);
    } else if (len > 4 && strcmp(names[i] + len - 4, ".lua") == 0) {
      h = hash_file(ebb_fnv1a(h, sub, strlen(sub) + 1), full);
    }
    free(names[i]);
  }
  free(names);
  return h;
}

/* Argument: a module's file name. Returns its type and snapshot_version. */
static int l_module_identity(lua_State *L) {
  ebb_runtime *rt = lua_touserdata(L, 1);
  size_t n;
  const char *file = lua_tolstring(L, 2, &n);
  lua_rawgeti(L, LUA_REGISTRYINDEX, rt->modules_ref);
  lua_pushlstring(L, file, n - 4);
  if (lua_rawget(L, -2) != LUA_TTABLE) return 0;
  lua_getfield(L, -1, "type");
  if (lua_getfield(L, -2, "snapshot_version") != LUA_TNIL) {
    luaL_tolstring(L, -1, NULL);
    lua_remove(L, -2);
  }
  return 2;
}

/* A snapshot may be loaded only by the code that made it: the aggregate's
 * module and every helper module beside it (upcasters, shared functions), or
 * the snapshot_version the module declares instead. */
static void compute_fingerprints(ebb_runtime *rt, const char *dir, char **names, int *kinds,
                                 size_t n) {
  lua_State *L = ebb_sandbox_state(rt->sb);
  /* Everything an aggregate can require: the helpers beside it (and below,
   * as in require "lib.money") and the runtime's own library. */
  uint64_t helpers = hash_tree(EBB_FNV1A_INIT, dir, "", names, kinds, n, 0);
  helpers = hash_tree(helpers, rt->lua_dir, "", NULL, NULL, 0, 0);
  char path[4096];
  for (size_t i = 0; i < n; i++) {
    if (kinds[i] != 1) continue;
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    uint64_t h = hash_file(ebb_fnv1a(helpers, "\x01", 1), path);
    h = ebb_fnv1a(h, &(int){EBB_SERIALIZE_VERSION}, sizeof(int));
    lua_pushcfunction(L, l_module_identity);
    lua_pushlightuserdata(L, rt);
    lua_pushstring(L, names[i]);
    if (ebb_sandbox_call(rt->sb, 2, 2) != LUA_OK) {
      lua_pop(L, 1);
      continue;
    }
    char value[EBB_MAX_NAME + 16];
    if (lua_isstring(L, -1)) snprintf(value, sizeof value, "declared:%s", lua_tostring(L, -1));
    else snprintf(value, sizeof value, "code:%016llx", (unsigned long long)h);
    fingerprint_entry *p = lua_isstring(L, -2)
                         ? realloc(rt->fingerprints, (rt->n_fingerprints + 1) * sizeof *p)
                         : NULL;
    if (p != NULL) {
      rt->fingerprints = p;
      p[rt->n_fingerprints].type = strdup(lua_tostring(L, -2));
      p[rt->n_fingerprints].value = strdup(value);
      if (p[rt->n_fingerprints].type && p[rt->n_fingerprints].value) rt->n_fingerprints++;
      else free(p[rt->n_fingerprints].type), free(p[rt->n_fingerprints].value);
    }
    lua_pop(L, 2);
  }
}

static const char *fingerprint_of(const ebb_runtime *rt, const char *type, size_t len) {
  for (size_t i = 0; i < rt->n_fingerprints; i++)
    if (strncmp(rt->fingerprints[i].type, type, len) == 0 && rt->fingerprints[i].type[len] == 0)
      return rt->fingerprints[i].value;
  return NULL;
}

static int names_cmp(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static void free_module_names(ebb_runtime *rt) {
  for (size_t i = 0; i < rt->n_module_names; i++) free(rt->module_names[i]);
  free(rt->module_names);
  rt->module_names = NULL;
  rt->n_module_names = 0;
}

typedef struct name_list {
  char **names;
  size_t n, cap;
} name_list;

static void add_module_name(void *ud, const char *name, const char *path) {
  (void)path;
  name_list *l = ud;
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 16;
    char **p = realloc(l->names, cap * sizeof *p);
    if (p == NULL) return;
    l->names = p;
    l->cap = cap;
  }
  if ((l->names[l->n] = ebb_strdupf("%s.lua", name)) != NULL) l->n++;
}

/* Lists the module files of dir into rt->module_names, sorted. */
static int list_modules(ebb_runtime *rt, const char *dir) {
  name_list l = {0};
  if (ebb_module_dir_each(dir, add_module_name, &l)) return -1;
  char **names = l.names;
  size_t n = l.n;
  if (n > 0) qsort(names, n, sizeof *names, names_cmp);
  rt->module_names = names;
  rt->n_module_names = n;
  return 0;
}

static void load_modules(ebb_runtime *rt, const char *dir) {
  lua_State *L = ebb_sandbox_state(rt->sb);
  /* A rebuild after a kill loads the files found before, from the kept
   * texts; otherwise the directory is read now. */
  if (!rt->reuse_names) {
    free_module_names(rt);
    if (list_modules(rt, dir) != 0) {
      ebb_buf_printf(&rt->problems, "%s: cannot open the aggregates directory\n", dir);
      return;
    }
  }
  char **names = rt->module_names;
  size_t n = rt->n_module_names;
  int *kinds = calloc(n ? n : 1, sizeof *kinds); /* 0 helper, 1 aggregate, -1 broken */
  for (size_t i = 0; i < n && kinds; i++) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    ebb_error err;
    ebb_error_init(&err);
    if (ebb_sandbox_load_file(rt->sb, path, names[i], &err) != 0) {
      ebb_buf_printf(&rt->problems, "%s\n", err.message);
      ebb_error_clear(&err);
      kinds[i] = -1;
      continue;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, rt->modules_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, rt->owners_ref);
    lua_pushcclosure(L, l_register, 2);
    lua_insert(L, -2);
    lua_pushstring(L, names[i]);
    int status = ebb_sandbox_call(rt->sb, 2, 1);
    if (status != LUA_OK)
      ebb_buf_printf(&rt->problems, "%s: %s\n", names[i],
                     lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "validation failed");
    else if (lua_type(L, -1) == LUA_TSTRING)
      ebb_buf_printf(&rt->problems, "%s\n", lua_tostring(L, -1));
    kinds[i] = status != LUA_OK || lua_type(L, -1) == LUA_TSTRING ? -1 : lua_toboolean(L, -1);
    lua_pop(L, 1);
  }
  if (kinds && !rt->recovering) compute_fingerprints(rt, dir, names, kinds, n);
  free(kinds);
}

/* ---------------------------------------------------------------- upcasting */

typedef struct schema_entry {
  char *type;
  int64_t schema;
} schema_entry;

/* The current schema of `type` by the module at mi: its `schemas` entry; for
 * a type it only upcasts (one renamed away), one past its last upcaster;
 * else 1. Leaves the stack as it was. */
static lua_Integer current_schema(lua_State *L, int mi, const char *type) {
  int top = lua_gettop(L);
  mi = lua_absindex(L, mi);
  lua_Integer current = 1;
  if (lua_getfield(L, mi, "schemas") == LUA_TTABLE && lua_getfield(L, -1, type) == LUA_TNUMBER) {
    current = lua_tointeger(L, -1);
  } else {
    lua_settop(L, top);
    if (lua_getfield(L, mi, "upcast") == LUA_TTABLE && lua_getfield(L, -1, type) == LUA_TTABLE) {
      lua_pushnil(L);
      while (lua_next(L, -2)) {
        lua_pop(L, 1);
        if (lua_isinteger(L, -1) && lua_tointeger(L, -1) >= current)
          current = lua_tointeger(L, -1) + 1;
      }
    }
  }
  lua_settop(L, top);
  return current;
}

/* Copies event type -> current schema out of the modules, so that deciding
 * whether a stored event needs upcasting costs no Lua call. Argument: rt. */
static int l_collect_schemas(lua_State *L) {
  ebb_runtime *rt = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, rt->owners_ref);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    int64_t schema = current_schema(L, -1, lua_tostring(L, -2));
    lua_pop(L, 1);
    schema_entry *p = realloc(rt->schemas, (rt->n_schemas + 1) * sizeof *p);
    if (p == NULL) return luaL_error(L, "out of memory");
    rt->schemas = p;
    if ((p[rt->n_schemas].type = strdup(lua_tostring(L, -1))) == NULL)
      return luaL_error(L, "out of memory");
    p[rt->n_schemas++].schema = schema;
  }
  return 0;
}

/* Does a stored event of this type and schema need the upcasters (or is it
 * newer than the code, which they must refuse)? */
static int needs_upcast(const ebb_runtime *rt, const char *type, int64_t schema) {
  for (size_t i = 0; i < rt->n_schemas; i++)
    if (strcmp(rt->schemas[i].type, type) == 0) return schema != rt->schemas[i].schema;
  return 0;
}

/* ---------------------------------------------------------------- describing the modules */

static int cmp_cstr(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Sorted, comma-separated JSON strings of the keys of the tables at the given
 * stack indexes (0: none), each once. Key strings stay alive in those tables;
 * the array is a userdata, so a raise frees it. */
static void sorted_keys(lua_State *L, int t1, int t2, const ebb_runtime *rt, int with_schema,
                        ebb_buf *b) {
  size_t n = 0;
  for (int k = 0; k < 2; k++) {
    int t = k ? t2 : t1;
    if (!t) continue;
    lua_pushnil(L);
    while (lua_next(L, t)) {
      lua_pop(L, 1);
      n++;
    }
  }
  const char **keys = lua_newuserdatauv(L, (n ? n : 1) * sizeof *keys, 0);
  size_t m = 0;
  for (int k = 0; k < 2; k++) {
    int t = k ? t2 : t1;
    if (!t) continue;
    lua_pushnil(L);
    while (lua_next(L, t)) {
      lua_pop(L, 1);
      if (lua_type(L, -1) == LUA_TSTRING) keys[m++] = lua_tostring(L, -1);
    }
  }
  qsort(keys, m, sizeof *keys, cmp_cstr);
  for (size_t i = 0, out = 0; i < m; i++) {
    if (i && strcmp(keys[i], keys[i - 1]) == 0) continue;
    if (out++) ebb_buf_putc(b, ',');
    if (with_schema) ebb_buf_puts(b, "{\"type\":");
    ebb_buf_json_string(b, keys[i], strlen(keys[i]));
    if (with_schema)
      ebb_buf_printf(b, ",\"schema\":%lld}", (long long)ebb_runtime_schema_of(rt, keys[i]));
  }
  lua_pop(L, 1);
}

/* Arguments: the runtime, the buffer. Appends the modules' JSON. */
static int l_modules(lua_State *L) {
  ebb_runtime *rt = lua_touserdata(L, 1);
  ebb_buf *b = lua_touserdata(L, 2);
  lua_rawgeti(L, LUA_REGISTRYINDEX, rt->modules_ref);
  int modules = lua_gettop(L);
  /* The registry holds each module under its file name and its type: the
   * types, sorted, name each aggregate once. */
  lua_newtable(L);
  int types = lua_gettop(L);
  for (size_t i = 0; i < rt->n_module_names; i++) {
    size_t len = strlen(rt->module_names[i]);
    if (len < 4) continue;
    int top = lua_gettop(L);
    lua_pushlstring(L, rt->module_names[i], len - 4);
    if (lua_rawget(L, modules) == LUA_TTABLE && lua_getfield(L, -1, "type") == LUA_TSTRING) {
      lua_pushstring(L, rt->module_names[i]);
      lua_rawset(L, types); /* type -> file */
    }
    lua_settop(L, top);
  }
  ebb_buf_putc(b, '[');
  int first = 1;
  /* sorted_keys orders the commands and events; the types are ordered the
   * same way, through a sorted copy of their names. */
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, types)) {
    lua_pop(L, 1);
    n++;
  }
  const char **names = lua_newuserdatauv(L, (n ? n : 1) * sizeof *names, 0);
  size_t m = 0;
  lua_pushnil(L);
  while (lua_next(L, types)) {
    lua_pop(L, 1);
    names[m++] = lua_tostring(L, -1);
  }
  qsort(names, m, sizeof *names, cmp_cstr);
  for (size_t i = 0; i < m; i++) {
    int top = lua_gettop(L);
    lua_getfield(L, types, names[i]);
    const char *file = lua_tostring(L, -1);
    lua_pushstring(L, names[i]);
    lua_rawget(L, modules);
    int mod = lua_gettop(L);
    if (!first) ebb_buf_putc(b, ',');
    first = 0;
    ebb_buf_puts(b, "{\"type\":");
    ebb_buf_json_string(b, names[i], strlen(names[i]));
    ebb_buf_puts(b, ",\"file\":");
    ebb_buf_json_string(b, file, strlen(file));
    ebb_buf_puts(b, ",\"commands\":[");
    int handle = lua_getfield(L, mod, "handle") == LUA_TTABLE ? lua_gettop(L) : 0;
    sorted_keys(L, handle, 0, rt, 0, b);
    ebb_buf_puts(b, "],\"events\":[");
    int apply = lua_getfield(L, mod, "apply") == LUA_TTABLE ? lua_gettop(L) : 0;
    int schemas = lua_getfield(L, mod, "schemas") == LUA_TTABLE ? lua_gettop(L) : 0;
    sorted_keys(L, apply, schemas, rt, 1, b);
    ebb_buf_puts(b, "]}");
    lua_settop(L, top);
  }
  ebb_buf_putc(b, ']');
  return 0;
}

int ebb_runtime_modules(ebb_runtime *rt, ebb_buf *out, ebb_error *err) {
  lua_State *L = ebb_sandbox_state(rt->sb);
  lua_pushcfunction(L, l_modules);
  lua_pushlightuserdata(L, rt);
  lua_pushlightuserdata(L, out);
  if (ebb_sandbox_call(rt->sb, 2, 0) != LUA_OK) {
    ebb_error_set(err, EBB_ESCRIPT, "describing the modules: %s",
                  lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "failed");
    lua_pop(L, 1);
    return err->code;
  }
  if (out->oom) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  return 0;
}

int64_t ebb_runtime_schema_of(const ebb_runtime *rt, const char *type) {
  for (size_t i = 0; i < rt->n_schemas; i++)
    if (strcmp(rt->schemas[i].type, type) == 0) return rt->schemas[i].schema;
  return 1;
}

/* Brings the event table on top of the stack to its type's current schema,
 * one upcaster at a time; a rename continues with the new type's chain.
 * Raises with the event's position, type and schema on any failure. */
static void upcast_top(lua_State *L, ebb_runtime *rt, lua_Integer position) {
  int ei = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, rt->owners_ref);
  int owners = lua_gettop(L);
  for (int steps = 0;; steps++) {
    lua_getfield(L, ei, "type");
    const char *type = lua_tostring(L, -1);
    lua_getfield(L, ei, "schema");
    lua_Integer schema = lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (lua_getfield(L, owners, type) != LUA_TTABLE) { /* nobody declares it: as stored */
      lua_settop(L, ei);
      return;
    }
    int mi = lua_gettop(L);
    lua_Integer current = current_schema(L, mi, type);
    if (schema == current) {
      lua_settop(L, ei);
      return;
    }
    if (schema > current || steps > 1000)
      luaL_error(L, "event at position %I (%s, schema %I) is newer than the code: its aggregate "
                 "declares schema %I", position, type, schema, current);
    if (lua_getfield(L, mi, "upcast") != LUA_TTABLE || lua_getfield(L, -1, type) != LUA_TTABLE ||
        lua_rawgeti(L, -1, schema) != LUA_TFUNCTION)
      luaL_error(L, "event at position %I (%s, schema %I) cannot be read: no upcaster "
                 "upcast.%s[%I] to schema %I", position, type, schema, type, schema, schema + 1);
    lua_getfield(L, ei, "data");
    if (lua_pcall(L, 1, 2, 0) != LUA_OK) {
      if (ebb_sandbox_killed(rt->sb) || lua_type(L, -1) != LUA_TSTRING) lua_error(L);
      luaL_error(L, "upcaster upcast.%s[%I] failed on the event at position %I: %s", type, schema,
                 position, lua_tostring(L, -1));
    }
    if (!lua_istable(L, -2))
      luaL_error(L, "upcaster upcast.%s[%I] returned %s for the event at position %I, expected "
                 "its data as a table", type, schema, luaL_typename(L, -2), position);
    int list = lua_rawlen(L, -2) > 0;
    if (!list && lua_getmetatable(L, -2)) {
      lua_getfield(L, -1, "__jsontype");
      list = lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "array") == 0;
      lua_pop(L, 2);
    }
    if (list)
      luaL_error(L, "upcaster upcast.%s[%I] returned a list for the event at position %I; event "
                 "data is a table with string keys", type, schema, position);
    if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
      luaL_error(L, "upcaster upcast.%s[%I] returned a new type that is not a string (event at "
                 "position %I)", type, schema, position);
    if (lua_isstring(L, -1)) lua_setfield(L, ei, "type");
    else lua_pop(L, 1);
    lua_setfield(L, ei, "data");
    lua_pushinteger(L, schema + 1);
    lua_setfield(L, ei, "schema");
    lua_settop(L, owners);
  }
}

int ebb_runtime_check_schema(const ebb_runtime *rt, const char *type, int64_t schema,
                             ebb_error *err) {
  for (size_t i = 0; i < rt->n_schemas; i++) {
    if (strcmp(rt->schemas[i].type, type) != 0) continue;
    if (schema <= rt->schemas[i].schema) return 0;
    return ebb_error_set(err, EBB_EBADREQ,
                         "event type %s has schema %lld, newer than the code knows: the aggregate "
                         "modules' schemas declare %s at schema %lld; deploy the code that "
                         "declares it before storing such events",
                         type, (long long)schema, type, (long long)rt->schemas[i].schema);
  }
  return 0;
}

typedef struct upcast_job {
  ebb_runtime *rt;
  ebb_event_list *events;
  size_t at; /* the event being upcast: where a failure happened */
} upcast_job;

/* Rewrites, in the list, the events from job->at on that need upcasting.
 * Argument: the job. */
static int l_upcast_list(lua_State *L) {
  upcast_job *job = lua_touserdata(L, 1);
  char msg[512];
  for (size_t i = job->at; i < job->events->n; i++) {
    job->at = i;
    ebb_event *e = &job->events->items[i];
    if (!needs_upcast(job->rt, e->type, e->schema)) continue;
    lua_settop(L, 1);
    ebb_event_push(L, e, 0);
    upcast_top(L, job->rt, (lua_Integer)e->position);
    ebb_buf b = EBB_BUF_INIT;
    lua_getfield(L, 2, "data");
    snprintf(msg, sizeof msg, "it is not a table with string keys (a JSON object)");
    if (ebb_json_encode(L, -1, &b, msg, sizeof msg) != 0 || b.len == 0 || b.data[0] != '{') {
      ebb_buf_free(&b);
      luaL_error(L, "the upcast data of the event at position %I cannot be stored: %s",
                 (lua_Integer)e->position, msg);
    }
    lua_getfield(L, 2, "type");
    char *type = strdup(lua_tostring(L, -1));
    size_t len;
    char *data = ebb_buf_take(&b, &len);
    if (type == NULL || data == NULL) {
      free(type);
      free(data);
      luaL_error(L, "out of memory");
    }
    lua_getfield(L, 2, "schema");
    free(e->type);
    free(e->data);
    e->type = type;
    e->data = data;
    e->data_len = len;
    e->schema = lua_tointeger(L, -1);
  }
  return 0;
}

static int recover(ebb_runtime *rt, ebb_error *err);

/* Upcasts events[*at ..]: 0, or EBB_ESCRIPT with *at naming the event that failed. */
static int upcast_from(ebb_runtime *rt, ebb_event_list *events, size_t *at, ebb_error *err) {
  if (recover(rt, err) != 0) return err->code;
  size_t i = *at;
  while (i < events->n && !needs_upcast(rt, events->items[i].type, events->items[i].schema)) i++;
  if (i == events->n) return 0; /* the common case: nothing to do, no Lua */
  lua_State *L = ebb_sandbox_state(rt->sb);
  upcast_job job = {rt, events, i};
  lua_pushcfunction(L, l_upcast_list);
  lua_pushlightuserdata(L, &job);
  if (ebb_sandbox_call(rt->sb, 1, 0) != LUA_OK) {
    const char *killed = ebb_sandbox_killed(rt->sb);
    if (killed) rt->tainted = 1;
    ebb_error_set(err, EBB_ESCRIPT, "%s",
                  killed ? killed : lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1)
                                                                    : "upcasting failed");
    lua_pop(L, 1);
    *at = job.at;
    return EBB_ESCRIPT;
  }
  return 0;
}

int ebb_runtime_upcast(ebb_runtime *rt, ebb_event_list *events, ebb_error *err) {
  size_t at = 0;
  return upcast_from(rt, events, &at, err);
}

int ebb_runtime_upcast_each(ebb_runtime *rt, ebb_event_list *events, ebb_error *err) {
  size_t at = 0;
  for (;;) {
    ebb_error e;
    ebb_error_init(&e);
    int rc = upcast_from(rt, events, &at, &e);
    if (rc == 0) return 0;
    if (rc != EBB_ESCRIPT || at >= events->n || rt->sb == NULL) {
      ebb_error_move(err, &e);
      return rc;
    }
    /* This event stays as stored, saying why; the others go on. */
    ebb_event *ev = &events->items[at];
    free(ev->upcast_error);
    ev->upcast_error = strdup(e.message);
    ebb_error_clear(&e);
    if (ev->upcast_error == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
    at++;
  }
}

int ebb__lua_prepare(lua_State *L) {
  lua_getglobal(L, "require");
  lua_pushliteral(L, "ebb");
  lua_call(L, 1, 1);
  if (lua_istable(L, -1)) { /* a read-only proxy: set raw, past its __newindex */
    lua_pushliteral(L, "null");
    ebb_json_push_null(L);
    lua_rawset(L, -3);
  }
  return 0;
}

/* Builds the Lua side: a new sandbox with the runtime library and every
 * module loaded, and the C copies of what the modules declare. */
static int load_sandbox(ebb_runtime *rt, ebb_error *err) {
  const char *dirs[1] = {rt->aggregates_dir};
  ebb_sandbox_options sbo = {
      .module_dirs = dirs,
      .n_module_dirs = 1,
      .runtime_dir = rt->lua_dir,
      .memory_limit = rt->memory_limit,
      .instruction_budget = rt->instruction_budget,
  };
  if (rt->sources == NULL && (rt->sources = ebb_sandbox_sources_new()) == NULL)
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  sbo.sources = rt->sources;
  if (ebb_sandbox_new(&rt->sb, &sbo, err) != 0) return err->code;
  rt->generation++;
  lua_State *L = ebb_sandbox_state(rt->sb);
  lua_pushcfunction(L, ebb__lua_prepare);
  if (ebb_sandbox_call(rt->sb, 0, 0) != LUA_OK) {
    ebb_error_set(err, EBB_ESCRIPT, "cannot load the runtime library from %s: %s", rt->lua_dir,
                  lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "unknown error");
    lua_pop(L, 1);
    return err->code;
  }
  lua_newtable(L);
  rt->modules_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_newtable(L);
  rt->owners_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  load_modules(rt, rt->aggregates_dir);
  lua_pushcfunction(L, l_collect_schemas);
  lua_pushlightuserdata(L, rt);
  if (ebb_sandbox_call(rt->sb, 1, 0) != LUA_OK) {
    lua_pop(L, 1);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory collecting event schemas");
  }
  return 0;
}

/* Drops the Lua side: waiting snapshots are written first (they point at the
 * fingerprints), cached states go with the state they live in. */
static void unload_sandbox(ebb_runtime *rt) {
  if (rt->store) ebb_runtime_flush(rt, NULL);
  if (rt->sb && rt->cache) ebb_state_cache_clear(rt->cache, ebb_sandbox_state(rt->sb));
  ebb_sandbox_free(rt->sb);
  rt->sb = NULL;
  for (size_t i = 0; i < rt->n_fingerprints; i++) {
    free(rt->fingerprints[i].type);
    free(rt->fingerprints[i].value);
  }
  free(rt->fingerprints);
  rt->fingerprints = NULL;
  rt->n_fingerprints = 0;
  for (size_t i = 0; i < rt->n_schemas; i++) free(rt->schemas[i].type);
  free(rt->schemas);
  rt->schemas = NULL;
  rt->n_schemas = 0;
  ebb_buf_reset(&rt->problems);
}

/* After a kill the Lua state may hold whatever the runaway made reachable
 * (from a module's globals, say) and fail every later call: start afresh. */
static int recover(ebb_runtime *rt, ebb_error *err) {
  if (!rt->tainted) return 0;
  /* The same code comes back (kept names and texts), so the fingerprints
   * stay those computed when it was loaded, whatever the disk holds now. */
  if (rt->store) ebb_runtime_flush(rt, NULL);
  struct fingerprint_entry *fp = rt->fingerprints;
  size_t nfp = rt->n_fingerprints;
  rt->fingerprints = NULL;
  rt->n_fingerprints = 0;
  unload_sandbox(rt);
  rt->fingerprints = fp;
  rt->n_fingerprints = nfp;
  rt->reuse_names = rt->recovering = 1;
  int rc = load_sandbox(rt, err);
  rt->reuse_names = rt->recovering = 0;
  if (rc != 0) return err->code;
  rt->tainted = 0;
  return 0;
}

int ebb_runtime_open(ebb_runtime **out, const ebb_runtime_options *opt, ebb_error *err) {
  *out = NULL;
  ebb_runtime *rt = calloc(1, sizeof *rt);
  if (rt == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  ebb_buf_init(&rt->problems);
  rt->modules_ref = LUA_NOREF;
  rt->snapshots = !opt->no_snapshots;
  rt->snapshots_read_only = opt->snapshots_read_only;
  rt->memory_limit = opt->memory_limit;
  rt->instruction_budget = opt->instruction_budget;
  rt->lua_dir = strdup(opt->lua_dir ? opt->lua_dir : ebb_paths_lua_dir());
  rt->aggregates_dir = strdup(opt->aggregates_dir ? opt->aggregates_dir : "aggregates");
  rt->cache = ebb_state_cache_new(opt->cache_size < 0   ? 0
                                  : opt->cache_size == 0 ? EBB_DEFAULT_CACHE_SIZE
                                                         : (size_t)opt->cache_size);
  if (rt->lua_dir == NULL || rt->aggregates_dir == NULL || rt->cache == NULL) {
    ebb_error_set(err, EBB_ENOMEM, "out of memory");
    goto fail;
  }
  ebb_store_options so = {
      .uri = opt->store, .dir = opt->data_dir, .durability = opt->durability, .exclusive = opt->exclusive};
  if (ebb_store_open(&rt->store, &so, err) != 0 || load_sandbox(rt, err) != 0) goto fail;
  *out = rt;
  return 0;
fail:
  ebb_runtime_close(rt);
  return err->code;
}

void ebb_runtime_close(ebb_runtime *rt) {
  if (rt == NULL) return;
  unload_sandbox(rt);
  ebb_state_cache_free(rt->cache, NULL); /* empty: unload_sandbox cleared it */
  ebb_sandbox_sources_free(rt->sources);
  free_module_names(rt);
  free_spares(rt);
  ebb_event_list_free(&rt->preload.events);
  free(rt->preload.unknown_command_id);
  for (size_t i = 0; i < rt->n_types; i++) free(rt->types[i]);
  ebb_store_close(rt->store);
  ebb_buf_free(&rt->problems);
  free(rt->lua_dir);
  free(rt->aggregates_dir);
  free(rt);
}

int ebb_runtime_reload(ebb_runtime *rt, ebb_buf *report, ebb_error *err) {
  /* A trial load first, so that modules that do not load leave the running
   * ones in place. */
  ebb_runtime trial = {0};
  trial.lua_dir = rt->lua_dir;
  trial.aggregates_dir = rt->aggregates_dir;
  trial.memory_limit = rt->memory_limit;
  trial.instruction_budget = rt->instruction_budget;
  trial.snapshots = rt->snapshots;
  trial.modules_ref = LUA_NOREF;
  ebb_buf_init(&trial.problems);
  int rc = load_sandbox(&trial, err);
  int problems = rc == 0 ? ebb_runtime_check(&trial, report) : 0;
  unload_sandbox(&trial);
  ebb_buf_free(&trial.problems);
  if (rc != 0 || problems) {
    ebb_sandbox_sources_free(trial.sources);
    free_module_names(&trial);
  }
  if (rc != 0) return rc;
  if (problems)
    return ebb_error_set(err, EBB_ESCRIPT, "%d problem%s in the modules; the running ones stay",
                         problems, problems == 1 ? "" : "s");
  unload_sandbox(rt);
  /* The new modules are the texts the trial checked, not a second read of
   * the directory (which may have changed since). */
  ebb_sandbox_sources_free(rt->sources);
  free_module_names(rt);
  rt->sources = trial.sources;
  rt->module_names = trial.module_names;
  rt->n_module_names = trial.n_module_names;
  rt->reuse_names = 1;
  rc = load_sandbox(rt, err);
  rt->reuse_names = 0;
  if (rc != 0) {
    rt->tainted = 1; /* the next call tries again */
    return err->code;
  }
  return 0;
}

int ebb_runtime_check(ebb_runtime *rt, ebb_buf *report) {
  int n = 0;
  for (size_t i = 0; i < rt->problems.len; i++)
    if (rt->problems.data[i] == '\n') n++;
  if (rt->problems.len) ebb_buf_append(report, rt->problems.data, rt->problems.len);
  return n;
}

/* ---------------------------------------------------------------- deciding */

/* An event a handler returned. Its type, data and metadata are one block,
 * each NUL-terminated, at offsets 0, data_off and metadata_off (one malloc
 * per event, not three and their growth). */
typedef struct new_event {
  char id[EBB_UUID_LEN + 1];
  int64_t schema;
  ebb_buf text;
  size_t data_off, data_len, metadata_off, metadata_len;
} new_event;

/* Most commands decide one event: that many are kept in the decision itself,
 * which the runtime reuses (MAX_SPARE), so they cost no malloc. */
#define INLINE_EVENTS 4

/* Everything one protected call needs and produces; owned by the C caller,
 * so memory it holds is freed even when Lua unwinds past it. */
typedef struct decision {
  ebb_runtime *rt;
  const ebb_command *cmd;      /* NULL when only folding for the state */
  const char *aggregate;
  const char *id;
  char stream[EBB_MAX_NAME + 1];
  char now[EBB_TIME_LEN + 1];
  char command_uuid[EBB_UUID_LEN + 1];
  ebb_event_list chunk;
  int64_t version, last_position;
  int state_ref;               /* the folded (and, after a command, evolved) state */
  int from_cache;              /* a command decided on cached state, not re-read */
  int preloaded;               /* ... or on events read before, elsewhere (ebb_runtime_preload) */
  int preload_final;           /* ... and read again after those were behind */
  int64_t until_version;       /* a state query as of this version (-1: the latest) */
  const char *until_time;      /* ... or as of this canonical RFC 3339 time (NULL: now) */
  int deleted;                 /* the fold ended on a tombstone */
  int hit;                     /* the state came from the cache */
  int64_t base_version;        /* the version of the snapshot the fold started from (0: none) */
  char last_recorded_at[EBB_TIME_LEN + 1]; /* of the last event folded */
  ebb_buf loaded;              /* the bytes of the snapshot loaded */
  ebb_buf snap;                /* a snapshot taken by this decision, to be queued */
  const char *snap_fingerprint;/* non-NULL when snap holds one */
  int64_t snap_version;
  /* out */
  ebb_error err;
  new_event *events;           /* events_inline, or malloc'd beyond INLINE_EVENTS */
  size_t n_events;
  char *state_json;
  new_event events_inline[INLINE_EVENTS];
} decision;

static void decision_free(decision *d) {
  if (d->state_ref != LUA_NOREF)
    luaL_unref(ebb_sandbox_state(d->rt->sb), LUA_REGISTRYINDEX, d->state_ref);
  d->state_ref = LUA_NOREF;
  ebb_event_list_free(&d->chunk);
  ebb_buf_free(&d->loaded);
  ebb_buf_free(&d->snap);
  for (size_t i = 0; i < d->n_events; i++) ebb_buf_free(&d->events[i].text);
  if (d->events != d->events_inline) free(d->events);
  d->events = NULL;
  d->n_events = 0;
  free(d->state_json);
  ebb_error_clear(&d->err);
}

/* Names the part ("data", "metadata") of event i for an error message. Made
 * only when there is an error: formatting it per event cost a tenth of
 * deciding a command. */
typedef struct event_part {
  const char *part, *type, *handler;
  int i;
} event_part;

/* Appends the JSON object text of the value at idx to out, and a NUL:
 * its offset and length in *off, *len. Raises when it cannot be stored. */
static void encode_object(lua_State *L, int idx, ebb_buf *out, size_t *off, size_t *len,
                          const event_part *ep) {
  char msg[512], what[128];
  size_t mark = out->len;
  int bad = ebb_json_encode(L, idx, out, msg, sizeof msg) != 0;
  if (bad || out->len == mark || out->data[mark] != '{') {
    snprintf(what, sizeof what, "the %s of event %d (%s) from handle.%s", ep->part, ep->i,
             ep->type, ep->handler);
    if (bad) luaL_error(L, "%s cannot be stored: %s", what, msg);
    luaL_error(L, "%s must be a table with string keys (a JSON object)", what);
  }
  *off = mark;
  *len = out->len - mark;
  if (ebb_buf_append(out, "", 1) != 0) {
    snprintf(what, sizeof what, "the %s of event %d (%s) from handle.%s", ep->part, ep->i,
             ep->type, ep->handler);
    luaL_error(L, "out of memory encoding %s", what);
  }
}

static int l_new_id(lua_State *L) {
  char id[EBB_UUID_LEN + 1];
  ebb_uuid_new(id);
  lua_pushstring(L, id);
  return 1;
}

/* Calls apply[type](state, event) for the event at the top, which it pops.
 * Stack: ... module(mi) state(si) event -> ... module state' */
static void apply_event(lua_State *L, int mi, int si) {
  lua_getfield(L, mi, "apply");
  lua_getfield(L, -2, "type");
  lua_gettable(L, -2); /* apply[type] */
  if (!lua_isfunction(L, -1)) {
    lua_pop(L, 3); /* an event this aggregate does not fold: state unchanged */
    return;
  }
  lua_pushvalue(L, si);
  lua_pushvalue(L, -4); /* the event */
  lua_call(L, 2, 1);
  if (!lua_isnil(L, -1)) lua_replace(L, si);
  else lua_pop(L, 1);
  lua_pop(L, 2); /* apply table, event */
}

/* Validates the handler's return value (at ri) and turns each event into a
 * new_event, applying it to the state. Raises on a bad shape. */
static void take_events(lua_State *L, decision *d, int mi, int si, int ri, int cmdi) {
  const char *handler = d->cmd->type;
  if (!lua_istable(L, ri))
    luaL_error(L, "handle.%s returned %s; it must return a list of events (or {} for none)",
               handler, luaL_typename(L, ri));
  lua_Integer n = (lua_Integer)lua_rawlen(L, ri);
  lua_pushnil(L);
  while (lua_next(L, ri)) {
    if (!lua_isinteger(L, -2) || lua_tointeger(L, -2) < 1 || lua_tointeger(L, -2) > n)
      luaL_error(L, "handle.%s returned a table that is not a list of events", handler);
    lua_pop(L, 1);
  }
  if (n <= INLINE_EVENTS) d->events = d->events_inline;
  else if ((d->events = calloc((size_t)n, sizeof *d->events)) == NULL)
    luaL_error(L, "out of memory");
  lua_getfield(L, cmdi, "metadata");
  int cmeta = lua_gettop(L);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, ri, i);
    int ei = lua_gettop(L);
    if (!lua_istable(L, ei))
      luaL_error(L, "handle.%s returned event %d as %s, expected a table {type=, data=}", handler,
                 (int)i, luaL_typename(L, ei));
    if (lua_getfield(L, ei, "type") != LUA_TSTRING || lua_rawlen(L, -1) == 0)
      luaL_error(L, "handle.%s returned event %d without a string `type`", handler, (int)i);
    const char *type = lua_tostring(L, -1);
    ebb_error verr;
    ebb_error_init(&verr);
    if (ebb_validate_name("event type", type, &verr) != 0)
      luaL_error(L, "handle.%s returned event %d: %s", handler, (int)i, verr.message);
    new_event *ne = &d->events[d->n_events++];
    size_t tlen = lua_rawlen(L, -1);
    /* the type, and room for the usual data and metadata (the metadata's
     * three ids alone are over 128 bytes) */
    if (ebb_buf_reserve(&ne->text, tlen + 1 + 448) != 0 ||
        ebb_buf_append(&ne->text, type, tlen + 1) != 0)
      luaL_error(L, "out of memory");
    ebb_uuid_new(ne->id);
    lua_getfield(L, mi, "schemas");
    ne->schema = 1;
    if (lua_istable(L, -1) && lua_getfield(L, -1, type) == LUA_TNUMBER) ne->schema = lua_tointeger(L, -1);
    lua_settop(L, ei + 1); /* event, type */
    int dt = lua_getfield(L, ei, "data");
    if (dt == LUA_TNIL) {
      lua_pop(L, 1);
      lua_newtable(L);
      lua_pushvalue(L, -1);
      lua_setfield(L, ei, "data");
    } else if (dt != LUA_TTABLE) {
      luaL_error(L, "handle.%s returned event %d (%s) whose data is %s, expected a table", handler,
                 (int)i, type, luaL_typename(L, -1));
    }
    event_part ep = {"data", type, handler, (int)i};
    encode_object(L, -1, &ne->text, &ne->data_off, &ne->data_len, &ep);
    lua_pop(L, 1);
    /* metadata: the command's, then the event's own, then the causal links
     * (sized for the links, so the usual table is made at once) */
    lua_createtable(L, 0, 3);
    int mt = lua_gettop(L);
    for (int src = 0; src < 2; src++) {
      if (src == 1) {
        int t = lua_getfield(L, ei, "metadata");
        if (t != LUA_TNIL && t != LUA_TTABLE)
          luaL_error(L, "handle.%s returned event %d (%s) whose metadata is %s, expected a table",
                     handler, (int)i, type, luaL_typename(L, -1));
      } else {
        lua_pushvalue(L, cmeta);
      }
      if (lua_istable(L, -1)) {
        lua_pushnil(L);
        while (lua_next(L, -2)) {
          lua_pushvalue(L, -2);
          lua_insert(L, -2);
          lua_settable(L, mt);
        }
      }
      lua_pop(L, 1);
    }
    const char *cmd_id = d->cmd->command_id ? d->cmd->command_id : d->command_uuid;
    lua_pushstring(L, cmd_id);
    int cid = lua_gettop(L);
    /* A causation the command names stays (a reactor's command: the event
     * it reacted to); otherwise the command caused its events. */
    if (lua_getfield(L, cmeta, "causation_id") != LUA_TSTRING) {
      lua_pop(L, 1);
      lua_pushvalue(L, cid);
    }
    lua_setfield(L, mt, "causation_id");
    lua_pushvalue(L, cid);
    lua_setfield(L, mt, "command_id");
    if (lua_getfield(L, cmeta, "correlation_id") == LUA_TNIL) {
      lua_pop(L, 1);
      lua_pushvalue(L, cid);
    }
    lua_setfield(L, mt, "correlation_id");
    lua_pop(L, 1); /* cid */
    ep.part = "metadata";
    encode_object(L, mt, &ne->text, &ne->metadata_off, &ne->metadata_len, &ep);
    /* Fold it too: an apply that fails on the new event fails the command. */
    lua_createtable(L, 0, 9);
    lua_pushstring(L, d->stream);
    lua_setfield(L, -2, "stream");
    lua_pushinteger(L, d->version + i);
    lua_setfield(L, -2, "version");
    lua_pushstring(L, ne->id);
    lua_setfield(L, -2, "id");
    lua_pushstring(L, type);
    lua_setfield(L, -2, "type");
    lua_pushinteger(L, ne->schema);
    lua_setfield(L, -2, "schema");
    lua_pushstring(L, d->now);
    lua_setfield(L, -2, "recorded_at");
    lua_getfield(L, ei, "data");
    lua_setfield(L, -2, "data");
    lua_pushvalue(L, mt);
    lua_setfield(L, -2, "metadata");
    apply_event(L, mi, si);
    lua_settop(L, cmeta);
  }
}

typedef struct pending_snapshot {
  char *stream, *state;
  const char *fingerprint; /* owned by rt->fingerprints */
  size_t state_len;
  int64_t version, position;
  char recorded_at[EBB_TIME_LEN + 1];
} pending_snapshot;

/* The newest snapshot still waiting to be written that the decision may use, or NULL. */
static const pending_snapshot *pending_for(const decision *d, const char *fingerprint) {
  const pending_snapshot *best = NULL;
  for (size_t i = 0; i < d->rt->n_pending; i++) {
    const pending_snapshot *p = &d->rt->pending[i];
    if (strcmp(p->stream, d->stream) != 0 || strcmp(p->fingerprint, fingerprint) != 0 ||
        (d->until_version >= 0 && p->version > d->until_version) ||
        (d->until_time && strcmp(p->recorded_at, d->until_time) > 0))
      continue;
    if (best == NULL || p->version > best->version) best = p;
  }
  return best;
}

/* Pushes the newest valid snapshot's state for the decision (at or below its
 * version or time limit) and sets the fold's starting point; 0 when there is
 * none or it cannot be read (the fold then starts from the beginning). */
static int load_snapshot(lua_State *L, decision *d, const char *fingerprint) {
  int64_t version, position;
  ebb_error err;
  ebb_error_init(&err);
  ebb_buf_reset(&d->loaded);
  /* A snapshot not yet written is newer than any stored one. */
  const pending_snapshot *p = pending_for(d, fingerprint);
  const char *bytes = p ? p->state : NULL;
  size_t len = p ? p->state_len : 0;
  if (p) {
    version = p->version;
    position = p->position;
  } else if (ebb_store_snapshot_load(d->rt->store, d->stream, fingerprint, d->until_version,
                                     d->until_time, &version, &position, &d->loaded, &err) == 1) {
    bytes = d->loaded.data;
    len = d->loaded.len;
  }
  ebb_error_clear(&err);
  char msg[256];
  if (bytes == NULL || ebb_deserialize(L, bytes, len, msg, sizeof msg) != 0) return 0;
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  d->version = d->base_version = version;
  d->last_position = position;
  return 1;
}

/* Serializes the state at si as the decision's snapshot at `version`; a state
 * that cannot be serialized simply gets no snapshot. */
static void take_snapshot(lua_State *L, decision *d, int si, const char *fingerprint,
                          int64_t version) {
  char msg[256];
  if (d->rt->snapshots_read_only) return;
  ebb_buf_reset(&d->snap);
  if (ebb_serialize(L, si, &d->snap, msg, sizeof msg) != 0 || d->snap.oom) return;
  d->snap_fingerprint = fingerprint;
  d->snap_version = version;
}


int ebb_runtime_flush(ebb_runtime *rt, ebb_error *err) {
  if (rt->n_pending == 0) return 0;
  ebb_snapshot *snaps = calloc(rt->n_pending, sizeof *snaps);
  int rc = 0;
  if (snaps == NULL) {
    rc = ebb_error_set(err, EBB_ENOMEM, "out of memory writing snapshots");
  } else {
    for (size_t i = 0; i < rt->n_pending; i++) {
      pending_snapshot *p = &rt->pending[i];
      snaps[i] = (ebb_snapshot){.stream = p->stream, .version = p->version, .position = p->position,
                                .recorded_at = p->recorded_at, .fingerprint = p->fingerprint,
                                .state = p->state, .state_len = p->state_len};
    }
    rc = ebb_store_snapshot_save(rt->store, snaps, rt->n_pending, err);
    free(snaps);
  }
  /* Snapshots can always be taken again: a failed write drops them. */
  for (size_t i = 0; i < rt->n_pending; i++) {
    free(rt->pending[i].stream);
    free(rt->pending[i].state);
  }
  free(rt->pending);
  rt->pending = NULL;
  rt->n_pending = 0;
  return rc;
}

struct ebb_snapshot_batch {
  ebb_snapshot *snaps;
  char **fingerprints;
  pending_snapshot *pending;
  size_t n;
};

void ebb_snapshot_batch_free(ebb_snapshot_batch *b) {
  if (b == NULL) return;
  for (size_t i = 0; i < b->n; i++) {
    free(b->pending[i].stream);
    free(b->pending[i].state);
    free(b->fingerprints[i]);
  }
  free(b->pending);
  free(b->fingerprints);
  free(b->snaps);
  free(b);
}

ebb_snapshot_batch *ebb_runtime_take_snapshots(ebb_runtime *rt) {
  if (rt->n_pending == 0) return NULL;
  ebb_snapshot_batch *b = calloc(1, sizeof *b);
  if (b == NULL) return NULL;
  b->snaps = calloc(rt->n_pending, sizeof *b->snaps);
  b->fingerprints = calloc(rt->n_pending, sizeof *b->fingerprints);
  if (b->snaps == NULL || b->fingerprints == NULL) {
    ebb_snapshot_batch_free(b);
    return NULL;
  }
  /* Fingerprints are copied: the runtime's own die when its modules reload. */
  for (size_t i = 0; i < rt->n_pending; i++)
    if ((b->fingerprints[i] = strdup(rt->pending[i].fingerprint)) == NULL) {
      ebb_snapshot_batch_free(b);
      return NULL;
    }
  b->pending = rt->pending;
  b->n = rt->n_pending;
  rt->pending = NULL;
  rt->n_pending = 0;
  for (size_t i = 0; i < b->n; i++) {
    pending_snapshot *p = &b->pending[i];
    b->snaps[i] = (ebb_snapshot){.stream = p->stream, .version = p->version, .position = p->position,
                                 .recorded_at = p->recorded_at, .fingerprint = b->fingerprints[i],
                                 .state = p->state, .state_len = p->state_len};
  }
  return b;
}

int ebb_snapshot_batch_write(ebb_snapshot_batch *b, ebb_store *s, ebb_error *err) {
  return ebb_store_snapshot_save(s, b->snaps, b->n, err);
}

size_t ebb_snapshot_batch_size(const ebb_snapshot_batch *b) {
  return b ? b->n : 0;
}

#define MAX_PENDING_SNAPSHOTS 64

/* Queues the decision's snapshot, written by the next ebb_runtime_flush (the
 * host's idle time, at close, or when the queue is full) so that no
 * command's answer waits for it. */
static void queue_snapshot(ebb_runtime *rt, decision *d, int64_t position, const char *recorded_at) {
  if (d->snap_fingerprint == NULL) return;
  for (size_t i = 0; i < rt->n_pending; i++)
    if (rt->pending[i].version == d->snap_version && strcmp(rt->pending[i].stream, d->stream) == 0 &&
        strcmp(rt->pending[i].fingerprint, d->snap_fingerprint) == 0)
      return; /* already waiting */
  if (rt->n_pending >= MAX_PENDING_SNAPSHOTS) ebb_runtime_flush(rt, NULL);
  pending_snapshot *p = realloc(rt->pending, (rt->n_pending + 1) * sizeof *p);
  if (p == NULL) return;
  rt->pending = p;
  p += rt->n_pending;
  p->stream = strdup(d->stream);
  p->state = ebb_buf_take(&d->snap, &p->state_len);
  if (p->stream == NULL || p->state == NULL) {
    free(p->stream);
    free(p->state);
    return;
  }
  rt->n_pending++;
  p->fingerprint = d->snap_fingerprint;
  p->version = d->snap_version;
  p->position = position;
  snprintf(p->recorded_at, sizeof p->recorded_at, "%s", recorded_at);
  d->snap_fingerprint = NULL;
}

/* Hands the decision's state to the cache, as of version and position. */
static void cache_state(decision *d, int64_t version, int64_t position) {
  if (d->state_ref == LUA_NOREF) return;
  ebb_state_cache_put(d->rt->cache, ebb_sandbox_state(d->rt->sb), d->stream, d->state_ref, version,
                      position);
  d->state_ref = LUA_NOREF;
}

/* stream = type "-" id; -1 when that is longer than EBB_MAX_NAME (stream
 * then holds what fits, as snprintf leaves it). Once per command, twice in
 * the daemon: without snprintf's cost. */
static int stream_name(char stream[EBB_MAX_NAME + 1], const char *type, const char *id) {
  size_t tl = type ? strlen(type) : 0, il = strlen(id);
  if (type == NULL || tl + 1 + il > EBB_MAX_NAME)
    return snprintf(stream, EBB_MAX_NAME + 1, "%s-%s", type, id) > EBB_MAX_NAME ? -1 : 0;
  memcpy(stream, type, tl);
  stream[tl] = '-';
  memcpy(stream + tl + 1, id, il + 1);
  return 0;
}

/* The protected half of a command or a state query. Argument: the decision. */
static void preload_drop(ebb_runtime *rt) {
  if (!rt->preload.set) return;
  rt->preload.set = 0;
  ebb_event_list_clear(&rt->preload.events);
  free(rt->preload.unknown_command_id);
  rt->preload.unknown_command_id = NULL;
}

/* Moves a complete preload of d's stream into d->chunk: 1 when there was one. */
static int take_preload(decision *d) {
  ebb_runtime *rt = d->rt;
  if (!rt->preload.set || !rt->preload.complete || strcmp(rt->preload.stream, d->stream) != 0)
    return 0;
  ebb_event_list t = d->chunk;
  d->chunk = rt->preload.events;
  rt->preload.events = t;
  d->preload_final = rt->preload.final;
  preload_drop(rt);
  d->preloaded = 1;
  return 1;
}

static int l_decide(lua_State *L) {
  decision *d = lua_touserdata(L, 1);
  lua_settop(L, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, d->rt->modules_ref);
  if (lua_getfield(L, 1, d->aggregate) != LUA_TTABLE) {
    ebb_error_set(&d->err, EBB_ENOTFOUND, "unknown aggregate %s", d->aggregate);
    return 0;
  }
  int mi = 2;
  lua_getfield(L, mi, "type");
  const char *type = lua_tostring(L, -1);
  if (stream_name(d->stream, type, d->id) != 0) {
    ebb_error_set(&d->err, EBB_EBADREQ, "stream name %s-%s is too long", type, d->id);
    return 0;
  }
  lua_pop(L, 1);
  /* Unknown command: refused before any work. */
  if (d->cmd) {
    lua_getfield(L, mi, "handle");
    if (lua_getfield(L, -1, d->cmd->type) != LUA_TFUNCTION) {
      ebb_error_set(&d->err, EBB_ENOTFOUND, "%s has no command %s", type, d->cmd->type);
      return 0;
    }
    lua_pop(L, 2);
  }
  int ref;
  int64_t version, position;
  int preloaded = 0; /* d->chunk holds the whole (short) stream */
  int past = d->until_version >= 0 || d->until_time != NULL;
  lua_getfield(L, mi, "snapshot_every");
  int64_t every = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : 0;
  lua_pop(L, 1);
  const char *fingerprint =
      every > 0 && d->rt->snapshots
          ? fingerprint_of(d->rt, d->stream, ebb_stream_category_len(d->stream))
          : NULL;
  if (!past && ebb_state_cache_take(d->rt->cache, d->stream, &ref, &version, &position)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    d->version = version;
    d->last_position = position;
    /* A command trusts the cached state without reading the stream: if another
     * writer appended meanwhile, the append's version check fails and the
     * command is decided again on state read from the store. */
    d->from_cache = d->cmd != NULL;
    d->hit = 1;
  } else {
    /* A snapshot is taken at version `every` at the earliest: a stream with
     * fewer events has none, and most streams a command touches cold are
     * short (new ones are empty). So read their beginning first, and ask for
     * a snapshot only when the stream turns out to be that long. */
    if (d->cmd && !past && take_preload(d)) {
      preloaded = 1; /* the whole stream, short: no snapshot needed */
    } else if (fingerprint) {
      ebb_error rerr;
      ebb_error_init(&rerr);
      if (ebb_store_read_stream(d->rt->store, d->stream, 1, every, 0, &d->chunk, &rerr) != 0) {
        ebb_error_move(&d->err, &rerr);
        return 0;
      }
      preloaded = (int64_t)d->chunk.n < every;
      if (!preloaded) ebb_event_list_clear(&d->chunk);
    }
    if (preloaded || !(fingerprint && load_snapshot(L, d, fingerprint))) {
      lua_getfield(L, mi, "initial");
      lua_call(L, 0, 1);
      if (!lua_istable(L, -1))
        luaL_error(L, "%s.initial() returned %s, expected a table", type, luaL_typename(L, -1));
    }
  }
  int si = lua_gettop(L);
  /* Fold the stream in chunks, so memory does not grow with its length. */
  for (int done = d->from_cache; !done;) {
    ebb_error rerr;
    ebb_error_init(&rerr);
    if (preloaded) {
      preloaded = 0; /* the stream's beginning is in the chunk already */
    } else {
      ebb_event_list_clear(&d->chunk);
      if (ebb_store_read_stream(d->rt->store, d->stream, d->version + 1, FOLD_CHUNK, 0,
                                &d->chunk, &rerr) != 0) {
        ebb_error_move(&d->err, &rerr);
        return 0;
      }
    }
    for (size_t i = 0; i < d->chunk.n; i++) {
      /* As of a version or a time: the stream's prefix up to it. */
      if ((d->until_version >= 0 && d->chunk.items[i].version > d->until_version) ||
          (d->until_time && strcmp(d->chunk.items[i].recorded_at, d->until_time) > 0)) {
        done = 1;
        break;
      }
      d->version = d->chunk.items[i].version;
      d->last_position = d->chunk.items[i].position;
      if ((d->deleted = strcmp(d->chunk.items[i].type, EBB_TOMBSTONE) == 0)) continue;
      ebb_event_push(L, &d->chunk.items[i], 0);
      if (needs_upcast(d->rt, d->chunk.items[i].type, d->chunk.items[i].schema))
        upcast_top(L, d->rt, (lua_Integer)d->chunk.items[i].position);
      apply_event(L, mi, si);
    }
    if (d->chunk.n && !done)
      memcpy(d->last_recorded_at, d->chunk.items[d->chunk.n - 1].recorded_at,
             strnlen(d->chunk.items[d->chunk.n - 1].recorded_at, EBB_TIME_LEN) + 1);
    if (d->chunk.n < FOLD_CHUNK) break;
  }
  /* A snapshot when the fold read `every` events or more past the last one. */
  if (fingerprint && !past && !d->hit && !d->deleted && d->cmd == NULL &&
      d->version - d->base_version >= every)
    take_snapshot(L, d, si, fingerprint, d->version);
  ebb_event_list_clear(&d->chunk);
  if (d->cmd == NULL) { /* a state query */
    if (!past && !d->deleted) { /* folded and unchanged: it may go back to the cache */
      lua_pushvalue(L, si);
      d->state_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    ebb_buf b = EBB_BUF_INIT;
    char msg[512];
    if (ebb_json_encode(L, si, &b, msg, sizeof msg) != 0) {
      ebb_buf_free(&b);
      luaL_error(L, "the state of %s cannot be shown as JSON: %s", d->stream, msg);
    }
    d->state_json = ebb_buf_take(&b, NULL);
    if (d->state_json == NULL) luaL_error(L, "out of memory");
    return 0;
  }
  if (d->deleted) {
    ebb_error_set(&d->err, EBB_EDELETED,
                  "%s was deleted at version %lld; its events stay readable, but it takes no "
                  "commands", d->stream, (long long)d->version);
    return 0;
  }
  if (d->cmd->has_expected && !ebb_expected_matches(d->cmd->expected, d->version)) {
    /* The state is folded and unchanged: it may go back to the cache. */
    lua_pushvalue(L, si);
    d->state_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  const ebb_command *cmd = d->cmd;
  if (cmd->has_expected && !ebb_expected_matches(cmd->expected, d->version)) {
    char buf[24];
    ebb_error_set(&d->err, EBB_EVERSION, "wrong expected version for %s: expected %s, actual %lld",
                  d->stream, ebb_expected_name(cmd->expected, buf, sizeof buf),
                  (long long)d->version);
    d->err.expected = cmd->expected;
    d->err.actual = d->version;
    return 0;
  }
  /* handler(state, command, ctx) */
  lua_getfield(L, mi, "handle");
  lua_getfield(L, -1, cmd->type);
  lua_remove(L, -2);
  int fi = lua_gettop(L);
  lua_createtable(L, 0, 5);
  int cmdi = lua_gettop(L);
  char msg[512];
  lua_pushstring(L, cmd->type);
  lua_setfield(L, cmdi, "type");
  lua_pushstring(L, d->id);
  lua_setfield(L, cmdi, "id");
  if (cmd->command_id) {
    lua_pushstring(L, cmd->command_id);
    lua_setfield(L, cmdi, "command_id");
  }
  static const char *const parts[2] = {"data", "metadata"};
  for (int k = 0; k < 2; k++) {
    const char *text = k == 0 ? cmd->data : cmd->metadata;
    size_t len = k == 0 ? cmd->data_len : cmd->metadata_len;
    if (text == NULL) text = "{}", len = 2;
    if (ebb_json_decode(L, text, len, msg, sizeof msg) != 0) {
      ebb_error_set(&d->err, EBB_EBADREQ, "command %s is not valid JSON: %s", parts[k], msg);
      return 0;
    }
    if (!lua_istable(L, -1) || lua_getmetatable(L, -1)) {
      ebb_error_set(&d->err, EBB_EBADREQ, "command %s must be a JSON object", parts[k]);
      return 0;
    }
    lua_setfield(L, cmdi, parts[k]);
  }
  lua_createtable(L, 0, 3);
  int ctxi = lua_gettop(L);
  lua_pushstring(L, d->now);
  lua_setfield(L, ctxi, "now");
  lua_pushcfunction(L, l_new_id);
  lua_setfield(L, ctxi, "id");
  lua_getfield(L, cmdi, "metadata");
  lua_setfield(L, ctxi, "metadata");
  lua_pushvalue(L, fi);
  lua_pushvalue(L, si);
  lua_pushvalue(L, cmdi);
  lua_pushvalue(L, ctxi);
  if (lua_pcall(L, 3, 1, 0) != LUA_OK) {
    if (ebb_sandbox_killed(d->rt->sb)) lua_error(L);
    int ei = lua_gettop(L);
    if (lua_istable(L, ei) && lua_getmetatable(L, ei)) {
      lua_getfield(L, -1, "__ebb");
      int is_rejection = lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "rejection") == 0;
      lua_pop(L, 2);
      if (is_rejection) {
        lua_getfield(L, ei, "message");
        ebb_error_set(&d->err, EBB_EREJECTED, "%s",
                      lua_isstring(L, -1) ? lua_tostring(L, -1) : "rejected");
        lua_pop(L, 1);
        if (lua_getfield(L, ei, "details") != LUA_TNIL) {
          ebb_buf b = EBB_BUF_INIT;
          if (ebb_json_encode(L, -1, &b, msg, sizeof msg) == 0)
            ebb_error_set_details(&d->err, ebb_buf_take(&b, NULL));
          else ebb_buf_free(&b);
        }
        return 0;
      }
    }
    const char *m = luaL_tolstring(L, ei, NULL);
    ebb_error_set(&d->err, EBB_ESCRIPT, "%s", m);
    return 0;
  }
  take_events(L, d, mi, si, lua_gettop(L), cmdi);
  int64_t after = d->version + (int64_t)d->n_events;
  if (fingerprint && d->n_events &&
      (after / every != d->version / every || (!d->hit && after - d->base_version >= every)))
    take_snapshot(L, d, si, fingerprint, after);
  lua_pushvalue(L, si);
  d->state_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* Runs l_decide in the sandbox and turns a Lua failure into d->err. */
static int decide(ebb_runtime *rt, decision *d) {
  lua_State *L = ebb_sandbox_state(rt->sb);
  lua_pushcfunction(L, l_decide);
  lua_pushlightuserdata(L, d);
  int status = ebb_sandbox_call(rt->sb, 1, 0);
  if (ebb_sandbox_killed(rt->sb)) rt->tainted = 1;
  if (status != LUA_OK) {
    const char *killed = ebb_sandbox_killed(rt->sb);
    if (killed) ebb_error_set(&d->err, EBB_ESCRIPT, "%s", killed);
    else if (status == LUA_ERRMEM) ebb_error_set(&d->err, EBB_ESCRIPT, "out of memory in Lua");
    else if (lua_type(L, -1) == LUA_TSTRING) ebb_error_set(&d->err, EBB_ESCRIPT, "%s", lua_tostring(L, -1));
    else ebb_error_set(&d->err, EBB_ESCRIPT, "a %s was raised as an error", luaL_typename(L, -1));
    lua_pop(L, 1);
  }
  return d->err.code;
}

static void decision_init(decision *d, ebb_runtime *rt, const char *aggregate, const char *id) {
  memset(d, 0, sizeof *d);
  d->rt = rt;
  d->state_ref = LUA_NOREF;
  d->until_version = -1;
  ebb_buf_init(&d->loaded);
  ebb_buf_init(&d->snap);
  d->aggregate = aggregate;
  d->id = id;
  ebb_event_list_init(&d->chunk);
  ebb_error_init(&d->err);
  ebb_clock_format(ebb_clock_now_ms(), d->now);
  ebb_uuid_new(d->command_uuid);
}

static int fail_with(decision *d, ebb_error *err) {
  int code = d->err.code;
  if (err) ebb_error_move(err, &d->err);
  decision_free(d);
  return code;
}

/* {"stream","version","position","events":[...]} from events read back. */
static char *result_from_events(const char *stream, int64_t version, int64_t position,
                                const ebb_event_list *l) {
  ebb_buf b = EBB_BUF_INIT;
  ebb_buf_puts(&b, "{\"stream\":");
  ebb_buf_json_string(&b, stream, strlen(stream));
  ebb_buf_printf(&b, ",\"version\":%lld,\"position\":%lld,\"events\":[", (long long)version,
                 (long long)position);
  for (size_t i = 0; i < l->n; i++) {
    if (i) ebb_buf_putc(&b, ',');
    ebb_event_to_json(&l->items[i], &b);
  }
  ebb_buf_puts(&b, "]}");
  return ebb_buf_take(&b, NULL);
}

/* Resolves the module's type name. Argument: aggregate name; returns the type or nothing. */
static int l_module_type(lua_State *L) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, (int)lua_tointeger(L, lua_upvalueindex(1)));
  if (lua_getfield(L, -1, lua_tostring(L, 1)) != LUA_TTABLE) return 0;
  lua_getfield(L, -1, "type");
  return 1;
}

int ebb_runtime_stream_of(ebb_runtime *rt, const char *aggregate, const char *id,
                          char stream[EBB_MAX_NAME + 1], ebb_error *err) {
  if (recover(rt, err) != 0) return err->code;
  if (ebb_validate_name("aggregate", aggregate, err) || ebb_validate_name("aggregate id", id, err))
    return err->code;
  /* The daemon asks for every command: remember the answers of this Lua state. */
  if (rt->types_generation != rt->generation) {
    for (size_t i = 0; i < rt->n_types; i++) free(rt->types[i]);
    rt->n_types = 0;
    rt->types_generation = rt->generation;
  }
  const char *type = NULL;
  for (size_t i = 0; i < rt->n_types && !type; i++)
    if (strcmp(rt->types[i], aggregate) == 0) type = rt->types[i] + strlen(rt->types[i]) + 1;
  lua_State *L = ebb_sandbox_state(rt->sb);
  int pushed = 0;
  if (type == NULL) {
    lua_pushinteger(L, rt->modules_ref);
    lua_pushcclosure(L, l_module_type, 1);
    lua_pushstring(L, aggregate);
    if (ebb_sandbox_call(rt->sb, 1, 1) != LUA_OK || !lua_isstring(L, -1)) {
      lua_pop(L, 1);
      return ebb_error_set(err, EBB_ENOTFOUND, "unknown aggregate %s", aggregate);
    }
    type = lua_tostring(L, -1);
    pushed = 1;
    size_t an = strlen(aggregate), tn = strlen(type);
    char *pair; /* "aggregate\0type\0" */
    if (rt->n_types < sizeof rt->types / sizeof rt->types[0] &&
        (pair = malloc(an + tn + 2)) != NULL) {
      memcpy(pair, aggregate, an + 1);
      memcpy(pair + an + 1, type, tn + 1);
      rt->types[rt->n_types++] = pair;
    }
  }
  int bad = stream_name(stream, type, id) != 0;
  if (bad) ebb_error_set(err, EBB_EBADREQ, "stream name %s-%s is too long", type, id);
  if (pushed) lua_pop(L, 1);
  return bad ? EBB_EBADREQ : 0;
}

/* Is `stream` the stream that cmd addresses? */
static int same_stream(ebb_runtime *rt, const ebb_command *cmd, const char *stream) {
  lua_State *L = ebb_sandbox_state(rt->sb);
  lua_pushinteger(L, rt->modules_ref);
  lua_pushcclosure(L, l_module_type, 1);
  lua_pushstring(L, cmd->aggregate);
  if (ebb_sandbox_call(rt->sb, 1, 1) != LUA_OK || !lua_isstring(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  size_t tlen;
  const char *type = lua_tolstring(L, -1, &tlen);
  int same = strncmp(stream, type, tlen) == 0 && stream[tlen] == '-' &&
             strcmp(stream + tlen + 1, cmd->id) == 0;
  lua_pop(L, 1);
  return same;
}

int ebb_runtime_answer_stored(ebb_runtime *rt, const char *stream, int64_t version,
                              int64_t first, int64_t last, char **result, ebb_error *err) {
  ebb_event_list l;
  ebb_event_list_init(&l);
  if (first && ebb_store_read_range(rt->store, first, last, &l, err) != 0) {
    ebb_event_list_free(&l);
    return err->code;
  }
  *result = result_from_events(stream, version, last, &l);
  ebb_event_list_free(&l);
  return *result ? 0 : ebb_error_set(err, EBB_ENOMEM, "out of memory");
}

static int validate_command(const ebb_command *cmd, ebb_error *err) {
  if (ebb_validate_name("aggregate", cmd->aggregate, err) ||
      ebb_validate_name("aggregate id", cmd->id, err) ||
      ebb_validate_name("command type", cmd->type, err) ||
      (cmd->command_id && ebb_validate_name("command id", cmd->command_id, err)))
    return err->code;
  return 0;
}

/* ---------------------------------------------------------------- commands in two halves */

struct ebb_decided {
  decision d;
  const ebb_command *cmd;
  uint64_t generation;         /* of the Lua state the decision's state lives in */
  ebb_event_in *in;            /* in_inline, or malloc'd beyond INLINE_EVENTS */
  ebb_event_in in_inline[INLINE_EVENTS];
  ebb_append req;
  int appends;                 /* req must be stored (events, or a command id to record) */
  ebb_error refusal;           /* the aggregate refused a command with an id: recorded (req) */
  ebb_buf rejection;           /* ... as req.rejection */
  struct ebb_decided *next_spare;
};

static void decided_release(ebb_runtime *rt, ebb_decided *dc) {
  if (dc->generation != rt->generation) {
    /* The Lua state was rebuilt meanwhile: the reference died with the old
     * one, and so did the fingerprint the snapshot pointed at. */
    dc->d.state_ref = LUA_NOREF;
    dc->d.snap_fingerprint = NULL;
  }
  decision_free(&dc->d);
  ebb_error_clear(&dc->req.err);
  ebb_error_clear(&dc->refusal);
  ebb_buf_free(&dc->rejection);
  if (dc->in != dc->in_inline) free(dc->in);
  dc->in = NULL;
  /* Kept for the next command: a decision is a few KiB, and allocating that
   * much per command makes malloc consolidate its free lists every time. */
  if (rt->n_spare < MAX_SPARE) {
    dc->next_spare = rt->spare;
    rt->spare = dc;
    rt->n_spare++;
    return;
  }
  free(dc);
}

static void free_spares(ebb_runtime *rt) {
  while (rt->spare) {
    struct ebb_decided *next = rt->spare->next_spare;
    free(rt->spare);
    rt->spare = next;
  }
  rt->n_spare = 0;
}

void ebb_decided_free(ebb_runtime *rt, ebb_decided *dc) {
  if (dc) decided_release(rt, dc);
}

ebb_append *ebb_decided_append(ebb_decided *dc) {
  return dc->appends ? &dc->req : NULL;
}

const char *ebb_decided_stream(const ebb_decided *dc) {
  return dc->d.stream;
}

int ebb_runtime_wants_preload(ebb_runtime *rt, const char *stream) {
  return !ebb_state_cache_has(rt->cache, stream);
}

int ebb_runtime_preload(ebb_runtime *rt, const char *stream, ebb_event_list *events, int complete,
                        int final, const char *unknown_command_id) {
  preload_drop(rt);
  if (strlen(stream) > EBB_MAX_NAME) return 0;
  char *id = NULL;
  if (unknown_command_id && (id = strdup(unknown_command_id)) == NULL) return EBB_ENOMEM;
  memcpy(rt->preload.stream, stream, strlen(stream) + 1);
  ebb_event_list t = rt->preload.events;
  rt->preload.events = *events;
  *events = t;
  rt->preload.complete = complete;
  rt->preload.final = final;
  rt->preload.unknown_command_id = id;
  rt->preload.set = 1;
  return 0;
}

/* The command id was looked up off the loop and found unknown. If another
 * process records it meanwhile, the append finds it (res.idempotent). */
static int preload_knows_unknown(const ebb_runtime *rt, const ebb_command *cmd) {
  return rt->preload.set && rt->preload.unknown_command_id &&
         strcmp(rt->preload.unknown_command_id, cmd->command_id) == 0;
}

static int decide_command(ebb_runtime *rt, const ebb_command *cmd, ebb_decided **out,
                          char **result, ebb_error *err);

int ebb_runtime_decide(ebb_runtime *rt, const ebb_command *cmd, ebb_decided **out, char **result,
                       ebb_error *err) {
  int rc = decide_command(rt, cmd, out, result, err);
  preload_drop(rt); /* one decision's: never a later one's */
  return rc;
}

static int decide_command(ebb_runtime *rt, const ebb_command *cmd, ebb_decided **out,
                          char **result, ebb_error *err) {
  *out = NULL;
  *result = NULL;
  if (recover(rt, err) != 0) return err->code;
  if (validate_command(cmd, err)) return err->code;
  if (cmd->command_id && !preload_knows_unknown(rt, cmd)) {
    ebb_command_record rec;
    rec.rejection = NULL;
    int found = ebb_store_find_command(rt->store, cmd->command_id, &rec, err);
    if (found < 0) return err->code;
    if (found) {
      /* Answered from the record only for the same command on the same aggregate:
       * with its result, or with its refusal (never decided again). */
      int rc;
      if (strcmp(rec.type, cmd->type) != 0 || !same_stream(rt, cmd, rec.stream))
        rc = ebb_error_set(err, EBB_ECONFLICT, "command id %s was already used for %s on %s",
                           cmd->command_id, rec.type, rec.stream);
      else if (rec.rejection)
        rc = ebb_error_from_json(err, rec.rejection, strlen(rec.rejection));
      else
        rc = ebb_runtime_answer_stored(rt, rec.stream, rec.version, rec.first_position,
                                       rec.position, result, err);
      ebb_command_record_clear(&rec);
      return rc;
    }
  }
  ebb_decided *dc = rt->spare;
  if (dc) {
    rt->spare = dc->next_spare;
    rt->n_spare--;
    memset(dc, 0, sizeof *dc);
  } else if ((dc = calloc(1, sizeof *dc)) == NULL) {
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  }
  dc->cmd = cmd;
  dc->generation = rt->generation;
  decision *d = &dc->d;
  decision_init(d, rt, cmd->aggregate, cmd->id);
  d->cmd = cmd;
  while (decide(rt, d) != 0) {
    int code = d->err.code;
    if (code == EBB_EVERSION && d->preloaded && !d->preload_final) {
      /* The expected version may be right and the events read before behind:
       * the host reads them again (off this thread) and decides again. */
      decided_release(rt, dc);
      return EBB_RETRY;
    }
    if (code == EBB_EVERSION && d->from_cache) {
      /* The expected version may be right and the cache behind: its entry
       * is gone, so deciding again reads the stream. */
      decision_free(d);
      decision_init(d, rt, cmd->aggregate, cmd->id);
      d->cmd = cmd;
      continue;
    }
    if (code == EBB_EVERSION) cache_state(d, d->version, d->last_position);
    if (code == EBB_EREJECTED && cmd->command_id) {
      /* The refusal of a command with an id is recorded like an append (at
       * the version it was decided on, so a stale state decides again), and
       * answered once stored: a re-send then gets this refusal, whatever the
       * aggregate's state has become. */
      ebb_error_move(&dc->refusal, &d->err);
      ebb_buf_init(&dc->rejection);
      ebb_error_to_json(&dc->refusal, &dc->rejection);
      if (dc->rejection.oom) {
        decided_release(rt, dc);
        return ebb_error_set(err, EBB_ENOMEM, "out of memory");
      }
      dc->req = (ebb_append){.stream = d->stream, .expected = d->version,
                             .command_id = cmd->command_id, .command_type = cmd->type,
                             .rejection = ebb_buf_cstr(&dc->rejection)};
      ebb_error_init(&dc->req.err);
      dc->appends = 1;
      *out = dc;
      return 0;
    }
    if (err) ebb_error_move(err, &d->err);
    decided_release(rt, dc);
    return code;
  }
  dc->in = d->n_events <= INLINE_EVENTS ? dc->in_inline : calloc(d->n_events, sizeof *dc->in);
  if (dc->in == NULL) {
    decided_release(rt, dc);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  }
  for (size_t i = 0; i < d->n_events; i++) {
    const new_event *ne = &d->events[i];
    dc->in[i] = (ebb_event_in){
        .id = ne->id,
        .type = ne->text.data,
        .schema = ne->schema,
        .data = ne->text.data + ne->data_off,
        .data_len = ne->data_len,
        .metadata = ne->text.data + ne->metadata_off,
        .metadata_len = ne->metadata_len,
        .recorded_at = d->now,
    };
  }
  dc->req = (ebb_append){
      .stream = d->stream,
      .expected = d->version,
      .events = dc->in,
      .n = d->n_events,
      .command_id = cmd->command_id,
      .command_type = cmd->type,
      .json_checked = 1, /* made by ebb_json_encode just now */
  };
  ebb_error_init(&dc->req.err);
  dc->appends = d->n_events || cmd->command_id;
  *out = dc;
  return 0;
}

int ebb_runtime_finish(ebb_runtime *rt, ebb_decided *dc, char **result, ebb_error *err) {
  *result = NULL;
  decision *d = &dc->d;
  ebb_append_result res = {.version = d->version, .position = d->last_position};
  if (dc->appends) {
    if (dc->req.err.code) {
      int code = dc->req.err.code;
      int again = code == EBB_EVERSION;
      if (!again && err) ebb_error_move(err, &dc->req.err);
      decided_release(rt, dc);
      /* The state decided on was behind the store: the cached entry was stale
       * (it is gone already), or another process (a second daemon on a shared
       * PostgreSQL store, the CLI) appended between the read and the append.
       * Deciding again folds the stream from the store; an expected_version
       * the command gave is checked again there and fails then. */
      return again ? EBB_RETRY : code;
    }
    res = dc->req.result;
    if (d->n_events == 0 && !res.idempotent) res.position = d->last_position;
  }
  if (dc->refusal.code && !res.idempotent) { /* the refusal is stored: answer it */
    int code = dc->refusal.code;
    if (err) ebb_error_move(err, &dc->refusal);
    decided_release(rt, dc);
    return code;
  }
  if (res.idempotent) {
    /* The same command id was handled meanwhile (another process won the
     * race): answer with what was stored, and forget this decision. */
    char stream[EBB_MAX_NAME + 1];
    memcpy(stream, d->stream, sizeof stream);
    decided_release(rt, dc);
    return ebb_runtime_answer_stored(rt, stream, res.version, res.first_position, res.position,
                                     result, err);
  }
  if (dc->generation == rt->generation) {
    cache_state(d, res.version, d->n_events ? res.position : d->last_position);
    if (d->n_events) queue_snapshot(rt, d, res.position, d->now);
  }
  ebb_buf b = EBB_BUF_INIT;
  ebb_append_answer(&b, d->stream, &res, dc->in, d->n_events);
  decided_release(rt, dc);
  *result = ebb_buf_take(&b, NULL);
  return *result ? 0 : ebb_error_set(err, EBB_ENOMEM, "out of memory");
}

int ebb_runtime_send(ebb_runtime *rt, const ebb_command *cmd, char **result, ebb_error *err) {
  for (;;) {
    ebb_decided *dc;
    int rc = ebb_runtime_decide(rt, cmd, &dc, result, err);
    if (rc != 0 || dc == NULL) return rc;
    ebb_append *req = ebb_decided_append(dc);
    if (req) ebb_store_append(rt->store, req, 1, NULL);
    rc = ebb_runtime_finish(rt, dc, result, err);
    if (rc != EBB_RETRY) return rc;
  }
}

int ebb_runtime_state(ebb_runtime *rt, const char *aggregate, const char *id, char **result,
                      ebb_error *err) {
  return ebb_runtime_state_at(rt, aggregate, id, -1, NULL, result, err);
}

int ebb_runtime_state_at(ebb_runtime *rt, const char *aggregate, const char *id, int64_t version,
                         const char *at, char **result, ebb_error *err) {
  *result = NULL;
  if (recover(rt, err) != 0) return err->code;
  if (ebb_validate_name("aggregate", aggregate, err) || ebb_validate_name("aggregate id", id, err))
    return err->code;
  char time[EBB_TIME_LEN + 1];
  if (at) {
    int64_t ms;
    if (ebb_clock_parse(at, &ms) != 0)
      return ebb_error_set(err, EBB_EBADREQ,
                           "\"%s\" is not an RFC 3339 time such as 2026-01-31T12:00:00Z", at);
    ebb_clock_format(ms, time);
  }
  decision d;
  decision_init(&d, rt, aggregate, id);
  d.until_version = version;
  d.until_time = at ? time : NULL;
  if (decide(rt, &d) != 0) return fail_with(&d, err);
  ebb_buf b = EBB_BUF_INIT;
  size_t cat = ebb_stream_category_len(d.stream);
  ebb_buf_puts(&b, "{\"aggregate\":");
  ebb_buf_json_string(&b, d.stream, cat);
  ebb_buf_puts(&b, ",\"id\":");
  ebb_buf_json_string(&b, id, strlen(id));
  ebb_buf_puts(&b, ",\"stream\":");
  ebb_buf_json_string(&b, d.stream, strlen(d.stream));
  ebb_buf_printf(&b,
                 ",\"version\":%lld,\"position\":%lld,\"deleted\":%s,\"snapshot_version\":%lld,"
                 "\"state\":",
                 (long long)d.version, (long long)d.last_position, d.deleted ? "true" : "false",
                 (long long)d.base_version);
  ebb_buf_puts(&b, d.state_json);
  ebb_buf_putc(&b, '}');
  cache_state(&d, d.version, d.last_position);
  queue_snapshot(rt, &d, d.last_position, d.last_recorded_at);
  decision_free(&d);
  *result = ebb_buf_take(&b, NULL);
  return *result ? 0 : ebb_error_set(err, EBB_ENOMEM, "out of memory");
}

void ebb_runtime_cache_stats(ebb_runtime *rt, size_t *size, size_t *max, uint64_t *hits,
                             uint64_t *misses, uint64_t *evictions) {
  ebb_state_cache_stats st;
  ebb_state_cache_stats_get(rt->cache, &st);
  *size = st.size;
  *max = st.max;
  *hits = st.hits;
  *misses = st.misses;
  *evictions = st.evictions;
}

/* ---------------------------------------------------------------- snapshot listing */

typedef struct snapshot_listing {
  ebb_runtime *rt;
  ebb_buf *out;
  const char *stream;
  int stale_only;
  ebb_snapshot *doomed; /* for deletion: copies of stream and fingerprint */
  size_t n_doomed;
  int oom;
} snapshot_listing;

static int snapshot_is_current(const ebb_runtime *rt, const ebb_snapshot *snap) {
  const char *fp = fingerprint_of(rt, snap->stream, ebb_stream_category_len(snap->stream));
  return fp != NULL && strcmp(fp, snap->fingerprint) == 0;
}

static int list_one(void *ud, const ebb_snapshot *snap) {
  snapshot_listing *l = ud;
  ebb_buf *b = l->out;
  ebb_buf_puts(b, "{\"stream\":");
  ebb_buf_json_string(b, snap->stream, strlen(snap->stream));
  ebb_buf_printf(b, ",\"version\":%lld,\"position\":%lld,\"recorded_at\":", (long long)snap->version,
                 (long long)snap->position);
  ebb_buf_json_string(b, snap->recorded_at, strlen(snap->recorded_at));
  ebb_buf_puts(b, ",\"fingerprint\":");
  ebb_buf_json_string(b, snap->fingerprint, strlen(snap->fingerprint));
  ebb_buf_printf(b, ",\"bytes\":%zu,\"created_at\":", snap->state_len);
  ebb_buf_json_string(b, snap->created_at, strlen(snap->created_at));
  ebb_buf_printf(b, ",\"current\":%s}\n", snapshot_is_current(l->rt, snap) ? "true" : "false");
  return 0;
}

int ebb_runtime_snapshots(ebb_runtime *rt, ebb_buf *out, ebb_error *err) {
  if (ebb_runtime_flush(rt, err) != 0) return err->code;
  snapshot_listing l = {.rt = rt, .out = out};
  return ebb_store_snapshot_list(rt->store, list_one, &l, err);
}

static int doom_one(void *ud, const ebb_snapshot *snap) {
  snapshot_listing *l = ud;
  if ((l->stream && strcmp(l->stream, snap->stream) != 0) || snapshot_is_current(l->rt, snap))
    return 0;
  ebb_snapshot *p = realloc(l->doomed, (l->n_doomed + 1) * sizeof *p);
  if (p == NULL) return l->oom = 1;
  l->doomed = p;
  p[l->n_doomed] = (ebb_snapshot){.stream = strdup(snap->stream),
                                  .fingerprint = strdup(snap->fingerprint),
                                  .version = snap->version};
  if (!p[l->n_doomed].stream || !p[l->n_doomed].fingerprint) {
    free((char *)p[l->n_doomed].stream);
    free((char *)p[l->n_doomed].fingerprint);
    return l->oom = 1;
  }
  l->n_doomed++;
  return 0;
}

int ebb_runtime_delete_snapshots(ebb_runtime *rt, const char *stream, int stale_only,
                                 int64_t *deleted, ebb_error *err) {
  *deleted = 0;
  if (ebb_runtime_flush(rt, err) != 0) return err->code;
  if (!stale_only) return ebb_store_snapshot_delete(rt->store, stream, NULL, -1, deleted, err);
  snapshot_listing l = {.rt = rt, .stream = stream, .stale_only = 1};
  int rc = ebb_store_snapshot_list(rt->store, doom_one, &l, err);
  if (rc == 0 && l.oom) rc = ebb_error_set(err, EBB_ENOMEM, "out of memory");
  for (size_t i = 0; i < l.n_doomed; i++) {
    int64_t n = 0;
    if (rc == 0)
      rc = ebb_store_snapshot_delete(rt->store, l.doomed[i].stream, l.doomed[i].fingerprint,
                                     l.doomed[i].version, &n, err);
    *deleted += n;
    free((char *)l.doomed[i].stream);
    free((char *)l.doomed[i].fingerprint);
  }
  free(l.doomed);
  return rc;
}
