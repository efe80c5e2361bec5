/*
 * uuid.c: UUIDv7 generation (see uuid.h).
 *
 * The random part comes from a per-thread xorshift generator seeded from the
 * kernel (getrandom) once per thread: ids need uniqueness, not secrecy, and a
 * system call per id would cost more than the append that uses it.
 */
#include "uuid.h"

#include <stdint.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

static _Thread_local uint64_t rng_state[2];

static uint64_t rng_next(void) {
  if (rng_state[0] == 0 && rng_state[1] == 0) {
    if (getrandom(rng_state, sizeof rng_state, 0) != (ssize_t)sizeof rng_state ||
        (rng_state[0] == 0 && rng_state[1] == 0)) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      rng_state[0] = (uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
      rng_state[1] = (uint64_t)ts.tv_sec ^ (uint64_t)(uintptr_t)&rng_state;
    }
  }
  /* xorshift128+ */
  uint64_t s1 = rng_state[0];
  const uint64_t s0 = rng_state[1];
  rng_state[0] = s0;
  s1 ^= s1 << 23;
  rng_state[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
  return rng_state[1] + s0;
}

void ebb_uuid_new(char out[EBB_UUID_LEN + 1]) {
  static const char hex[] = "0123456789abcdef";
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  uint64_t ms = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
  uint64_t r1 = rng_next(), r2 = rng_next();
  unsigned char b[16];
  for (int i = 0; i < 6; i++) b[i] = (unsigned char)(ms >> (40 - 8 * i));
  for (int i = 6; i < 16; i++) b[i] = (unsigned char)((i < 11 ? r1 : r2) >> (8 * (i % 8)));
  b[6] = (unsigned char)(0x70 | (b[6] & 0x0F)); /* version 7 */
  b[8] = (unsigned char)(0x80 | (b[8] & 0x3F)); /* RFC 9562 variant */
  int o = 0;
  for (int i = 0; i < 16; i++) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out[o++] = '-';
    out[o++] = hex[b[i] >> 4];
    out[o++] = hex[b[i] & 15];
  }
  out[o] = '\0';
}
