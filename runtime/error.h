/*
 * error.h: the one error record that every fallible ebb function fills.
 *
 * Library code never exits and never prints: it returns a negative EBB_E*
 * code and, when given an ebb_error, leaves a sentence in it saying what went
 * wrong. Callers decide what to do (the CLI maps kinds to exit codes, the
 * Lua binding to `nil, message, code`, the daemon to HTTP statuses).
 */
#ifndef EBB_ERROR_H
#define EBB_ERROR_H

#include <stddef.h>
#include <stdint.h>

enum {
  EBB_OK = 0,
  EBB_EBADREQ = -1,    /* bad_request: malformed input, invalid names, bad JSON */
  EBB_ENOTFOUND = -2,  /* not_found: unknown aggregate, command, stream */
  EBB_EVERSION = -3,   /* wrong_expected_version: carries expected and actual */
  EBB_ECONFLICT = -4,  /* conflict: event id or command id already used elsewhere */
  EBB_EREJECTED = -5,  /* rejected: ebb.reject() from a handler; may carry details */
  EBB_ESCRIPT = -6,    /* script_error: any other Lua failure, budget or memory cap */
  EBB_ETOOLARGE = -7,  /* too_large */
  EBB_ESTORE = -8,     /* storage_error: SQLite or file-system failure */
  EBB_EBUSY = -9,      /* busy: the data directory is held by someone else */
  EBB_ENOMEM = -10,    /* out_of_memory */
  EBB_EUNAVAIL = -11,  /* unavailable: shutting down */
  EBB_ETIMEOUT = -12,  /* timeout */
  EBB_EDELETED = -13   /* stream_deleted */
};

/* Sentinel expected versions; a non-negative value is an exact version. */
#define EBB_EXPECT_ANY ((int64_t)-1)
#define EBB_EXPECT_NO_STREAM ((int64_t)-2)
#define EBB_EXPECT_EXISTS ((int64_t)-3)

typedef struct ebb_error {
  int code;             /* EBB_OK or an EBB_E* code */
  char message[1024];   /* one sentence, no trailing newline */
  int64_t expected;     /* EBB_EVERSION: what the caller expected (may be a sentinel) */
  int64_t actual;       /* EBB_EVERSION: the stream's version (0: no stream) */
  char *details;        /* JSON text owned by the error (rejection details), or NULL */
} ebb_error;

void ebb_error_init(ebb_error *err);
/* Frees details and resets to EBB_OK. Harmless on a cleared error. */
void ebb_error_clear(ebb_error *err);
/* Sets code and message (printf-style); returns code. err may be NULL. */
int ebb_error_set(ebb_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Takes ownership of a malloc'd JSON text for details (frees the old one). */
void ebb_error_set_details(ebb_error *err, char *json);
/* Moves src into dst (dst cleared first); src is left cleared. */
void ebb_error_move(ebb_error *dst, ebb_error *src);

/* An error as a JSON object {"code", "message", "details"?} (code: its name;
 * details: as held), and back into err, returning its code; or EBB_ESTORE
 * (the text is not such an object) / EBB_ENOMEM, err then saying so. What a
 * store records of a refused command. */
struct ebb_buf;
void ebb_error_to_json(const ebb_error *err, struct ebb_buf *out);
int ebb_error_from_json(ebb_error *err, const char *json, size_t len);

/* Stable machine name of a code: "wrong_expected_version", "rejected", ... */
const char *ebb_error_name(int code);

/* Writes an expected version as JSON: a number or "any"/"no_stream"/"exists". */
const char *ebb_expected_name(int64_t expected, char *buf, size_t len);

#endif
