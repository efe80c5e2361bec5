/*
 * lock.c: the daemon lock of a data directory (see lock.h).
 *
 * The holder line is read back only to word messages, so its reader is a
 * small tolerant scan of one flat JSON object for "pid", "url" and
 * "started_at", not a full JSON parser: anything it does not understand just
 * makes the message vaguer ("another process"). Values that would not print
 * cleanly on a terminal (control characters, escapes, non-ASCII) are
 * dropped rather than echoed.
 */
#include "lock.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

/* A holder line longer than this is not one ebb wrote. */
#define MAX_LINE 4096

/* How long acquire keeps trying while the lock is taken. A probe holds a
 * shared lock for a few microseconds; a daemon holds it for good, so a short
 * wait tells the two apart without a visible delay. */
#define ACQUIRE_TRIES 20
#define ACQUIRE_PAUSE_NS 5000000L

struct ebb_lock {
  int fd;
};

/* ---------------------------------------------------------------- file */

static char *lock_path(const char *data_dir) {
  size_t n = strlen(data_dir) + sizeof "/" EBB_LOCK_FILE;
  char *p = malloc(n);
  if (p) snprintf(p, n, "%s/%s", data_dir, EBB_LOCK_FILE);
  return p;
}

static int flock_nb(int fd, int op) {
  int rc;
  do rc = flock(fd, op | LOCK_NB);
  while (rc != 0 && errno == EINTR);
  return rc;
}

/* The first line of the file, malloc'd ("" for an empty file); NULL on a
 * read error or out of memory, with errno set. */
static char *read_line(int fd) {
  char *s = malloc(MAX_LINE + 1);
  if (s == NULL) return NULL;
  size_t n = 0;
  while (n < MAX_LINE) {
    ssize_t r = pread(fd, s + n, MAX_LINE - n, (off_t)n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      int e = errno;
      free(s);
      errno = e;
      return NULL;
    }
    if (r == 0) break;
    n += (size_t)r;
  }
  s[n] = '\0';
  char *nl = memchr(s, '\n', n);
  if (nl) *nl = '\0';
  return s;
}

static int pwrite_all(int fd, const char *p, size_t n, off_t off) {
  while (n > 0) {
    ssize_t w = pwrite(fd, p, n, off);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return -1;
    p += w;
    n -= (size_t)w;
    off += w;
  }
  return 0;
}

/* Writes the new line before truncating, so a reader never sees an empty
 * file while a holder is merely updating its line (at worst it sees the new
 * line followed by the old one's tail, after the newline it ignores). */
static int write_line(int fd, const char *json, ebb_error *err) {
  size_t n = strlen(json);
  if (memchr(json, '\n', n) || memchr(json, '\r', n))
    return ebb_error_set(err, EBB_EBADREQ, "the lock holder line must be one line of JSON");
  if (pwrite_all(fd, json, n, 0) != 0 || pwrite_all(fd, "\n", 1, (off_t)n) != 0 ||
      ftruncate(fd, (off_t)n + 1) != 0)
    return ebb_error_set(err, EBB_ESTORE, "cannot write the lock file: %s", strerror(errno));
  return 0;
}

/* ---------------------------------------------------------------- holder line */

typedef struct holder {
  long pid;        /* 0: unknown */
  char url[256];   /* "": unknown */
  char since[64];  /* "": unknown */
} holder_info;

static const char *skip_ws(const char *p) {
  while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n') p++;
  return p;
}

/* p at a '"'. Returns the position after the closing quote, or NULL when the
 * string is malformed. Copies the value into out (when not NULL) if it is
 * printable ASCII without escapes other than \" \\ \/ and fits; otherwise
 * out is left "". */
static const char *scan_string(const char *p, char *out, size_t cap) {
  size_t n = 0;
  int clean = out != NULL;
  for (p++;; p++) {
    unsigned char c = (unsigned char)*p;
    if (c == '\0') return NULL;
    if (c == '"') break;
    if (c == '\\') {
      c = (unsigned char)*++p;
      if (c == '\0') return NULL;
      if (c != '"' && c != '\\' && c != '/') clean = 0;
    } else if (c < 0x20 || c > 0x7e) {
      clean = 0;
    }
    if (clean && n + 1 < cap) out[n++] = (char)c;
    else clean = 0;
  }
  if (out) out[clean ? n : 0] = '\0';
  return p + 1;
}

