/*
 * fault_vfs.c: a TEST-ONLY SQLite VFS that simulates power loss and storage
 * faults, for scripts/torture and the storage fault specs. It is compiled
 * into ebb but inert: it is registered only when the environment variable
 * EBB_TEST_FAULTS is set, and then it becomes the process's default VFS (so
 * the event store and the projection databases both go through it, under
 * the timing VFS of sync_vfs.c). Never set EBB_TEST_FAULTS in production.
 *
 * Power loss. Every write goes through to the real file, but before a page
 * (4 KiB of the file) is first written after the file's last sync, its
 * synced content is saved, so the VFS always knows what the disk would hold
 * had the power gone: the synced bytes. A power cut (cut_after_syncs=N: at
 * the Nth sync, before it; cut_after_writes=N: at the Nth write, before it)
 * puts every unsynced page back to its synced content ("drop"), or, with
 * torn=1, keeps a random subset of them, which is what reordered, partly
 * persisted writes leave (SQLite's own crash tests do the same); the files
 * get their synced sizes back; the WAL index (-shm, never synced) is
 * emptied; and the process dies at once (_exit(EBB_FAULT_EXIT)). While a
 * cut is armed the real fsyncs are skipped: the VFS itself decides what
 * survives, and the tests run faster.
 *
 * Storage faults. enospc_after_writes=N: the Nth write and every one after
 * fail with SQLITE_FULL (disk full). eio_after_syncs=N: the Nth sync and
 * every one after fail with SQLITE_IOERR_FSYNC, and, as Linux does after a
 * failed fsync, the unsynced pages are dropped (put back) and the file is
 * then "clean": a retried fsync would succeed with the data gone (the 2018
 * PostgreSQL "fsyncgate" lesson). toggle=PATH: while PATH exists and holds
 * "enospc", writes fail with SQLITE_FULL; holding "eio", syncs fail as
 * above. seed=S seeds the random choices.
 *
 * Every method of a tracked file runs under one mutex, so a cut sees a
 * consistent record and no thread writes while it is being made.
 */
#include <fcntl.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "store.h"

#define PG 4096
#define EBB_FAULT_EXIT 86

typedef struct saved_page {
  int64_t pgno;
  int len; /* bytes of the page that existed at the last sync (the rest was not there) */
  unsigned char *data;
} saved_page;

/* What must be undone for one file path at a cut; outlives the open file. */
typedef struct tracked {
  char *path;
  int is_main_db;
  int64_t synced_size;
  saved_page *pages;
  size_t n, cap;
  int open_count;
  struct tracked *next;
} tracked;

typedef struct fault_file {
  sqlite3_file base;
  sqlite3_file *real;
  tracked *t; /* NULL: not tracked (temporary files) */
} fault_file;

static struct {
  long long cut_after_syncs, cut_after_writes, enospc_after_writes, eio_after_syncs;
  int torn;
  char toggle[1024];
  unsigned long long rng;
  long long syncs, writes;
  tracked *files;
  pthread_mutex_t mu;
} F = {.mu = PTHREAD_MUTEX_INITIALIZER};

static sqlite3_vfs fault_vfs;
static sqlite3_io_methods fault_methods;
static pthread_once_t once = PTHREAD_ONCE_INIT;

#define REAL(f) (((fault_file *)(f))->real)

static unsigned long long next_random(void) {
  F.rng ^= F.rng << 13;
  F.rng ^= F.rng >> 7;
  F.rng ^= F.rng << 17;
  return F.rng;
}

/* "enospc", "eio" or "" from the toggle file. */
static void toggle_state(char *out, size_t size) {
  out[0] = '\0';
  if (!F.toggle[0]) return;
  FILE *f = fopen(F.toggle, "r");
  if (!f) return;
  if (fgets(out, (int)size, f) == NULL) out[0] = '\0';
  fclose(f);
  out[strcspn(out, " \r\n")] = '\0';
}

static saved_page *find_page(tracked *t, int64_t pgno) {
  for (size_t i = 0; i < t->n; i++)
    if (t->pages[i].pgno == pgno) return &t->pages[i];
  return NULL;
}

/* Saves the synced content of page pgno, if not saved since the last sync. */
static int save_page(tracked *t, sqlite3_file *real, int64_t pgno) {
  if (find_page(t, pgno)) return SQLITE_OK;
  if (t->n == t->cap) {
    size_t cap = t->cap ? t->cap * 2 : 64;
    saved_page *p = realloc(t->pages, cap * sizeof *p);
    if (!p) return SQLITE_NOMEM;
    t->pages = p;
    t->cap = cap;
  }
  unsigned char *data = calloc(1, PG);
  if (!data) return SQLITE_NOMEM;
  sqlite3_int64 size = 0;
  real->pMethods->xFileSize(real, &size);
  int64_t off = pgno * PG;
  int len = size <= off ? 0 : size - off >= PG ? PG : (int)(size - off);
  if (len > 0) {
    int rc = real->pMethods->xRead(real, data, len, off);
    if (rc != SQLITE_OK && rc != SQLITE_IOERR_SHORT_READ) {
      free(data);
      return rc;
    }
  }
  t->pages[t->n++] = (saved_page){.pgno = pgno, .len = len, .data = data};
  return SQLITE_OK;
}

