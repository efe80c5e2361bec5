/*
 * log.h: the daemon's log, on stderr.
 *
 * One line per record: readable text on a terminal, a JSON object per line
 * otherwise (for journald, docker, log shippers). A record is a message and
 * fields given as key/value pairs; a key starting with '#' marks its value as
 * a number, written without quotes in JSON.
 */
#ifndef EBB_LOG_H
#define EBB_LOG_H

typedef enum ebb_log_level {
  EBB_LOG_DEBUG = 0,
  EBB_LOG_INFO = 1,
  EBB_LOG_WARN = 2,
  EBB_LOG_ERROR = 3
} ebb_log_level;

typedef enum ebb_log_format { EBB_LOG_AUTO = 0, EBB_LOG_TEXT, EBB_LOG_JSON } ebb_log_format;

/* Sets the least level written and the format (AUTO: text when stderr is a terminal). */
void ebb_log_setup(ebb_log_level min, ebb_log_format format);
int ebb_log_enabled(ebb_log_level level);
/* Parses "debug", "info", "warn", "error"; -1 otherwise. */
int ebb_log_level_parse(const char *s);
/* Writes one record. Arguments after msg: key, value, key, value, ..., NULL. */
void ebb_log(ebb_log_level level, const char *msg, ...);

#endif
