/*
 * project.h: a user's own ebb project: `ebb init` lays one out from the
 * skeleton (paths.h), `ebb test` runs its specs with busted under Lua 5.4.
 */
#ifndef EBB_PROJECT_H
#define EBB_PROJECT_H

#include "buf.h"
#include "error.h"

/* Copies every file of skeleton_dir into dir (created if missing), never
 * replacing a file that exists. Appends one line per file to report:
 * "created DIR/REL" or "skipped DIR/REL (it exists)". On an error (EBB_ESTORE,
 * the path in the message) the files created so far stay, and are reported. */
int ebb_project_init(const char *dir, const char *skeleton_dir, ebb_buf *report, ebb_error *err);

/* Runs `lua5.4 busted ARGS...` in the current directory with the runtime's
 * Lua library, ebb.core and the module directories (aggregates, projections,
 * reactors, spec) on the paths. busted's output is passed through, then one last line
 * "N passed, N failed". Returns busted's exit status (128 + N for signal N);
 * -1 with err set when busted cannot be started. */
int ebb_project_test(const char *aggregates, const char *projections, const char *reactors,
                     int argc, char **argv, ebb_error *err);

#endif
