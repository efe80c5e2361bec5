/*
 * pattern.h: Lua 5.4's string patterns with a step counter charged to the
 * sandbox's instruction budget (see pattern.c). Internal to the runtime.
 */
#ifndef EBB_PATTERN_H
#define EBB_PATTERN_H

#include <lua.h>

/* Replaces find, match, gmatch and gsub in the string library table at
   index strlib with the counting matcher. */
void ebb__pattern_install(lua_State *L, int strlib);

#endif
