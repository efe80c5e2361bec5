/*
 * bench_streams.c: the long-streams benchmark (a program to run, not a test).
 *
 * Prints, in one run:
 *  (d) cold loads of one aggregate whose stream holds 10,000 and 100,000
 *      events: without snapshots (a full replay) and with a snapshot every
 *      100 events (the newest snapshot plus the 99 events after it, the worst
 *      case). "Cold" means nothing cached: every load reads the store.
 *  (e) replay speed of a stream whose events are all stored at schema 1 and
 *      go through a 3-step upcaster chain (1 -> 2 -> 3 -> 4), against the same
 *      events stored at the current schema.
 * Targets: (d) a cold load with snapshots within 2 ms whatever the length;
 * (e) the chain at no less than half the speed of no chain.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "runtime.h"
#include "uuid.h"

static void die(const char *what, const ebb_error *err) {
  fprintf(stderr, "ebb-bench-streams: %s: %s\n", what, err ? err->message : "failed");
  exit(1);
}

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  if (f == NULL || fputs(text, f) < 0 || fclose(f) != 0) die(path, NULL);
}

/* The two test aggregates: a counter with snapshots every 100 events, and a
 * document whose Written events changed shape three times. */
static const char *const counter_lua =
    "return { type = 'Counter', snapshot_every = 100,\n"
    "  initial = function() return { n = 0, sum = 0, last = '' } end,\n"
    "  apply = { Added = function(s, e) s.n = s.n + 1; s.sum = s.sum + e.data.amount;\n"
    "                                   s.last = e.data.note; return s end },\n"
    "  handle = {} }\n";

static const char *const doc_lua =
    "return { type = 'Doc', schemas = { Written = 4 },\n"
    "  initial = function() return { n = 0, words = 0 } end,\n"
    "  apply = { Written = function(s, e) s.n = s.n + 1; s.words = s.words + e.data.words;\n"
    "                                     return s end },\n"
    "  handle = {},\n"
    "  upcast = { Written = {\n"
    "    [1] = function(d) d.title = d.title or 'untitled'; return d end,\n"
    "    [2] = function(d) d.words = d.words or #d.body; return d end,\n"
    "    [3] = function(d) d.lang = d.lang or 'en'; return d end } } }\n";

/* Appends n events to stream in batches, all at `schema`; data from make(i). */
static void fill(ebb_store *s, const char *stream, const char *type, int64_t schema, int64_t n,
                 void (*make)(int64_t i, char *buf, size_t len)) {
  enum { BATCH = 1000 };
  static char ids[BATCH][EBB_UUID_LEN + 1], data[BATCH][256];
  ebb_event_in ev[BATCH];
  for (int64_t done = 0; done < n;) {
    int k = n - done < BATCH ? (int)(n - done) : BATCH;
    for (int i = 0; i < k; i++) {
      ebb_uuid_new(ids[i]);
      make(done + i, data[i], sizeof data[i]);
      ev[i] = (ebb_event_in){.id = ids[i], .type = type, .schema = schema, .data = data[i],
                             .data_len = strlen(data[i]), .metadata = "{}", .metadata_len = 2};
    }
    ebb_append req = {.stream = stream, .expected = EBB_EXPECT_ANY, .events = ev, .n = (size_t)k};
    ebb_error_init(&req.err);
    ebb_store_append(s, &req, 1, NULL);
    if (req.err.code) die("filling a stream", &req.err);
    done += k;
  }
}

static void counter_event(int64_t i, char *buf, size_t len) {
  snprintf(buf, len, "{\"amount\":%lld,\"note\":\"event number %lld\"}", (long long)(i % 97),
           (long long)i);
}

static void doc_v1(int64_t i, char *buf, size_t len) {
  snprintf(buf, len, "{\"body\":\"lorem ipsum dolor sit amet %lld\"}", (long long)i);
}

static void doc_v4(int64_t i, char *buf, size_t len) {
  snprintf(buf, len,
           "{\"body\":\"lorem ipsum dolor sit amet %lld\",\"title\":\"untitled\",\"words\":30,"
           "\"lang\":\"en\"}",
           (long long)i);
}

static ebb_runtime *open_rt(const char *data, const char *aggs, int snapshots) {
  ebb_runtime_options o = {.data_dir = data, .aggregates_dir = aggs,
                           .durability = EBB_DURABILITY_NORMAL, .cache_size = -1,
                           .no_snapshots = !snapshots, .instruction_budget = (int64_t)1 << 40};
  ebb_runtime *rt;
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_runtime_open(&rt, &o, &err) != 0) die("opening", &err);
  return rt;
}

