/*
 * module_dir.h: the Lua modules of a directory (projections/, reactors/),
 * found the same way by the hot-reloading scans, `ebb check` and the
 * aggregates' loader; and the FNV-1a hash that fingerprints module code.
 */
#ifndef EBB_MODULE_DIR_H
#define EBB_MODULE_DIR_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

#define EBB_FNV1A_INIT 1469598103934665603ull

uint64_t ebb_fnv1a(uint64_t h, const void *p, size_t n);

/* Folds the file's bytes into *h: 0, or -1 (h unchanged) if it cannot be read. */
int ebb_file_hash(const char *path, uint64_t *h);

/* name: the file name without ".lua"; path: dir/file. */
typedef void (*ebb_module_fn)(void *ud, const char *name, const char *path);

/* Calls fn for each NAME.lua in dir that is not hidden, in directory order:
 * 0, or -1 if dir cannot be opened (a missing directory has no modules). */
int ebb_module_dir_each(const char *dir, ebb_module_fn fn, void *ud);

/* What `ebb check` says of a directory's modules: a line per broken one in
 * report, the names of the good ones as JSON list items in names (if any). */
typedef struct ebb_module_check {
  ebb_buf *report, *names;
  int problems;
} ebb_module_check;

/* msg: why the module is broken (NULL: out of memory), unless ok. */
void ebb_module_check_note(ebb_module_check *c, const char *name, int ok, const char *msg);

#endif