static void forget_pages(tracked *t) {
  for (size_t i = 0; i < t->n; i++) free(t->pages[i].data);
  t->n = 0;
}

/* Puts the file back to what was synced: every saved page (torn: a random
 * subset of them) gets its synced bytes back, and the file its synced size
 * (or, torn, the end of the last page kept). */
static void undo_file(tracked *t, int torn) {
  int fd = open(t->path, O_WRONLY);
  if (fd < 0) {
    forget_pages(t);
    return;
  }
  int64_t size = t->synced_size;
  int64_t now_size = lseek(fd, 0, SEEK_END);
  for (size_t i = 0; i < t->n; i++) {
    saved_page *p = &t->pages[i];
    if (torn && (next_random() & 1)) {
      int64_t end = p->pgno * PG + PG;
      if (end > now_size) end = now_size;
      if (end > size) size = end;
      continue;
    }
    static const unsigned char zeros[PG];
    ssize_t w = pwrite(fd, p->len ? p->data : zeros, PG, p->pgno * PG);
    (void)w;
  }
  if (ftruncate(fd, size) != 0) { /* nothing more can be done: the process dies next */
  }
  close(fd);
  forget_pages(t);
}

static tracked *track(const char *path, int is_main_db, sqlite3_file *real) {
  for (tracked *t = F.files; t; t = t->next)
    if (strcmp(t->path, path) == 0) {
      t->open_count++;
      return t;
    }
  tracked *t = calloc(1, sizeof *t);
  if (!t || !(t->path = strdup(path))) {
    free(t);
    return NULL;
  }
  t->is_main_db = is_main_db;
  sqlite3_int64 size = 0;
  real->pMethods->xFileSize(real, &size);
  t->synced_size = size;
  t->open_count = 1;
  t->next = F.files;
  F.files = t;
  return t;
}

/* The power cut: what was not synced goes, the WAL index goes, the process goes. */
static void power_cut(void) {
  for (tracked *t = F.files; t; t = t->next) {
    undo_file(t, F.torn);
    if (t->is_main_db) {
      char shm[4200];
      snprintf(shm, sizeof shm, "%s-shm", t->path);
      if (truncate(shm, 0) != 0) { /* no -shm: nothing to lose */
      }
    }
  }
  static const char msg[] = "ebb: EBB_TEST_FAULTS: simulated power cut\n";
  ssize_t w = write(2, msg, sizeof msg - 1);
  (void)w;
  _exit(EBB_FAULT_EXIT);
}

