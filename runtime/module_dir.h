/*
 * module_dir.h: the Lua modules of a directory (projections/, reactors/),
 * found the same way by the hot-reloading scans, `ebb check` and the
 * aggregates' loader; and the FNV-1a hash that fingerprints module code.
 */
#ifndef EBB_MODULE_DIR_H
#define EBB_MODULE_DIR_H

#include <stddef.h>
#include <stdint.h>

#define EBB_FNV1A_INIT 1469598103934665603ull

uint64_t ebb_fnv1a(uint64_t h, const void *p, size_t n);

/* Folds the file's bytes into *h: 0, or -1 (h unchanged) if it cannot be read. */
int ebb_file_hash(const char *path, uint64_t *h);

/* name: the file name without ".lua"; path: dir/file. */
typedef void (*ebb_module_fn)(void *ud, const char *name, const char *path);

/* Calls fn for each NAME.lua in dir that is not hidden, in directory order:
 * 0, or -1 if dir cannot be opened (a missing directory has no modules). */
int ebb_module_dir_each(const char *dir, ebb_module_fn fn, void *ud);

#endif
