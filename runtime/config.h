/*
 * config.h: the settings of ebb (data directory, listening address, limits,
 * ...) from their four sources, with precedence
 *
 *   command-line flags > environment (EBB_*) > Lua config file > defaults.
 *
 * Every setting has one name used everywhere: `--max-body 2097152`,
 * `EBB_MAX_BODY=2097152`, `max_body = 2097152` in the file. The file is a
 * Lua chunk run in an empty environment (no libraries) that either returns
 * a table of settings or assigns them as globals; unknown names and wrong
 * types are errors, so a typo never passes silently.
 */
#ifndef EBB_CONFIG_H
#define EBB_CONFIG_H

#include <stdint.h>

#include "buf.h"
#include "error.h"

typedef struct ebb_config {
  /* text settings: malloc'd, never NULL after ebb_config_init */
  char *data, *store, *aggregates, *projections, *reactors, *durability, *listen, *token, *url,
      *cacert, *log_level, *log_format, *config, *nats, *nats_stream, *nats_subject_prefix,
      *nats_from, *nats_creds, *nats_token, *nats_user, *nats_password, *nats_tls_ca,
      *nats_tls_cert, *nats_tls_key;
  /* numbers */
  int64_t max_body, max_connections, idle_timeout_ms, request_timeout_ms, shutdown_timeout_ms,
      cache_size, subscriber_buffer, heartbeat_ms, memory_limit, instruction_budget,
      query_timeout_ms;
  const char *source[48]; /* per setting (in table order): "default", "file", "env", "flag" */
} ebb_config;

void ebb_config_init(ebb_config *c);     /* defaults */
void ebb_config_free(ebb_config *c);     /* harmless twice */

/* Sets one setting by its name ("max-body" or "max_body") from text, as
 * given by source. EBB_ENOTFOUND for an unknown name, EBB_EBADREQ for a bad value. */
int ebb_config_set(ebb_config *c, const char *name, const char *value, const char *source,
                   ebb_error *err);
/* Is `name` a setting? (lets the CLI tell settings from command options) */
int ebb_config_known(const char *name);
/* Reads every EBB_<NAME> variable that is set. */
int ebb_config_load_env(ebb_config *c, ebb_error *err);
/* Runs the Lua config file at path. */
int ebb_config_load_file(ebb_config *c, const char *path, ebb_error *err);
/* Checks the whole (listen address, durability, the token rule, log level). */
int ebb_config_validate(const ebb_config *c, ebb_error *err);
/* host and port of `listen` ("127.0.0.1:7070", "[::1]:7070", ":7070"). */
int ebb_config_listen(const ebb_config *c, char *host, size_t hostlen, int *port, ebb_error *err);
/* Is the host a loopback address (127.0.0.0/8, ::1, localhost)? */
int ebb_config_is_loopback(const char *host);
/* Appends the settings as a JSON object {name: {value, source}} (tokens and
 * passwords masked, also in the store and NATS URLs). */
void ebb_config_dump(const ebb_config *c, ebb_buf *out);
/* Help lines: "  --name VALUE   help (default ...)" for every setting. */
void ebb_config_help(ebb_buf *out);

#endif