/* Skips one JSON value of any kind; NULL when malformed. */
static const char *skip_value(const char *p) {
  if (*p == '"') return scan_string(p, NULL, 0);
  if (*p == '{' || *p == '[') {
    int depth = 0;
    do {
      if (*p == '"') {
        p = scan_string(p, NULL, 0);
        if (p == NULL) return NULL;
        continue;
      }
      if (*p == '\0') return NULL;
      if (*p == '{' || *p == '[') depth++;
      else if (*p == '}' || *p == ']') depth--;
      p++;
    } while (depth > 0);
    return p;
  }
  const char *start = p;
  while ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z') || *p == '-' || *p == '+' ||
         *p == '.' || *p == 'E')
    p++;
  return p == start ? NULL : p;
}

static const char *scan_pid(const char *p, long *pid) {
  long v = 0;
  const char *start = p;
  while (*p >= '0' && *p <= '9') {
    if (v > 100000000L) return NULL; /* far above any pid_max */
    v = v * 10 + (*p++ - '0');
  }
  if (p == start || v <= 0) return NULL;
  *pid = v;
  return p;
}

/* 0 when json is an object with a positive integer "pid"; -1 otherwise. */
static int parse_holder(const char *json, holder_info *h) {
  memset(h, 0, sizeof *h);
  if (json == NULL) return -1;
  const char *p = skip_ws(json);
  if (*p++ != '{') return -1;
  p = skip_ws(p);
  if (*p == '}') return -1;
  for (;;) {
    char key[16];
    if (*p != '"' || (p = scan_string(p, key, sizeof key)) == NULL) return -1;
    p = skip_ws(p);
    if (*p++ != ':') return -1;
    p = skip_ws(p);
    const char *next;
    if (strcmp(key, "pid") == 0 && *p >= '0' && *p <= '9') next = scan_pid(p, &h->pid);
    else if (strcmp(key, "url") == 0 && *p == '"') next = scan_string(p, h->url, sizeof h->url);
    else if (strcmp(key, "started_at") == 0 && *p == '"')
      next = scan_string(p, h->since, sizeof h->since);
    else next = skip_value(p);
    if (next == NULL) return -1;
    p = skip_ws(next);
    if (*p == '}') break;
    if (*p++ != ',') return -1;
    p = skip_ws(p);
  }
  return h->pid > 0 ? 0 : -1;
}

/* with_stop: the daemon is in the way of the caller (it wants the lock
 * itself), so stopping the daemon is offered first. */
static void describe(const char *data_dir, const char *json, int with_stop, char *buf,
                     size_t len) {
  holder_info h;
  if (len == 0) return;
  if (parse_holder(json, &h) != 0) {
    snprintf(buf, len, "data directory %s is held by another process", data_dir);
    return;
  }
  char who[512];
  int n = snprintf(who, sizeof who, "ebb serve (pid %ld", h.pid);
  if (h.url[0] && n > 0 && (size_t)n < sizeof who)
    n += snprintf(who + n, sizeof who - (size_t)n, ", %s", h.url);
  if (h.since[0] && n > 0 && (size_t)n < sizeof who)
    snprintf(who + n, sizeof who - (size_t)n, ", since %s", h.since);
  if (h.url[0] && with_stop)
    snprintf(buf, len,
             "data directory %s is held by %s): stop it, or use --url %s to go through it",
             data_dir, who, h.url);
  else if (h.url[0])
    snprintf(buf, len, "data directory %s is held by %s): use --url %s to go through it", data_dir,
             who, h.url);
  else if (with_stop)
    snprintf(buf, len, "data directory %s is held by %s): stop it", data_dir, who);
  else
    snprintf(buf, len, "data directory %s is held by %s), which is not listening yet: try again",
             data_dir, who);
}

