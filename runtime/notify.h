/*
 * notify.h: `ebb serve` talking to its service manager (systemd, Type=notify)
 * through sd_notify(3): READY=1 once it listens, STATUS= with the head
 * position, STOPPING=1 when it drains, and WATCHDOG=1 at half of WatchdogSec.
 * Outside systemd (no NOTIFY_SOCKET) every call does nothing.
 *
 * Life cycle, on the daemon's loop thread: ebb_notifier_ready starts the
 * timer, ebb_notifier_close closes it (uv_close); the struct must outlive the
 * close callback, which the daemon's final uv_run provides.
 */
#ifndef EBB_NOTIFY_H
#define EBB_NOTIFY_H

#include <stdint.h>
#include <uv.h>

typedef struct ebb_notifier {
  uv_timer_t timer;        /* the watchdog and STATUS updates */
  int timer_open;
  int enabled;             /* NOTIFY_SOCKET was set */
  int watchdog;            /* WATCHDOG_USEC was set (for this process) */
  const int64_t *head;     /* the daemon's head position, read at each tick */
  int64_t reported;        /* the head the last STATUS= said */
  const char *state;       /* "listening" or "draining" */
} ebb_notifier;

/* Sends READY=1 and the first STATUS=; starts pinging the watchdog every
 * WATCHDOG_USEC/2 (if set) and refreshing STATUS= when the head moves. The
 * strings and head must live until ebb_notifier_close. */
void ebb_notifier_ready(ebb_notifier *n, uv_loop_t *loop, const int64_t *head);
/* Sends STOPPING=1 with the STATUS= of a draining daemon. */
void ebb_notifier_stopping(ebb_notifier *n);
/* Stops and closes the timer; harmless twice, and on a notifier never started. */
void ebb_notifier_close(ebb_notifier *n);

#endif