/* Milliseconds per cold load, averaged over at least `min_runs` loads and 1 s. */
static double time_loads(ebb_runtime *rt, const char *aggregate, const char *id, int min_runs,
                         int64_t *version, int64_t *from_snapshot) {
  uint64_t start = ebb_clock_mono_ns();
  int runs = 0;
  do {
    char *out;
    ebb_error err;
    ebb_error_init(&err);
    if (ebb_runtime_state(rt, aggregate, id, &out, &err) != 0) die("loading", &err);
    const char *v = strstr(out, "\"version\":"), *sv = strstr(out, "\"snapshot_version\":");
    *version = v ? atoll(v + 10) : -1;
    *from_snapshot = sv ? atoll(sv + 19) : -1;
    free(out);
    runs++;
  } while (runs < min_runs || ebb_clock_mono_ns() - start < 1000000000ull);
  return (double)(ebb_clock_mono_ns() - start) / 1e6 / runs;
}

int main(int argc, char **argv) {
  int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
  char root[] = "/tmp/ebb-bench-streams.XXXXXX";
  if (mkdtemp(root) == NULL) die("mkdtemp", NULL);
  char aggs[4200], path[4300];
  snprintf(aggs, sizeof aggs, "%s/aggregates", root);
  snprintf(path, sizeof path, "mkdir -p %s", aggs);
  if (system(path) != 0) die("mkdir", NULL);
  snprintf(path, sizeof path, "%s/counter.lua", aggs);
  write_file(path, counter_lua);
  snprintf(path, sizeof path, "%s/doc.lua", aggs);
  write_file(path, doc_lua);
  char data[4200];
  snprintf(data, sizeof data, "%s/data", root);

  printf("ebb long-streams benchmark (2 cores, tmp dir %s)\n", root);
  printf("%-52s %12s %10s %s\n", "case", "events", "ms/load", "folded from");
  static const int64_t lengths[2] = {10000, 100000};
  double with_ms[2] = {0};
  ebb_runtime *rt = open_rt(data, aggs, 1);
  for (int l = 0; l < 2; l++) {
    int64_t n = quick ? lengths[l] / 10 : lengths[l];
    char stream[64], id[32];
    snprintf(id, sizeof id, "c%d", l);
    snprintf(stream, sizeof stream, "Counter-%s", id);
    fill(ebb_runtime_store(rt), stream, "Added", 1, n - 99, counter_event);
    /* One full load takes the snapshot (at n - 99); then 99 events more. */
    int64_t v, sv;
    time_loads(rt, "counter", id, 1, &v, &sv);
    ebb_error err;
    ebb_error_init(&err);
    if (ebb_runtime_flush(rt, &err) != 0) die("writing the snapshot", &err);
    fill(ebb_runtime_store(rt), stream, "Added", 1, 99, counter_event);
    ebb_runtime *cold = open_rt(data, aggs, 0);
    double ms = time_loads(cold, "counter", id, 3, &v, &sv);
    ebb_runtime_close(cold);
    char label[80];
    snprintf(label, sizeof label, "(d) cold load, %lld events, no snapshots", (long long)n);
    printf("%-52s %12lld %10.3f %s\n", label, (long long)v, ms, "event 1");
    cold = open_rt(data, aggs, 1);
    with_ms[l] = time_loads(cold, "counter", id, 3, &v, &sv);
    ebb_runtime_close(cold);
    snprintf(label, sizeof label, "(d) cold load, %lld events, snapshot every 100", (long long)n);
    printf("%-52s %12lld %10.3f snapshot at %lld + %lld events\n", label, (long long)v, with_ms[l],
           (long long)sv, (long long)(v - sv));
  }
  ebb_runtime_close(rt);

  /* (e) */
  int64_t n = quick ? 20000 : 200000;
  rt = open_rt(data, aggs, 0);
  fill(ebb_runtime_store(rt), "Doc-old", "Written", 1, n, doc_v1);
  fill(ebb_runtime_store(rt), "Doc-new", "Written", 4, n, doc_v4);
  int64_t v, sv;
  double plain = time_loads(rt, "doc", "new", 2, &v, &sv);
  double chained = time_loads(rt, "doc", "old", 2, &v, &sv);
  ebb_runtime_close(rt);
  double plain_rate = (double)n / plain * 1000, chain_rate = (double)n / chained * 1000;
  printf("%-52s %12lld %10.1f %.0f events/s\n", "(e) replay, events at the current schema",
         (long long)n, plain, plain_rate);
  printf("%-52s %12lld %10.1f %.0f events/s, ratio %.2f\n",
         "(e) replay, every event through 3 upcasters", (long long)n, chained, chain_rate,
         chain_rate / plain_rate);

  printf("\ntargets: (d) cold load with snapshots <= 2 ms at every length: %s (%.3f ms, %.3f ms)\n",
         with_ms[0] <= 2.0 && with_ms[1] <= 2.0 ? "met" : "NOT met", with_ms[0], with_ms[1]);
  printf("         (e) 3-step upcaster chain >= 0.5 x no chain: %s (%.2f)\n",
         chain_rate / plain_rate >= 0.5 ? "met" : "NOT met", chain_rate / plain_rate);
  snprintf(path, sizeof path, "rm -rf %s", root);
  if (system(path) != 0) return 1;
  return 0;
}