void ebb_lock_describe(const char *data_dir, const char *holder_json, char *buf, size_t len) {
  describe(data_dir, holder_json, 0, buf, len);
}

/* ---------------------------------------------------------------- lock */

int ebb_lock_acquire(ebb_lock **out, const char *data_dir, const char *holder_json,
                     ebb_error *err) {
  *out = NULL;
  ebb_lock *l = malloc(sizeof *l);
  char *path = lock_path(data_dir);
  if (l == NULL || path == NULL) {
    free(l);
    free(path);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  }
  l->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (l->fd < 0) {
    int e = errno;
    free(l);
    free(path);
    if (e == ENOENT || e == ENOTDIR)
      return ebb_error_set(err, EBB_ESTORE, "data directory %s does not exist", data_dir);
    return ebb_error_set(err, EBB_ESTORE, "cannot open %s/%s: %s", data_dir, EBB_LOCK_FILE,
                         strerror(e));
  }
  free(path);
  int rc;
  for (int i = 0; (rc = flock_nb(l->fd, LOCK_EX)) != 0 && errno == EWOULDBLOCK; i++) {
    if (i + 1 == ACQUIRE_TRIES) break;
    struct timespec pause = {0, ACQUIRE_PAUSE_NS};
    nanosleep(&pause, NULL);
  }
  if (rc != 0) {
    int e = errno;
    if (e == EWOULDBLOCK) {
      char *line = read_line(l->fd);
      char msg[sizeof err->message];
      describe(data_dir, line, 1, msg, sizeof msg);
      free(line);
      close(l->fd);
      free(l);
      return ebb_error_set(err, EBB_EBUSY, "%s", msg);
    }
    close(l->fd);
    free(l);
    return ebb_error_set(err, EBB_ESTORE, "cannot lock %s/%s: %s", data_dir, EBB_LOCK_FILE,
                         strerror(e));
  }
  rc = write_line(l->fd, holder_json, err);
  if (rc != 0) {
    ebb_lock_release(l);
    return rc;
  }
  *out = l;
  return 0;
}

int ebb_lock_update(ebb_lock *l, const char *holder_json, ebb_error *err) {
  return write_line(l->fd, holder_json, err);
}

void ebb_lock_release(ebb_lock *l) {
  if (l == NULL) return;
  /* Emptied while still held, so no new holder's line can be lost; failure
   * only leaves a stale line, which the lock itself makes harmless. */
  int ignored = ftruncate(l->fd, 0);
  (void)ignored;
  /* Explicit: a child forked without exec shares the open file description,
   * and close alone would leave the lock to it. */
  flock(l->fd, LOCK_UN);
  close(l->fd);
  free(l);
}

int ebb_lock_probe(const char *data_dir, char **holder, ebb_error *err) {
  if (holder) *holder = NULL;
  char *path = lock_path(data_dir);
  if (path == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  free(path);
  if (fd < 0) {
    if (errno == ENOENT || errno == ENOTDIR) return 0;
    return ebb_error_set(err, EBB_ESTORE, "cannot open %s/%s: %s", data_dir, EBB_LOCK_FILE,
                         strerror(errno));
  }
  if (flock_nb(fd, LOCK_SH) == 0) {
    flock(fd, LOCK_UN);
    close(fd);
    return 0;
  }
  if (errno != EWOULDBLOCK) {
    int e = errno;
    close(fd);
    return ebb_error_set(err, EBB_ESTORE, "cannot lock %s/%s: %s", data_dir, EBB_LOCK_FILE,
                         strerror(e));
  }
  if (holder) {
    *holder = read_line(fd);
    if (*holder == NULL) {
      int e = errno;
      close(fd);
      if (e == ENOMEM) return ebb_error_set(err, EBB_ENOMEM, "out of memory");
      return ebb_error_set(err, EBB_ESTORE, "cannot read %s/%s: %s", data_dir, EBB_LOCK_FILE,
                           strerror(e));
    }
  }
  close(fd);
  return 1;
}
