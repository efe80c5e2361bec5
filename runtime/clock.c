/*
 * clock.c: RFC 3339 formatting and parsing, clocks (see clock.h).
 */
#include "clock.h"

#include <ctype.h>
#include <string.h>
#include <time.h>

int64_t ebb_clock_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint64_t ebb_clock_mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static char *put_digits(char *p, unsigned v, int n) {
  for (int i = n - 1; i >= 0; i--, v /= 10) p[i] = (char)('0' + v % 10);
  return p + n;
}

void ebb_clock_format(int64_t ms, char out[EBB_TIME_LEN + 1]) {
  time_t secs = (time_t)(ms >= 0 ? ms / 1000 : (ms - 999) / 1000);
  unsigned millis = (unsigned)(ms - (int64_t)secs * 1000);
  struct tm tm;
  gmtime_r(&secs, &tm);
  char *p = out;
  p = put_digits(p, (unsigned)(tm.tm_year + 1900) % 10000, 4);
  *p++ = '-';
  p = put_digits(p, (unsigned)tm.tm_mon + 1, 2);
  *p++ = '-';
  p = put_digits(p, (unsigned)tm.tm_mday, 2);
  *p++ = 'T';
  p = put_digits(p, (unsigned)tm.tm_hour, 2);
  *p++ = ':';
  p = put_digits(p, (unsigned)tm.tm_min, 2);
  *p++ = ':';
  p = put_digits(p, (unsigned)tm.tm_sec, 2);
  *p++ = '.';
  p = put_digits(p, millis, 3);
  *p++ = 'Z';
  *p = '\0';
}

static int digits(const char **p, int n, int *out) {
  int v = 0;
  for (int i = 0; i < n; i++) {
    if (!isdigit((unsigned char)**p)) return -1;
    v = v * 10 + (**p - '0');
    (*p)++;
  }
  *out = v;
  return 0;
}

int ebb_clock_parse(const char *s, int64_t *ms) {
  int y, mo, d, h, mi, sec, frac = 0;
  const char *p = s;
  if (digits(&p, 4, &y) || *p++ != '-' || digits(&p, 2, &mo) || *p++ != '-' || digits(&p, 2, &d))
    return -1;
  if (*p != 'T' && *p != 't' && *p != ' ') return -1;
  p++;
  if (digits(&p, 2, &h) || *p++ != ':' || digits(&p, 2, &mi) || *p++ != ':' || digits(&p, 2, &sec))
    return -1;
  if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60) return -1;
  if (*p == '.') {
    p++;
    int n = 0;
    while (isdigit((unsigned char)*p)) {
      if (n < 3) frac = frac * 10 + (*p - '0');
      n++;
      p++;
    }
    if (n == 0) return -1;
    for (; n < 3; n++) frac *= 10;
  }
  int offset_min = 0;
  if (*p == 'Z' || *p == 'z') {
    p++;
  } else if (*p == '+' || *p == '-') {
    int sign = *p == '-' ? -1 : 1, oh, om;
    p++;
    if (digits(&p, 2, &oh) || *p++ != ':' || digits(&p, 2, &om)) return -1;
    offset_min = sign * (oh * 60 + om);
  } else {
    return -1;
  }
  if (*p != '\0') return -1;
  /* Days from civil (Howard Hinnant's algorithm): no timezone state involved. */
  int yy = y - (mo <= 2);
  int era = (yy >= 0 ? yy : yy - 399) / 400;
  unsigned yoe = (unsigned)(yy - era * 400);
  unsigned doy = (unsigned)((153 * (mo + (mo > 2 ? -3 : 9)) + 2) / 5 + d - 1);
  unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  int64_t days = (int64_t)era * 146097 + (int64_t)doe - 719468;
  *ms = ((days * 86400 + h * 3600 + mi * 60 + sec) - (int64_t)offset_min * 60) * 1000 + frac;
  return 0;
}
