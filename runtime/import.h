/*
 * import.h: the line parser of `ebb import`: one NDJSON line (an event as
 * `ebb export` writes it) checked and turned into owned C strings, ready to
 * append. Its own file so that the import fuzz target (fuzz/fuzz_ndjson.c)
 * runs the same code as the CLI.
 */
#ifndef EBB_IMPORT_H
#define EBB_IMPORT_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

/* One event line. Every string is owned (ebb_import_event_free). */
typedef struct ebb_import_event {
  char *stream, *id, *type, *data, *metadata, *recorded_at;
  int64_t version, schema;
  size_t data_len, metadata_len;
  long line;
} ebb_import_event;

/* Frees the strings and zeroes e; harmless twice. */
void ebb_import_event_free(ebb_import_event *e);

/* A lua_CFunction, called through lua_pcall with the line's text (1) and an
 * ebb_import_event * (2, light userdata, zeroed) to fill. Raises with a
 * message for a bad line; e then may hold some strings (free it either way).
 * data and metadata keep the bytes of the line, so export -> import ->
 * export is exact; recorded_at is put in canonical form. */
int ebb_import_parse_line(lua_State *L);

#endif
