/*
 * loadgen.c: the load generator of `scripts/bench http` (build/ebb-loadgen).
 *
 * One thread, epoll, C keep-alive connections to an `ebb serve`, each with
 * one request in flight: a closed loop, as a client that waits for its
 * answer would run. It is small on purpose: on a two-core machine the client
 * shares the CPU with the daemon, so it prints its own CPU time, and what it
 * does not spend is left to the daemon.
 *
 * Workloads (--mode):
 *   health   GET /health: the HTTP stack alone
 *   open     OpenAccount on a new account per request
 *   deposit  Deposit 1 on N accounts opened first (untimed), each connection
 *            on its own accounts, with expected_version
 *   append   POST /streams/<s>: one event per append on N streams of its own
 *            per run, each connection on its own streams, with expected_version
 *   orders   CreateOrder on a new order per request (projection lag runs)
 * With --pid, it reads the daemon's /proc/PID/io write_bytes and its
 * /metrics (batch sizes) around the timed part, so the figures cover only it.
 *
 * Output: one line, RESULT key=value ... (see usage()).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { M_HEALTH, M_OPEN, M_DEPOSIT, M_APPEND, M_ORDERS };

typedef struct conn {
  int fd, idx;
  char out[1024];
  size_t out_len, out_off;
  char in[16384];
  size_t in_len;
  uint64_t t0;
  int64_t key; /* the account or stream of the request in flight, -1: none */
  uint64_t n;  /* requests sent */
  int waiting; /* --rate: its next request waits for its turn */
} conn;

static struct {
  const char *host;
  int port, conns, mode, pid;
  double seconds;
  long accounts;
  char run[32];
  double rate; /* requests per second at most (0: as fast as answers come) */
  const char *on_timed; /* a shell command run right before the timed part */
} opt = {"127.0.0.1", 0, 64, M_HEALTH, 0, 10, 10000, "", 0, NULL};

/* --rate: may one more request go now? (an open-loop pace over the timed part) */
static uint64_t paced_start, paced_sent;
static int may_send(uint64_t t) {
  if (opt.rate <= 0) return 1;
  if ((double)paced_sent >= (double)(t - paced_start) * opt.rate / 1e9) return 0;
  paced_sent++;
  return 1;
}

static int64_t *versions; /* per account or stream: its version as this client knows it */
static uint32_t *lat;     /* latencies of the timed part, microseconds */
static size_t n_lat, cap_lat;
static uint64_t non200, errors;
static char first_error[256];

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
         ru.ru_stime.tv_usec / 1e6;
}

