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
    head(b, "ebb_commit_batch_size", "histogram", "Appends (commands) per group commit.");
    uint64_t cum = 0;
    for (int i = 0; i < EBB_WRITER_BATCH_BUCKETS; i++) {
      cum += ws.batch_hist[i];
      ebb_buf_printf(b, "ebb_commit_batch_size_bucket{le=\"%u\"} %llu\n", ebb_writer_batch_bounds[i],
                     (unsigned long long)cum);
    }
    cum += ws.batch_hist[EBB_WRITER_BATCH_BUCKETS];
    ebb_buf_printf(b, "ebb_commit_batch_size_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)cum);
    ebb_buf_printf(b, "ebb_commit_batch_size_sum %llu\nebb_commit_batch_size_count %llu\n",
                   (unsigned long long)ws.requests, (unsigned long long)ws.batches);
    head(b, "ebb_commit_seconds", "histogram", "Time of one group commit, begin to durable.");
    cum = 0;
    for (int i = 0; i < EBB_WRITER_TIME_BUCKETS; i++) {
      cum += ws.commit_hist[i];
      ebb_buf_printf(b, "ebb_commit_seconds_bucket{le=\"%g\"} %llu\n", ebb_writer_time_bounds[i],
                     (unsigned long long)cum);
    }
    cum += ws.commit_hist[EBB_WRITER_TIME_BUCKETS];
    ebb_buf_printf(b, "ebb_commit_seconds_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)cum);
    ebb_buf_printf(b, "ebb_commit_seconds_sum %.9f\nebb_commit_seconds_count %llu\n",
                   ws.commit_seconds, (unsigned long long)ws.batches);
    counter(b, "ebb_commit_failures_total", "Group commits whose transaction failed.",
            (double)ws.failed_batches);
    counter(b, "ebb_fsync_total", "fsync calls made by the store.", (double)ws.syncs);
    counter(b, "ebb_fsync_seconds_total", "Time spent in fsync.", ws.sync_seconds);
    counter(b, "ebb_snapshots_written_total", "Aggregate snapshots written.", (double)ws.snapshots);
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
  memory(b);
}
