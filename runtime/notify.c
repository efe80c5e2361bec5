/*
 * notify.c: the systemd notify protocol for `ebb serve` (see notify.h).
 *
 * The watchdog is pinged from a timer on the daemon's own event loop, not
 * from a thread: a loop stuck in a long Lua call or a blocked write stops the
 * pings, which is what the watchdog exists to notice. The same tick refreshes
 * STATUS= when the head has moved (at most every 5 s without a watchdog), so
 * `systemctl status ebb` shows where the store is without a message per
 * commit.
 *
 * libsystemd is optional at build time (CMake: EBB_SYSTEMD). Built without
 * it, a daemon started under systemd says so once in the log and sends
 * nothing; a Type=notify unit then times out at start, which is why the
 * Debian package is always built with it.
 */
#include "notify.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

#ifdef EBB_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#define STATUS_EVERY_MS 5000

static void notify_send(const char *text) {
#ifdef EBB_HAVE_SYSTEMD
  int rc = sd_notify(0, text);
  if (rc < 0) {
    char e[32];
    snprintf(e, sizeof e, "%d", rc);
    ebb_log(EBB_LOG_WARN, "sd_notify failed", "message", text, "#errno", e, NULL);
  }
#else
  (void)text;
#endif
}

/* Sends prefix (lines ending in "\n", or "") then STATUS= with the head now. */
static void send_status(ebb_notifier *n, const char *prefix) {
  char text[160];
  n->reported = *n->head;
  snprintf(text, sizeof text, "%sSTATUS=%s, head position %" PRId64, prefix, n->state, n->reported);
  notify_send(text);
}

static void on_tick(uv_timer_t *t) {
  ebb_notifier *n = t->data;
  const char *ping = n->watchdog ? "WATCHDOG=1\n" : "";
  if (*n->head != n->reported) send_status(n, ping);
  else if (n->watchdog) notify_send("WATCHDOG=1");
}

void ebb_notifier_ready(ebb_notifier *n, uv_loop_t *loop, const int64_t *head) {
  const char *sock = getenv("NOTIFY_SOCKET");
  n->enabled = sock != NULL && sock[0] != '\0';
  n->head = head;
  n->state = "listening";
  if (!n->enabled) return;
#ifndef EBB_HAVE_SYSTEMD
  ebb_log(EBB_LOG_WARN, "NOTIFY_SOCKET is set but ebb was built without libsystemd: no notifications",
          NULL);
  n->enabled = 0;
  return;
#else
  send_status(n, "READY=1\n");
  uint64_t usec = 0;
  uint64_t every = STATUS_EVERY_MS;
  n->watchdog = sd_watchdog_enabled(0, &usec) > 0 && usec > 0;
  if (n->watchdog) {
    every = usec / 2000;
    if (every == 0) every = 1;
    if (every > STATUS_EVERY_MS) every = STATUS_EVERY_MS;
  }
  ebb_log(EBB_LOG_INFO, "systemd notifications on", "watchdog", n->watchdog ? "on" : "off", NULL);
  uv_timer_init(loop, &n->timer);
  n->timer.data = n;
  n->timer_open = 1;
  uv_timer_start(&n->timer, on_tick, every, every);
#endif
}

void ebb_notifier_stopping(ebb_notifier *n) {
  if (!n->enabled) return;
  n->state = "draining";
  send_status(n, "STOPPING=1\n");
}

void ebb_notifier_close(ebb_notifier *n) {
  if (n->timer_open && !uv_is_closing((uv_handle_t *)&n->timer)) uv_close((uv_handle_t *)&n->timer, NULL);
}
