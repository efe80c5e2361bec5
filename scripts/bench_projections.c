/*
 * bench_projections.c: replay speed of the projection host (scripts/bench
 * projections). Writes N order events (default 1,000,000: orders of one
 * OrderCreated, eight ItemAdded and one OrderConfirmed) into a fresh store,
 * then times how long a projection takes to catch up from position 0:
 *   (a) a projection whose handlers do nothing (the runner's own cost:
 *       reading, upcasting, building event tables, checkpoints);
 *   (b) projections/order_summary.lua (real SQL writes).
 * A program that prints figures, not a test.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "clock.h"
#include "log.h"
#include "projection.h"
#include "store.h"
#include "uuid.h"

static char base[4096];

static void die(const char *what, const ebb_error *err) {
  fprintf(stderr, "ebb-bench-projections: %s: %s\n", what, err ? err->message : strerror(errno));
  exit(1);
}

static void cleanup(void) {
  if (base[0]) {
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", base);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", base);
  }
}

/* Writes n events, 10 per order, 1000 per transaction. */
static void fill(const char *dir, int64_t n) {
  ebb_store *s;
  ebb_error err;
  ebb_error_init(&err);
  ebb_store_options so = {.dir = dir, .durability = EBB_DURABILITY_NORMAL};
  if (ebb_store_open(&s, &so, &err) != 0) die("open store", &err);
  enum { PER_TX = 1000, PER_ORDER = 10 };
  static char ids[PER_TX][EBB_UUID_LEN + 1], datas[PER_TX][128], streams[PER_TX / PER_ORDER][32];
  ebb_event_in in[PER_TX];
  ebb_append reqs[PER_TX / PER_ORDER];
  int64_t order = 0;
  for (int64_t done = 0; done < n; done += PER_TX) {
    size_t nreq = 0;
    for (int k = 0; k < PER_TX; k++) {
      int step = k % PER_ORDER;
      if (step == 0) {
        snprintf(streams[nreq], sizeof streams[nreq], "Order-%lld", (long long)++order);
        reqs[nreq] = (ebb_append){.stream = streams[nreq], .expected = 0, .events = &in[k],
                                  .n = PER_ORDER, .json_checked = 1};
        nreq++;
      }
      ebb_uuid_new(ids[k]);
      const char *type;
      int64_t schema = 1;
      if (step == 0) {
        type = "OrderCreated";
        schema = 2;
        snprintf(datas[k], sizeof datas[k], "{\"customer_id\":\"c-%lld\",\"currency\":\"EUR\"}",
                 (long long)(order % 1000));
      } else if (step < PER_ORDER - 1) {
        type = "ItemAdded";
        snprintf(datas[k], sizeof datas[k], "{\"sku\":\"SKU-%d\",\"qty\":%d,\"price\":%d}", step,
                 step, 100 * step);
      } else {
        type = "OrderConfirmed";
        snprintf(datas[k], sizeof datas[k], "{\"total\":20400,\"item_count\":36}");
      }
      in[k] = (ebb_event_in){.id = ids[k], .type = type, .schema = schema, .data = datas[k],
                             .data_len = strlen(datas[k]), .metadata = "{}", .metadata_len = 2};
    }
    if (ebb_store_append_atomic(s, reqs, nreq, &err) != 0) die("append", &err);
  }
  ebb_store_close(s);
}

typedef struct run {
  ebb_projections *h;
  const char *name;
  int64_t head;
  uint64_t t0;
  double seconds;
  uv_timer_t timer;
} run;

static void on_tick(uv_timer_t *t) {
  run *r = t->data;
  if (ebb_projections_position(r->h, r->name) >= r->head) {
    r->seconds = (double)(ebb_clock_mono_ns() - r->t0) / 1e9;
    uv_timer_stop(t);
    ebb_projections_stop(r->h);
    uv_close((uv_handle_t *)t, NULL);
  }
}

/* Times one projection module (copied into its own directory) from 0 to head. */
static double replay(const char *data, const char *module_path, const char *name, int64_t head) {
  char dir[4200], cmd[30000], models[4200];
  snprintf(dir, sizeof dir, "%s/projections-%s", base, name);
  snprintf(models, sizeof models, "%s/projections", data);
  snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s' && mkdir -p '%s' && cp '%s' '%s/%s.lua'", dir, models,
           dir, module_path, dir, name);
  if (system(cmd) != 0) die("copy the module", NULL);
  uv_loop_t loop;
  uv_loop_init(&loop);
  run r = {.name = name, .head = head};
  ebb_projections_options o = {.loop = &loop, .data_dir = data, .projections_dir = dir,
                               .aggregates_dir = "aggregates"};
  ebb_error err;
  ebb_error_init(&err);
  r.t0 = ebb_clock_mono_ns();
  if (ebb_projections_start(&r.h, &o, &err) != 0) die("start the projections", &err);
  uv_timer_init(&loop, &r.timer);
  r.timer.data = &r;
  uv_timer_start(&r.timer, on_tick, 1, 1);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return r.seconds;
}

int main(int argc, char **argv) {
  int64_t n = 1000000;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--quick")) n = 100000;
    else if (!strcmp(argv[i], "--events") && i + 1 < argc) n = atoll(argv[++i]);
    else {
      fprintf(stderr, "usage: ebb-bench-projections [--quick] [--events N]\n");
      return 2;
    }
  }
  n = (n + 999) / 1000 * 1000;
  ebb_log_setup(EBB_LOG_WARN, EBB_LOG_TEXT);
  const char *tmp = getenv("EBB_BENCH_DIR");
  snprintf(base, sizeof base, "%s/ebb-bench-proj-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (mkdtemp(base) == NULL) die("mkdtemp", NULL);
  atexit(cleanup);
  char data[4200], noop[4200];
  snprintf(data, sizeof data, "%s/data", base);
  snprintf(noop, sizeof noop, "%s/noop.lua", base);
  FILE *f = fopen(noop, "w");
  if (!f) die("write noop.lua", NULL);
  fputs("local function nothing() end\n"
        "return { name = \"noop\", version = 1, from = { \"Order\" },\n"
        "  on = { OrderCreated = nothing, ItemAdded = nothing, OrderConfirmed = nothing } }\n",
        f);
  fclose(f);
  printf("ebb projection replay benchmark (%ld cores): %lld order events\n",
         sysconf(_SC_NPROCESSORS_ONLN), (long long)n);
  uint64_t t0 = ebb_clock_mono_ns();
  fill(data, n);
  printf("  writing them: %.1f s\n", (double)(ebb_clock_mono_ns() - t0) / 1e9);
  fflush(stdout);
  double a = replay(data, noop, "noop", n);
  printf("(a) no-op handlers       %10.0f events/s  (%.2f s)   target >= 300,000: %s\n", n / a, a,
         n / a >= 300000 ? "met" : "NOT met");
  fflush(stdout);
  double b = replay(data, "projections/order_summary.lua", "order_summary", n);
  printf("(b) order_summary        %10.0f events/s  (%.2f s)   target >= 100,000: %s\n", n / b, b,
         n / b >= 100000 ? "met" : "NOT met");
  return 0;
}
