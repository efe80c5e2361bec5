/*
 * metrics.c: `GET /metrics`, in the Prometheus text exposition format
 * (version 0.0.4). Counters live where they are counted (daemon.c, sse.c,
 * the writer, the runtime's cache); this file only counts requests and
 * renders everything.
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "buf.h"
#include "daemon.h"

void ebb__metrics_count_request(ebb_metrics *m, int route, int status) {
  int slot = N_STATUS_SLOTS - 1; /* the last slot takes any overflow */
  for (int i = 0; i < N_STATUS_SLOTS; i++) {
    if (m->statuses[i] == status) {
      slot = i;
      break;
    }
    if (m->statuses[i] == 0) {
      m->statuses[i] = status;
      slot = i;
      break;
    }
  }
  m->requests[route][slot]++;
}

static void head(ebb_buf *b, const char *name, const char *type, const char *help) {
  ebb_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void counter(ebb_buf *b, const char *name, const char *help, double v) {
  head(b, name, "counter", help);
  ebb_buf_printf(b, "%s %.17g\n", name, v);
}

static void gauge(ebb_buf *b, const char *name, const char *help, double v) {
  head(b, name, "gauge", help);
  ebb_buf_printf(b, "%s %.17g\n", name, v);
}

/* A histogram from per-bucket counts (hist[n]: above every bound). */
static void histogram(ebb_buf *b, const char *name, const char *help, const double *bounds,
                      size_t n, const uint64_t *hist, double sum, uint64_t count) {
  head(b, name, "histogram", help);
  uint64_t cum = 0;
  for (size_t i = 0; i <= n; i++) {
    cum += hist[i];
    if (i < n) ebb_buf_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, bounds[i], (unsigned long long)cum);
    else ebb_buf_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cum);
  }
  ebb_buf_printf(b, "%s_sum %.9g\n%s_count %llu\n", name, sum, name, (unsigned long long)count);
}

static void memory(ebb_buf *b) {
  FILE *f = fopen("/proc/self/statm", "r");
  unsigned long size = 0, resident = 0;
  if (f) {
    if (fscanf(f, "%lu %lu", &size, &resident) != 2) size = resident = 0;
    fclose(f);
  }
  long page = sysconf(_SC_PAGESIZE);
  gauge(b, "process_resident_memory_bytes", "Resident memory size in bytes.",
        (double)resident * (double)page);
  gauge(b, "process_virtual_memory_bytes", "Virtual memory size in bytes.",
        (double)size * (double)page);
}

void ebb__metrics_render(ebb_daemon *d, ebb_buf *b) {
  ebb_metrics *m = &d->m;
  head(b, "ebb_http_requests_total", "counter", "HTTP requests answered, by route and status.");
  for (int r = 0; r < N_ROUTES; r++)
    for (int i = 0; i < N_STATUS_SLOTS && m->statuses[i]; i++)
      if (m->requests[r][i])
        ebb_buf_printf(b, "ebb_http_requests_total{route=\"%s\",status=\"%d\"} %llu\n",
                       ebb__route_names[r], m->statuses[i], (unsigned long long)m->requests[r][i]);
  head(b, "ebb_commands_total", "counter", "Commands answered, by result.");
  for (int i = 0; i < 16; i++)
    if (m->commands[i] || i == 0)
      ebb_buf_printf(b, "ebb_commands_total{result=\"%s\"} %llu\n",
                     i == 0 ? "ok" : ebb_error_name(-i), (unsigned long long)m->commands[i]);
  counter(b, "ebb_events_appended_total", "Events committed by this daemon.",
          (double)m->events_appended);
  gauge(b, "ebb_head_position", "The last committed global position.", (double)d->head);
  gauge(b, "ebb_commands_in_flight", "Commands and appends accepted and not yet answered.",
        (double)d->jobs);

  if (d->writer) {
    ebb_writer_stats ws;
    ebb_writer_stats_get(d->writer, &ws);
    histogram(b, "ebb_commit_batch_size", "Appends (commands) per group commit.",
              ebb_writer_batch_bounds, EBB_WRITER_BATCH_BUCKETS, ws.batch_hist,
              (double)ws.requests, ws.batches);
    histogram(b, "ebb_commit_seconds", "Time of one group commit, begin to durable.",
              ebb_writer_time_bounds, EBB_WRITER_TIME_BUCKETS, ws.commit_hist, ws.commit_seconds,
              ws.batches);
    counter(b, "ebb_commit_failures_total", "Group commits whose transaction failed.",
            (double)ws.failed_batches);
    counter(b, "ebb_fsync_total", "fsync calls made by the store.", (double)ws.syncs);
    counter(b, "ebb_fsync_seconds_total", "Time spent in fsync.", ws.sync_seconds);
    counter(b, "ebb_snapshots_written_total", "Aggregate snapshots written.", (double)ws.snapshots);
  }

  ebb_live_status ls;
  ebb_live_status_get(d->live, &ls);
  gauge(b, "ebb_leader", "1 while this daemon holds the store's leader lock.", ls.leader);
  if (d->live) {
    gauge(b, "ebb_store_connected",
          "1 while the link watching the shared store is connected, 0 while it reconnects.",
          ls.connected);
    counter(b, "ebb_store_reconnects_total", "Links to the shared store that broke and reconnected.",
            (double)ls.reconnects);
    counter(b, "ebb_store_wakeups_total", "Heads read after a commit notification or a reconnect.",
            (double)ls.wakeups);
  }
  gauge(b, "ebb_subscribers", "Open Server-Sent Events subscriptions.", (double)d->n_subscribers);
  counter(b, "ebb_subscriber_events_total", "Events sent to subscribers.",
          (double)m->sse_events_sent);
  counter(b, "ebb_subscriber_overflows_total", "Subscribers cut off for falling behind.",
          (double)m->sse_overflows);
  gauge(b, "ebb_http_connections", "Open HTTP connections.",
        d->http ? (double)ebb_http_server_connections(d->http) : 0);

  size_t size, max;
  uint64_t hits, misses, evictions;
  ebb_runtime_cache_stats(d->rt, &size, &max, &hits, &misses, &evictions);
  counter(b, "ebb_aggregate_cache_hits_total", "Commands and reads served from cached state.",
          (double)hits);
  counter(b, "ebb_aggregate_cache_misses_total", "Aggregates folded from the store.",
          (double)misses);
  counter(b, "ebb_aggregate_cache_evictions_total", "Cached states dropped to stay in bounds.",
          (double)evictions);
  gauge(b, "ebb_aggregate_cache_entries", "Aggregates whose state is cached.", (double)size);
  gauge(b, "ebb_aggregate_cache_capacity", "The cache's bound.", (double)max);
  head(b, "ebb_module_reloads_total", "counter", "SIGHUP reloads of the aggregate modules.");
  ebb_buf_printf(b, "ebb_module_reloads_total{result=\"ok\"} %llu\n",
                 (unsigned long long)m->reloads);
  ebb_buf_printf(b, "ebb_module_reloads_total{result=\"failed\"} %llu\n",
                 (unsigned long long)m->reload_failures);
  if (d->projections) ebb_projections_metrics(d->projections, b);
  if (d->reactors) ebb_reactors_metrics(d->reactors, b);
  if (d->publisher) ebb_publisher_metrics(d->publisher, b);
  memory(b);
}