static int dial(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port)};
  if (inet_pton(AF_INET, opt.host, &a.sin_addr) != 1 ||
      connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

static void post(conn *c, const char *path, const char *body) {
  c->out_len = (size_t)snprintf(c->out, sizeof c->out,
                                "POST %s HTTP/1.1\r\nHost: ebb\r\nContent-Type: application/json\r\n"
                                "Content-Length: %zu\r\n\r\n%s",
                                path, strlen(body), body);
}

/* Builds the connection's next request. Accounts and streams are spread over
 * the connections (k % conns == idx), so no two requests race on one. */
static void next_request(conn *c, int preload) {
  char body[512];
  c->key = -1;
  c->out_off = 0;
  uint64_t n = c->n++;
  long per = (opt.accounts - c->idx + opt.conns - 1) / opt.conns; /* this connection's share */
  if (preload) {
    long k = (long)n * opt.conns + c->idx; /* n < per: checked by the caller */
    snprintf(body, sizeof body,
             "{\"aggregate\":\"bank_account\",\"id\":\"acc-%ld\",\"type\":\"OpenAccount\","
             "\"data\":{\"owner\":\"bench\"}}",
             k + 1);
    c->key = k;
    post(c, "/commands", body);
    return;
  }
  switch (opt.mode) {
    case M_OPEN:
      snprintf(body, sizeof body,
               "{\"aggregate\":\"bank_account\",\"id\":\"r%s-c%d-%llu\",\"type\":\"OpenAccount\","
               "\"data\":{\"owner\":\"bench\"},\"expected_version\":0}",
               opt.run, c->idx, (unsigned long long)n);
      post(c, "/commands", body);
      break;
    case M_ORDERS:
      snprintf(body, sizeof body,
               "{\"aggregate\":\"order\",\"id\":\"r%s-c%d-%llu\",\"type\":\"CreateOrder\","
               "\"data\":{\"customer_id\":\"c-%llu\"}}",
               opt.run, c->idx, (unsigned long long)n, (unsigned long long)(n % 100));
      post(c, "/commands", body);
      break;
    case M_DEPOSIT: {
      long k = (long)(n % (uint64_t)per) * opt.conns + c->idx;
      c->key = k;
      snprintf(body, sizeof body,
               "{\"aggregate\":\"bank_account\",\"id\":\"acc-%ld\",\"type\":\"Deposit\","
               "\"data\":{\"amount\":1},\"expected_version\":%lld}",
               k + 1, (long long)versions[k]);
      post(c, "/commands", body);
      break;
    }
    case M_APPEND: {
      long k = (long)(n % (uint64_t)per) * opt.conns + c->idx;
      char path[128];
      c->key = k;
      snprintf(path, sizeof path, "/streams/bench_%s-%ld", opt.run, k + 1);
      snprintf(body, sizeof body,
               "{\"expected_version\":%lld,\"events\":[{\"type\":\"MoneyDeposited\","
               "\"data\":{\"amount\":1,\"balance\":%lld}}]}",
               (long long)versions[k], (long long)versions[k] + 1);
      post(c, path, body);
      break;
    }
    default:
      c->out_len = (size_t)snprintf(c->out, sizeof c->out, "GET /health HTTP/1.1\r\nHost: ebb\r\n\r\n");
  }
}

/* A whole answer in c->in: its length (0: not yet), status in *status. */
static size_t complete(conn *c, int *status) {
  c->in[c->in_len < sizeof c->in ? c->in_len : sizeof c->in - 1] = '\0';
  char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
  if (end == NULL) return 0;
  size_t head = (size_t)(end - c->in) + 4;
  size_t body = 0;
  for (char *p = c->in; p && p < end; p = strstr(p, "\r\n")) {
    p += 2;
    if (strncasecmp(p, "content-length:", 15) == 0) body = strtoul(p + 15, NULL, 10);
  }
  if (c->in_len < head + body) return 0;
  *status = atoi(c->in + 9);
  return head + body;
}

/* Blocking GET on a connection of its own: the body, malloc'd. */
static char *fetch(const char *path) {
  int fd = dial();
  if (fd < 0) return NULL;
  char req[256];
  int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: ebb\r\nConnection: close\r\n\r\n", path);
  if (write(fd, req, (size_t)n) != n) {
    close(fd);
    return NULL;
  }
  size_t cap = 1 << 16, len = 0;
  char *buf = malloc(cap + 1);
  ssize_t r;
  while (buf && (r = read(fd, buf + len, cap - len)) > 0) {
    len += (size_t)r;
    if (len == cap) {
      char *p = realloc(buf, cap * 2 + 1);
      if (p == NULL) break;
      buf = p;
      cap *= 2;
    }
  }
  close(fd);
  if (buf) buf[len] = '\0';
  return buf;
}

static double metric(const char *text, const char *name) {
  size_t n = strlen(name);
  for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
    if (strncmp(p, name, n) == 0 && p[n] == ' ') return strtod(p + n + 1, NULL);
  return 0;
}

typedef struct probe {
  double write_bytes, batches, batch_sum, events, cpu_s;
} probe;

static void take_probe(probe *p) {
  memset(p, 0, sizeof *p);
  if (opt.pid <= 0) return;
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/io", opt.pid);
  FILE *f = fopen(path, "r");
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, "write_bytes:", 12) == 0) p->write_bytes = strtod(line + 12, NULL);
  if (f) fclose(f);
  /* utime and stime, all threads: fields 14 and 15, after the ")" of the name. */
  snprintf(path, sizeof path, "/proc/%d/stat", opt.pid);
  char stat[1024];
  f = fopen(path, "r");
  size_t n = f ? fread(stat, 1, sizeof stat - 1, f) : 0;
  if (f) fclose(f);
  stat[n] = '\0';
  char *q = strrchr(stat, ')');
  unsigned long long ut = 0, st = 0;
  if (q && sscanf(q + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) == 2)
    p->cpu_s = (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
  char *m = fetch("/metrics");
  if (m) {
    p->batches = metric(m, "ebb_commit_batch_size_count");
    p->batch_sum = metric(m, "ebb_commit_batch_size_sum");
    p->events = metric(m, "ebb_events_appended_total");
  }
  free(m);
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

static void record(uint32_t us) {
  if (n_lat == cap_lat) {
    cap_lat = cap_lat ? cap_lat * 2 : 1 << 16;
    uint32_t *p = realloc(lat, cap_lat * sizeof *p);
    if (p == NULL) {
      fprintf(stderr, "loadgen: out of memory\n");
      exit(1);
    }
    lat = p;
  }
  lat[n_lat++] = us;
}

static int send_some(conn *c) {
  while (c->out_off < c->out_len) {
    ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
    if (w < 0 && errno == EAGAIN) return 0;
    if (w <= 0) return -1;
    c->out_off += (size_t)w;
  }
  return 0;
}

/* Runs every connection until `until` (ns) or, preloading, until every
 * account is opened. Returns the requests answered. */
static uint64_t drive(conn *cs, int preload, uint64_t until, int timed) {
  int ep = epoll_create1(0);
  int active = 0;
  uint64_t done = 0;
  for (int i = 0; i < opt.conns; i++) {
    conn *c = &cs[i];
    c->n = 0;
    c->in_len = 0;
    long per = (opt.accounts - c->idx + opt.conns - 1) / opt.conns;
    if (preload && per <= 0) continue;
    next_request(c, preload);
    c->t0 = now_ns();
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    active++;
  }
  struct epoll_event evs[256];
  paced_start = now_ns();
  paced_sent = 0;
  while (active > 0) {
    int n = epoll_wait(ep, evs, 256, opt.rate > 0 && !preload ? 1 : 100);
    uint64_t t = now_ns();
    if (!preload && t >= until) break;
    for (int i = 0; i < opt.conns && opt.rate > 0 && !preload; i++) {
      conn *c = &cs[i];
      if (c->fd < 0 || !c->waiting || !may_send(t)) continue;
      c->waiting = 0;
      next_request(c, preload);
      c->t0 = t;
      if (send_some(c) != 0) {
        errors++;
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
        active--;
      }
    }
    for (int e = 0; e < n; e++) {
      conn *c = evs[e].data.ptr;
      if (c->fd < 0) continue;
      if (send_some(c) != 0) goto broken;
      for (;;) {
        ssize_t r = read(c->fd, c->in + c->in_len, sizeof c->in - 1 - c->in_len);
        if (r < 0 && errno == EAGAIN) break;
        if (r <= 0) goto broken;
        c->in_len += (size_t)r;
        int status;
        size_t len = complete(c, &status);
        if (len == 0) {
          if (c->in_len >= sizeof c->in - 1) goto broken;
          continue;
        }
        t = now_ns();
        if (status != 200) {
          if (non200++ == 0)
            snprintf(first_error, sizeof first_error, "%d %.200s", status,
                     strstr(c->in, "\r\n\r\n") + 4);
        } else if (c->key >= 0) {
          versions[c->key]++;
        }
        if (timed) record((uint32_t)((t - c->t0) / 1000));
        done++;
        memmove(c->in, c->in + len, c->in_len - len);
        c->in_len -= len;
        long per = (opt.accounts - c->idx + opt.conns - 1) / opt.conns;
        if (preload && (long)c->n >= per) {
          epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
          active--;
          break;
        }
        if (!preload && t >= until) break;
        if (!preload && !may_send(t)) {
          c->waiting = 1;
          break;
        }
        next_request(c, preload);
        c->t0 = t;
        if (send_some(c) != 0) goto broken;
      }
      continue;
    broken:
      if (errors++ == 0) snprintf(first_error, sizeof first_error, "connection %d lost", c->idx);
      epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
      close(c->fd);
      c->fd = -1;
      active--;
    }
  }
  close(ep);
  return done;
}

static void usage(void) {
  fprintf(stderr,
          "usage: ebb-loadgen --port P [--host 127.0.0.1] [--mode health|open|deposit|append|orders]\n"
          "         [--connections 64] [--seconds 10] [--accounts 10000] [--run TAG] [--pid DAEMON_PID]\n"
          "         [--rate REQUESTS_PER_S] [--on-timed SHELL_COMMAND]\n"
          "prints: RESULT requests rps p50_ms p99_ms non200 errors cpu_s cpu_pct\n"
          "        [write_bytes bytes_per_event batch events daemon_cpu_pct daemon_us_per_req]\n"
          "        (with --pid; daemon CPU from /proc/PID/stat, all threads)\n");
  exit(2);
}

int main(int argc, char **argv) {
  static const char *const modes[] = {"health", "open", "deposit", "append", "orders"};
  snprintf(opt.run, sizeof opt.run, "%ld", (long)time(NULL));
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (v == NULL) usage();
    i++;
    if (!strcmp(a, "--host")) opt.host = v;
    else if (!strcmp(a, "--port")) opt.port = atoi(v);
    else if (!strcmp(a, "--connections") || !strcmp(a, "-c")) opt.conns = atoi(v);
    else if (!strcmp(a, "--seconds") || !strcmp(a, "-d")) opt.seconds = atof(v);
    else if (!strcmp(a, "--accounts")) opt.accounts = atol(v);
    else if (!strcmp(a, "--run")) snprintf(opt.run, sizeof opt.run, "%s", v);
    else if (!strcmp(a, "--pid")) opt.pid = atoi(v);
    else if (!strcmp(a, "--rate")) opt.rate = atof(v);
    else if (!strcmp(a, "--on-timed")) opt.on_timed = v;
    else if (!strcmp(a, "--mode")) {
      opt.mode = -1;
      for (int m = 0; m < 5; m++)
        if (!strcmp(v, modes[m])) opt.mode = m;
      if (opt.mode < 0) usage();
    } else usage();
  }
  if (opt.port <= 0 || opt.conns < 1 || opt.seconds <= 0 || opt.accounts < opt.conns) usage();
  versions = calloc((size_t)opt.accounts, sizeof *versions);
  conn *cs = calloc((size_t)opt.conns, sizeof *cs);
  if (versions == NULL || cs == NULL) return 1;
  for (int i = 0; i < opt.conns; i++) {
    cs[i].idx = i;
    if ((cs[i].fd = dial()) < 0) {
      fprintf(stderr, "loadgen: cannot connect to %s:%d: %s\n", opt.host, opt.port, strerror(errno));
      return 1;
    }
    fcntl(cs[i].fd, F_SETFL, fcntl(cs[i].fd, F_GETFL) | O_NONBLOCK);
  }
  if (opt.mode == M_DEPOSIT) {
    drive(cs, 1, 0, 0);
    if (non200 || errors) {
      fprintf(stderr, "loadgen: opening the accounts failed: %s\n", first_error);
      return 1;
    }
  }
  /* scripts/bench_instr zeroes the daemon's callgrind counters here, so
   * they cover the timed part and not the accounts' opening. */
  if (opt.on_timed && system(opt.on_timed) != 0) {
    fprintf(stderr, "loadgen: --on-timed command failed: %s\n", opt.on_timed);
    return 1;
  }
  probe p0, p1;
  take_probe(&p0);
  double cpu0 = cpu_seconds();
  uint64_t t0 = now_ns();
  uint64_t done = drive(cs, 0, t0 + (uint64_t)(opt.seconds * 1e9), 1);
  double secs = (double)(now_ns() - t0) / 1e9;
  double cpu = cpu_seconds() - cpu0;
  /* Answers still in flight are not counted; they must land before the
   * probe, or their bytes would be counted without their events. */
  for (int i = 0; i < opt.conns; i++)
    if (cs[i].fd >= 0) close(cs[i].fd);
  usleep(200000);
  take_probe(&p1);
  qsort(lat, n_lat, sizeof *lat, cmp_u32);
  double p50 = n_lat ? lat[n_lat / 2] / 1000.0 : 0, p99 = n_lat ? lat[n_lat * 99 / 100] / 1000.0 : 0;
  printf("RESULT requests=%llu seconds=%.3f rps=%.0f p50_ms=%.2f p99_ms=%.2f non200=%llu errors=%llu "
         "cpu_s=%.2f cpu_pct=%.0f",
         (unsigned long long)done, secs, done / secs, p50, p99, (unsigned long long)non200,
         (unsigned long long)errors, cpu, 100 * cpu / secs);
  if (opt.pid > 0) {
    double ev = p1.events - p0.events, b = p1.batches - p0.batches;
    printf(" write_bytes=%.0f bytes_per_event=%.0f batch=%.1f events=%.0f daemon_cpu_pct=%.0f "
           "daemon_us_per_req=%.1f",
           p1.write_bytes - p0.write_bytes, ev > 0 ? (p1.write_bytes - p0.write_bytes) / ev : 0,
           b > 0 ? (p1.batch_sum - p0.batch_sum) / b : 0, ev, 100 * (p1.cpu_s - p0.cpu_s) / secs,
           done ? 1e6 * (p1.cpu_s - p0.cpu_s) / (double)done : 0);
  }
  printf("\n");
  if (non200 || errors) fprintf(stderr, "loadgen: first failure: %s\n", first_error);
  free(lat);
  free(versions);
  free(cs);
  return 0;
}