static int f_close(sqlite3_file *f) {
  fault_file *ff = (fault_file *)f;
  pthread_mutex_lock(&F.mu);
  if (ff->t) ff->t->open_count--; /* its unsynced pages stay recorded: a cut still undoes them */
  pthread_mutex_unlock(&F.mu);
  return REAL(f)->pMethods ? REAL(f)->pMethods->xClose(REAL(f)) : SQLITE_OK;
}
static int f_read(sqlite3_file *f, void *p, int n, sqlite3_int64 off) {
  pthread_mutex_lock(&F.mu);
  int rc = REAL(f)->pMethods->xRead(REAL(f), p, n, off);
  pthread_mutex_unlock(&F.mu);
  return rc;
}
static int f_write(sqlite3_file *f, const void *p, int n, sqlite3_int64 off) {
  fault_file *ff = (fault_file *)f;
  pthread_mutex_lock(&F.mu);
  int rc = SQLITE_OK;
  char tog[32];
  F.writes++;
  if (F.cut_after_writes && F.writes >= F.cut_after_writes) power_cut();
  toggle_state(tog, sizeof tog);
  if ((F.enospc_after_writes && F.writes >= F.enospc_after_writes) || !strcmp(tog, "enospc")) {
    rc = SQLITE_FULL;
    goto out;
  }
  if (ff->t)
    for (int64_t pg = off / PG; pg <= (off + n - 1) / PG && rc == SQLITE_OK; pg++)
      rc = save_page(ff->t, REAL(f), pg);
  if (rc == SQLITE_OK) rc = REAL(f)->pMethods->xWrite(REAL(f), p, n, off);
out:
  pthread_mutex_unlock(&F.mu);
  return rc;
}
static int f_truncate(sqlite3_file *f, sqlite3_int64 size) {
  fault_file *ff = (fault_file *)f;
  pthread_mutex_lock(&F.mu);
  int rc = SQLITE_OK;
  if (ff->t) {
    sqlite3_int64 now = 0;
    REAL(f)->pMethods->xFileSize(REAL(f), &now);
    for (int64_t pg = size / PG; pg * PG < now && rc == SQLITE_OK; pg++)
      rc = save_page(ff->t, REAL(f), pg);
  }
  if (rc == SQLITE_OK) rc = REAL(f)->pMethods->xTruncate(REAL(f), size);
  pthread_mutex_unlock(&F.mu);
  return rc;
}
static int f_sync(sqlite3_file *f, int flags) {
  fault_file *ff = (fault_file *)f;
  pthread_mutex_lock(&F.mu);
  int rc = SQLITE_OK;
  char tog[32];
  F.syncs++;
  if (F.cut_after_syncs && F.syncs >= F.cut_after_syncs) power_cut();
  toggle_state(tog, sizeof tog);
  if ((F.eio_after_syncs && F.syncs >= F.eio_after_syncs) || !strcmp(tog, "eio")) {
    /* The kernel reports the error once and forgets the pages it could not write. */
    if (ff->t) undo_file(ff->t, 0);
    rc = SQLITE_IOERR_FSYNC;
    goto out;
  }
  if (!F.cut_after_syncs && !F.cut_after_writes) rc = REAL(f)->pMethods->xSync(REAL(f), flags);
  if (rc == SQLITE_OK && ff->t) {
    sqlite3_int64 size = 0;
    REAL(f)->pMethods->xFileSize(REAL(f), &size);
    ff->t->synced_size = size;
    forget_pages(ff->t);
  }
out:
  pthread_mutex_unlock(&F.mu);
  return rc;
}
static int f_size(sqlite3_file *f, sqlite3_int64 *size) {
  return REAL(f)->pMethods->xFileSize(REAL(f), size);
}
static int f_lock(sqlite3_file *f, int l) { return REAL(f)->pMethods->xLock(REAL(f), l); }
static int f_unlock(sqlite3_file *f, int l) { return REAL(f)->pMethods->xUnlock(REAL(f), l); }
static int f_check(sqlite3_file *f, int *out) {
  return REAL(f)->pMethods->xCheckReservedLock(REAL(f), out);
}
static int f_fcntl(sqlite3_file *f, int op, void *arg) {
  return REAL(f)->pMethods->xFileControl(REAL(f), op, arg);
}
static int f_sector(sqlite3_file *f) { return REAL(f)->pMethods->xSectorSize(REAL(f)); }
static int f_chars(sqlite3_file *f) { return REAL(f)->pMethods->xDeviceCharacteristics(REAL(f)); }
static int f_shmmap(sqlite3_file *f, int i, int sz, int ext, void volatile **pp) {
  return REAL(f)->pMethods->xShmMap(REAL(f), i, sz, ext, pp);
}
static int f_shmlock(sqlite3_file *f, int off, int n, int flags) {
  return REAL(f)->pMethods->xShmLock(REAL(f), off, n, flags);
}
static void f_shmbarrier(sqlite3_file *f) { REAL(f)->pMethods->xShmBarrier(REAL(f)); }
static int f_shmunmap(sqlite3_file *f, int del) {
  return REAL(f)->pMethods->xShmUnmap(REAL(f), del);
}

static int f_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags, int *out) {
  sqlite3_vfs *real_vfs = vfs->pAppData;
  fault_file *ff = (fault_file *)f;
  ff->real = (sqlite3_file *)(ff + 1);
  ff->t = NULL;
  memset(ff->real, 0, (size_t)real_vfs->szOsFile);
  int rc = real_vfs->xOpen(real_vfs, name, ff->real, flags, out);
  if (ff->real->pMethods == NULL) {
    f->pMethods = NULL;
    return rc;
  }
  f->pMethods = &fault_methods;
  if (rc == SQLITE_OK && name &&
      (flags & (SQLITE_OPEN_MAIN_DB | SQLITE_OPEN_WAL | SQLITE_OPEN_MAIN_JOURNAL))) {
    pthread_mutex_lock(&F.mu);
    ff->t = track(name, (flags & SQLITE_OPEN_MAIN_DB) != 0, ff->real);
    pthread_mutex_unlock(&F.mu);
  }
  return rc;
}

static int v_delete(sqlite3_vfs *vfs, const char *name, int sync_dir) {
  sqlite3_vfs *r = vfs->pAppData;
  pthread_mutex_lock(&F.mu);
  for (tracked *t = F.files; t; t = t->next)
    if (strcmp(t->path, name) == 0) {
      forget_pages(t);
      t->synced_size = 0;
    }
  pthread_mutex_unlock(&F.mu);
  return r->xDelete(r, name, sync_dir);
}

