/*
 * paths.h: where this ebb's own files are, found from the file the code runs
 * in (the ebb executable, or ebb/core.so inside a Lua interpreter), so that an
 * installed tree keeps working when it is moved to another prefix:
 *
 *   PREFIX/bin/ebb                the executable
 *   PREFIX/share/ebb/lua/ebb/     the runtime's Lua library (require "ebb")
 *   PREFIX/lib/ebb/ebb/core.so    the ebb.core C module
 *   PREFIX/share/ebb/skeleton/    what `ebb init` copies into a new project
 *   PREFIX/share/ebb/console/     the web console's files
 *
 * A binary that is not in such a tree (build/ebb, build/lua/ebb/core.so) uses
 * the source tree's runtime/lua and skeleton/, and the build tree's lua/, it
 * was built from.
 * EBB_LUA_DIR in the environment overrides the Lua library's directory, and
 * EBB_CONSOLE_DIR the console's.
 */
#ifndef EBB_PATHS_H
#define EBB_PATHS_H

/* The directory holding ebb/init.lua. Resolved once; never NULL. */
const char *ebb_paths_lua_dir(void);
/* The directory holding ebb/core.so (for LUA_CPATH as DIR/?.so). Never NULL. */
const char *ebb_paths_cmod_dir(void);
/* The directory `ebb init` copies from. Never NULL. */
const char *ebb_paths_skeleton_dir(void);
/* The directory holding the console's index.html. Never NULL. */
const char *ebb_paths_console_dir(void);
/* "installed" or "build": which of the two layouts was found. */
const char *ebb_paths_layout(void);

#endif
