/*
 * sandbox.h: the sandboxed, bounded Lua state in which user modules
 * (aggregates, later projections) run.
 *
 * This file owns the one place where untrusted-ish domain code meets the
 * process: which globals a module sees (an allow-list modelled on Redis's
 * script_lua.c), how modules are found and loaded (`require` from fixed
 * directories, text only, each module in an environment of its own), and the
 * bounds on every call into Lua (a byte cap on the whole state and a VM
 * instruction budget per call, both enforced by a kill that Lua code cannot
 * catch). Everything else about Lua (what handlers are called with, how
 * results are decoded) belongs to the callers.
 *
 * Host notes:
 * - The state's global table (LUA_RIDX_GLOBALS) is the table of safe globals
 *   that every module environment falls back to; lua_setglobal() from C
 *   therefore defines something every module sees. Modules cannot write it.
 * - The memory cap applies to host allocations too: push and build values
 *   inside lua_pcall when they may be large, or a refusal outside protected
 *   mode ends in Lua's panic.
 * - The sandbox owns the allocator's ud and every thread's extra space
 *   (lua_getextraspace); do not repurpose them.
 */
#ifndef EBB_SANDBOX_H
#define EBB_SANDBOX_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "error.h"

typedef struct ebb_sandbox ebb_sandbox;

/* The text of every Lua file a sandbox loaded, by path (see
   ebb_sandbox_options.sources). */
typedef struct ebb_sandbox_sources ebb_sandbox_sources;
ebb_sandbox_sources *ebb_sandbox_sources_new(void);  /* NULL when out of memory */
void ebb_sandbox_sources_free(ebb_sandbox_sources *src); /* NULL-safe */

typedef struct ebb_sandbox_options {
  const char *const *module_dirs;  /* directories `require` may load user modules from, in order */
  size_t n_module_dirs;
  const char *runtime_dir;         /* the runtime's own Lua library (require "ebb" -> runtime_dir/ebb/init.lua); searched first */
  size_t memory_limit;             /* bytes for the whole state; 0 = 128 MiB */
  int64_t instruction_budget;      /* VM instructions per ebb_sandbox_call; 0 = EBB_SANDBOX_DEFAULT_BUDGET */
  /* Where file texts come from: a file read once is kept here and every
     later load of the same path (in this sandbox or another given the same
     sources) uses the kept text, not the disk. A host rebuilding its sandbox
     after a kill passes the sources of the one it replaces, so the code
     that was running comes back even if a file changed since. Borrowed: it
     must outlive the sandbox. NULL: the sandbox keeps its own. */
  ebb_sandbox_sources *sources;
} ebb_sandbox_options;

#define EBB_SANDBOX_DEFAULT_MEMORY ((size_t)128 * 1024 * 1024)
/* 10 million: a call that uses it all (a loop, a pathological pattern, an
   encoding bomb; C work is charged as instructions) holds the thread that
   runs it well under 250 ms on this project's 2-core VM (a plain loop about
   60 ms, the costliest C-heavy attacks about 200 ms; README, "Budgets"), so
   a hostile module cannot stall the daemon's loop for long. Domain handlers
   use a few thousand. */
#define EBB_SANDBOX_DEFAULT_BUDGET ((int64_t)10000000)

/* Creates the state with the safe globals installed. opt may be NULL
   (defaults, no module directories). Returns 0 or EBB_ENOMEM / EBB_ESCRIPT. */
int ebb_sandbox_new(ebb_sandbox **out, const ebb_sandbox_options *opt, ebb_error *err);
void ebb_sandbox_free(ebb_sandbox *sb);            /* NULL-safe */
lua_State *ebb_sandbox_state(ebb_sandbox *sb);

/* Loads the Lua source file at path (text only, never binary chunks) with
   chunk name "@"..chunkname (so errors read "order.lua:12: ..."; NULL means
   path), in a fresh environment table of its own whose __index is the safe
   globals, runs it under the same bounds as ebb_sandbox_call, and pushes its
   single return value. Returns 0, or an EBB_E* code with a message naming
   file and line (syntax error, runtime error, budget); on failure nothing is
   pushed. A file that cannot be opened is EBB_ENOTFOUND. */
int ebb_sandbox_load_file(ebb_sandbox *sb, const char *path, const char *chunkname, ebb_error *err);

/* Like lua_pcall(L, nargs, nresults, <traceback handler>) but bounded:
   resets the instruction budget, arms the hook, clears any previous kill.
   Returns a LUA_* status. On error the error object is on top of the stack,
   unchanged if it is not a string (rejections are tables and must arrive
   intact); for string errors it is the message, and the traceback is
   available from ebb_sandbox_traceback(). When the call was killed the error
   is always the kill reason (a string) and the status is never LUA_OK. */
int ebb_sandbox_call(ebb_sandbox *sb, int nargs, int nresults);
/* Gives the call in progress its whole instruction budget again (not once
   it was killed). A host running many units of user code in one call, such
   as a batch of events through their handlers, bounds each unit this way;
   call it from C between them. */
void ebb_sandbox_recharge(ebb_sandbox *sb);
const char *ebb_sandbox_traceback(ebb_sandbox *sb);   /* of the last failed call, or "" */
/* Why the last call was killed: NULL if it was not, else e.g.
   "instruction budget of 10000000 exceeded at order.lua:12" or
   "memory limit of 134217728 bytes exceeded". */
const char *ebb_sandbox_killed(ebb_sandbox *sb);
size_t ebb_sandbox_memory(ebb_sandbox *sb);           /* bytes in use by the state */

/* Work done in C on behalf of the running call, which the instruction hook
   cannot see (pattern matching, encoding), charged to its bounds: steps
   count as instructions, bytes (output built outside the state, such as
   encoded JSON) count against the memory cap until the call ends or is
   recharged. Returns 0, or -1 once the call is killed (the bound was hit
   now or before); the caller then stops and fails, and the call ends with
   the kill reason whatever it returns. Does nothing (0) when L is not a
   sandbox's state or no bounded call runs: the same C code serves plain
   Lua. */
int ebb_sandbox_spend(lua_State *L, int64_t steps, size_t bytes);
/* What an encoder owes since its last charge: the values it wrote, at
   value_cost instructions each, and the bytes its output grew by (out_len -
   *charged) plus `ahead` bytes it is about to write, at one instruction per
   2, charged through ebb_sandbox_spend. Resets *values and moves *charged
   past `ahead`. Returns what ebb_sandbox_spend returns. */
int ebb_sandbox_spend_output(lua_State *L, int64_t *values, int value_cost, size_t *charged,
                             size_t out_len, size_t ahead);
/* ebb_sandbox_spend(L, steps, 0), raising the kill reason on -1. For C
   functions that hold nothing that a longjmp would leak. */
void ebb_sandbox_charge(lua_State *L, int64_t steps);

#endif
