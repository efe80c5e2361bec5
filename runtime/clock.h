/*
 * clock.h: wall-clock time as ebb records it (RFC 3339, UTC, milliseconds)
 * and a monotonic clock for measuring.
 */
#ifndef EBB_CLOCK_H
#define EBB_CLOCK_H

#include <stdint.h>

#define EBB_TIME_LEN 24 /* "2026-11-23T12:00:00.000Z" */

int64_t ebb_clock_now_ms(void);      /* Unix milliseconds */
uint64_t ebb_clock_mono_ns(void);    /* monotonic nanoseconds */
/* Formats Unix milliseconds as RFC 3339 UTC with milliseconds, NUL-terminated. */
void ebb_clock_format(int64_t ms, char out[EBB_TIME_LEN + 1]);
/* Parses RFC 3339 (any offset, optional fraction) into Unix milliseconds. 0 or -1. */
int ebb_clock_parse(const char *s, int64_t *ms);

#endif
