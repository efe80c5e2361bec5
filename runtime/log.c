/*
 * log.c: log records on stderr (see log.h). Each record is built in memory
 * and written with one write(2), so lines from the writer thread and the
 * loop never interleave.
 */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "buf.h"
#include "clock.h"

static ebb_log_level min_level = EBB_LOG_INFO;
static int as_json;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void ebb_log_setup(ebb_log_level min, ebb_log_format format) {
  min_level = min;
  as_json = format == EBB_LOG_JSON || (format == EBB_LOG_AUTO && !isatty(STDERR_FILENO));
}

int ebb_log_enabled(ebb_log_level level) {
  return level >= min_level;
}

int ebb_log_level_parse(const char *s) {
  for (int i = 0; i < 4; i++)
    if (strcmp(s, level_names[i]) == 0) return i;
  return -1;
}

void ebb_log(ebb_log_level level, const char *msg, ...) {
  if (level < min_level) return;
  char ts[EBB_TIME_LEN + 1];
  ebb_clock_format(ebb_clock_now_ms(), ts);
  ebb_buf b = EBB_BUF_INIT;
  if (as_json) {
    ebb_buf_printf(&b, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":", ts, level_names[level]);
    ebb_buf_json_string(&b, msg, strlen(msg));
  } else {
    ebb_buf_printf(&b, "%s %-5s %s", ts, level_names[level], msg);
  }
  va_list ap;
  va_start(ap, msg);
  for (const char *k; (k = va_arg(ap, const char *)) != NULL;) {
    const char *v = va_arg(ap, const char *);
    if (v == NULL) v = "";
    int number = k[0] == '#';
    if (number) k++;
    if (as_json) {
      ebb_buf_putc(&b, ',');
      ebb_buf_json_string(&b, k, strlen(k));
      ebb_buf_putc(&b, ':');
      if (number) ebb_buf_puts(&b, v);
      else ebb_buf_json_string(&b, v, strlen(v));
    } else {
      ebb_buf_printf(&b, " %s=", k);
      /* Quoted only when needed, so the common case stays easy to read. */
      if (!number && (*v == '\0' || strpbrk(v, " \"=\n\t"))) ebb_buf_json_string(&b, v, strlen(v));
      else ebb_buf_puts(&b, v);
    }
  }
  va_end(ap);
  ebb_buf_puts(&b, as_json ? "}\n" : "\n");
  if (!b.oom) {
    ssize_t ignored = write(STDERR_FILENO, b.data, b.len);
    (void)ignored;
  }
  ebb_buf_free(&b);
}
