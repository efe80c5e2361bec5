/*
 * paths.c: finds the runtime's Lua library and the ebb.core module relative to
 * the file this code was loaded from (see paths.h for the layout). dladdr()
 * names core.so when the code runs inside a Lua interpreter; for the
 * executable it may not give a usable path, so /proc/self/exe is used there.
 * The answer is computed once (pthread_once: projection and reader threads ask
 * too) and never changes while the process runs.
 */
#define _GNU_SOURCE
#include "paths.h"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef EBB_SOURCE_DIR
#error "EBB_SOURCE_DIR must be defined (CMakeLists.txt)"
#endif
#ifndef EBB_BUILD_CMOD_DIR
#error "EBB_BUILD_CMOD_DIR must be defined (CMakeLists.txt)"
#endif

static pthread_once_t once = PTHREAD_ONCE_INIT;
static char lua_dir[PATH_MAX], cmod_dir[PATH_MAX], skeleton_dir[PATH_MAX], console_dir[PATH_MAX];
static const char *layout = "build";

/* Does the file name end in ".so" (a shared object, not the executable)? */
static int is_shared_object(const char *name) {
  size_t n = strlen(name);
  return n > 3 && strcmp(name + n - 3, ".so") == 0;
}

/* Writes the real path of the file holding this code into out. */
static int self_path(char *out) {
  Dl_info info;
  if (dladdr((void *)&ebb_paths_lua_dir, &info) && info.dli_fname &&
      is_shared_object(info.dli_fname) && realpath(info.dli_fname, out))
    return 0;
  return realpath("/proc/self/exe", out) ? 0 : -1;
}

/* Strips `suffix` (a path tail starting with '/') from dir; 1 if it was there. */
static int strip(char *dir, const char *suffix) {
  size_t n = strlen(dir), m = strlen(suffix);
  if (n <= m || strcmp(dir + n - m, suffix) != 0) return 0;
  dir[n - m] = '\0';
  return 1;
}

static void resolve(void) {
  char self[PATH_MAX], prefix[PATH_MAX];
  snprintf(lua_dir, sizeof lua_dir, "%s/runtime/lua", EBB_SOURCE_DIR);
  snprintf(cmod_dir, sizeof cmod_dir, "%s", EBB_BUILD_CMOD_DIR);
  snprintf(skeleton_dir, sizeof skeleton_dir, "%s/skeleton", EBB_SOURCE_DIR);
  snprintf(console_dir, sizeof console_dir, "%s/runtime/console", EBB_SOURCE_DIR);
  if (self_path(self) == 0) {
    char *slash = strrchr(self, '/');
    if (slash) *slash = '\0';
    snprintf(prefix, sizeof prefix, "%s", self);
    if (strip(prefix, "/bin") || strip(prefix, "/lib/ebb/ebb")) {
      char lua[PATH_MAX], cmod[PATH_MAX], skel[PATH_MAX], con[PATH_MAX];
      int a = snprintf(lua, sizeof lua, "%s/share/ebb/lua", prefix);
      int b = snprintf(cmod, sizeof cmod, "%s/lib/ebb", prefix);
      int k = snprintf(skel, sizeof skel, "%s/share/ebb/skeleton", prefix);
      int c = snprintf(con, sizeof con, "%s/share/ebb/console", prefix);
      /* An installed tree, even one missing its library: errors then name
       * where it should be, and the source tree it came from is never used. */
      if (a < (int)sizeof lua && b < (int)sizeof cmod && k < (int)sizeof skel && c < (int)sizeof con) {
        memcpy(lua_dir, lua, sizeof lua);
        memcpy(cmod_dir, cmod, sizeof cmod);
        memcpy(skeleton_dir, skel, sizeof skel);
        memcpy(console_dir, con, sizeof con);
        layout = "installed";
      }
    }
  }
  const char *env = getenv("EBB_LUA_DIR");
  if (env && env[0]) snprintf(lua_dir, sizeof lua_dir, "%s", env);
  env = getenv("EBB_CONSOLE_DIR");
  if (env && env[0]) snprintf(console_dir, sizeof console_dir, "%s", env);
}

const char *ebb_paths_lua_dir(void) {
  pthread_once(&once, resolve);
  return lua_dir;
}

const char *ebb_paths_cmod_dir(void) {
  pthread_once(&once, resolve);
  return cmod_dir;
}

const char *ebb_paths_skeleton_dir(void) {
  pthread_once(&once, resolve);
  return skeleton_dir;
}

const char *ebb_paths_console_dir(void) {
  pthread_once(&once, resolve);
  return console_dir;
}

const char *ebb_paths_layout(void) {
  pthread_once(&once, resolve);
  return layout;
}