#define FORWARD(name, sig, args)                  \
  static int v_##name sig {                       \
    sqlite3_vfs *r = vfs->pAppData;               \
    return r->name args;                          \
  }
FORWARD(xAccess, (sqlite3_vfs * vfs, const char *n, int f, int *o), (r, n, f, o))
FORWARD(xFullPathname, (sqlite3_vfs * vfs, const char *n, int l, char *o), (r, n, l, o))
FORWARD(xRandomness, (sqlite3_vfs * vfs, int n, char *o), (r, n, o))
FORWARD(xSleep, (sqlite3_vfs * vfs, int us), (r, us))
FORWARD(xCurrentTime, (sqlite3_vfs * vfs, double *t), (r, t))
FORWARD(xGetLastError, (sqlite3_vfs * vfs, int n, char *o), (r, n, o))
FORWARD(xCurrentTimeInt64, (sqlite3_vfs * vfs, sqlite3_int64 *t), (r, t))

static void *v_dlopen(sqlite3_vfs *vfs, const char *n) {
  sqlite3_vfs *r = vfs->pAppData;
  return r->xDlOpen(r, n);
}
static void v_dlerror(sqlite3_vfs *vfs, int n, char *o) {
  sqlite3_vfs *r = vfs->pAppData;
  r->xDlError(r, n, o);
}
static void (*v_dlsym(sqlite3_vfs *vfs, void *h, const char *s))(void) {
  sqlite3_vfs *r = vfs->pAppData;
  return r->xDlSym(r, h, s);
}
static void v_dlclose(sqlite3_vfs *vfs, void *h) {
  sqlite3_vfs *r = vfs->pAppData;
  r->xDlClose(r, h);
}

static long long setting(const char *spec, const char *key) {
  size_t n = strlen(key);
  for (const char *p = spec; p && *p;) {
    if (strncmp(p, key, n) == 0 && p[n] == '=') return strtoll(p + n + 1, NULL, 10);
    p = strchr(p, ',');
    if (p) p++;
  }
  return 0;
}

static void install(void) {
  const char *spec = getenv("EBB_TEST_FAULTS");
  if (spec == NULL || !*spec) return;
  sqlite3_vfs *real = sqlite3_vfs_find(NULL);
  if (real == NULL) return;
  F.cut_after_syncs = setting(spec, "cut_after_syncs");
  F.cut_after_writes = setting(spec, "cut_after_writes");
  F.enospc_after_writes = setting(spec, "enospc_after_writes");
  F.eio_after_syncs = setting(spec, "eio_after_syncs");
  F.torn = setting(spec, "torn") != 0;
  F.rng = (unsigned long long)setting(spec, "seed") * 2654435761u + 88172645463325252ull;
  const char *tog = strstr(spec, "toggle=");
  if (tog) {
    tog += 7;
    size_t len = strcspn(tog, ",");
    if (len >= sizeof F.toggle) len = sizeof F.toggle - 1;
    memcpy(F.toggle, tog, len);
    F.toggle[len] = '\0';
  }
  fault_methods = (sqlite3_io_methods){
      .iVersion = 2, .xClose = f_close, .xRead = f_read, .xWrite = f_write,
      .xTruncate = f_truncate, .xSync = f_sync, .xFileSize = f_size, .xLock = f_lock,
      .xUnlock = f_unlock, .xCheckReservedLock = f_check, .xFileControl = f_fcntl,
      .xSectorSize = f_sector, .xDeviceCharacteristics = f_chars, .xShmMap = f_shmmap,
      .xShmLock = f_shmlock, .xShmBarrier = f_shmbarrier, .xShmUnmap = f_shmunmap};
  fault_vfs = (sqlite3_vfs){
      .iVersion = real->iVersion < 2 ? real->iVersion : 2,
      .szOsFile = (int)sizeof(fault_file) + real->szOsFile,
      .mxPathname = real->mxPathname,
      .zName = "ebb-test-faults",
      .pAppData = real,
      .xOpen = f_open,
      .xDelete = v_delete,
      .xAccess = v_xAccess,
      .xFullPathname = v_xFullPathname,
      .xDlOpen = v_dlopen,
      .xDlError = v_dlerror,
      .xDlSym = v_dlsym,
      .xDlClose = v_dlclose,
      .xRandomness = v_xRandomness,
      .xSleep = v_xSleep,
      .xCurrentTime = v_xCurrentTime,
      .xGetLastError = v_xGetLastError,
      .xCurrentTimeInt64 = v_xCurrentTimeInt64,
  };
  sqlite3_vfs_register(&fault_vfs, 1); /* the default: projection databases use it too */
}

void ebb__fault_vfs_install(void) {
  pthread_once(&once, install);
}
