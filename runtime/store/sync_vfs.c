/*
 * sync_vfs.c: an SQLite VFS that is the default one with its fsyncs timed,
 * so that the daemon's metrics can show what durability costs.
 *
 * SQLite offers no hook around its syncs, but a VFS may wrap another: this
 * one forwards every call to the default VFS and wraps the files it opens so
 * that xSync is timed. The counters are process-wide by nature (a VFS is
 * registered for the process) and are atomics, since any thread may sync.
 * Failed syncs are counted too: after one, the writer trusts the disk no more
 * (writer.c).
 */
#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "clock.h"
#include "store_backend.h"

typedef struct timed_file {
  sqlite3_file base;      /* must be first: SQLite sees this */
  sqlite3_file *real;     /* the default VFS's file, allocated right after us */
} timed_file;

static sqlite3_vfs timed_vfs;
static sqlite3_io_methods timed_methods_v1, timed_methods_v2, timed_methods_v3;
static _Atomic uint64_t sync_count, sync_ns, sync_failures;
static pthread_once_t once = PTHREAD_ONCE_INIT;

#define REAL(f) (((timed_file *)(f))->real)

static int t_close(sqlite3_file *f) {
  return REAL(f)->pMethods ? REAL(f)->pMethods->xClose(REAL(f)) : SQLITE_OK;
}
static int t_read(sqlite3_file *f, void *p, int n, sqlite3_int64 off) {
  return REAL(f)->pMethods->xRead(REAL(f), p, n, off);
}
static int t_write(sqlite3_file *f, const void *p, int n, sqlite3_int64 off) {
  return REAL(f)->pMethods->xWrite(REAL(f), p, n, off);
}
static int t_truncate(sqlite3_file *f, sqlite3_int64 size) {
  return REAL(f)->pMethods->xTruncate(REAL(f), size);
}
static int t_sync(sqlite3_file *f, int flags) {
  uint64_t t0 = ebb_clock_mono_ns();
  int rc = REAL(f)->pMethods->xSync(REAL(f), flags);
  atomic_fetch_add(&sync_ns, ebb_clock_mono_ns() - t0);
  atomic_fetch_add(&sync_count, 1);
  if (rc != SQLITE_OK) atomic_fetch_add(&sync_failures, 1);
  return rc;
}
static int t_size(sqlite3_file *f, sqlite3_int64 *size) {
  return REAL(f)->pMethods->xFileSize(REAL(f), size);
}
static int t_lock(sqlite3_file *f, int l) { return REAL(f)->pMethods->xLock(REAL(f), l); }
static int t_unlock(sqlite3_file *f, int l) { return REAL(f)->pMethods->xUnlock(REAL(f), l); }
static int t_check(sqlite3_file *f, int *out) {
  return REAL(f)->pMethods->xCheckReservedLock(REAL(f), out);
}
static int t_fcntl(sqlite3_file *f, int op, void *arg) {
  return REAL(f)->pMethods->xFileControl(REAL(f), op, arg);
}
static int t_sector(sqlite3_file *f) { return REAL(f)->pMethods->xSectorSize(REAL(f)); }
static int t_chars(sqlite3_file *f) { return REAL(f)->pMethods->xDeviceCharacteristics(REAL(f)); }
static int t_shmmap(sqlite3_file *f, int i, int sz, int ext, void volatile **pp) {
  return REAL(f)->pMethods->xShmMap(REAL(f), i, sz, ext, pp);
}
static int t_shmlock(sqlite3_file *f, int off, int n, int flags) {
  return REAL(f)->pMethods->xShmLock(REAL(f), off, n, flags);
}
static void t_shmbarrier(sqlite3_file *f) { REAL(f)->pMethods->xShmBarrier(REAL(f)); }
static int t_shmunmap(sqlite3_file *f, int del) {
  return REAL(f)->pMethods->xShmUnmap(REAL(f), del);
}
static int t_fetch(sqlite3_file *f, sqlite3_int64 off, int n, void **pp) {
  return REAL(f)->pMethods->xFetch(REAL(f), off, n, pp);
}
static int t_unfetch(sqlite3_file *f, sqlite3_int64 off, void *p) {
  return REAL(f)->pMethods->xUnfetch(REAL(f), off, p);
}

static int t_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags, int *out) {
  sqlite3_vfs *real_vfs = vfs->pAppData;
  timed_file *tf = (timed_file *)f;
  tf->real = (sqlite3_file *)(tf + 1);
  memset(tf->real, 0, (size_t)real_vfs->szOsFile);
  int rc = real_vfs->xOpen(real_vfs, name, tf->real, flags, out);
  /* The wrapper offers exactly the methods version the real file has. */
  const sqlite3_io_methods *m = tf->real->pMethods;
  if (m == NULL) tf->base.pMethods = NULL;
  else if (m->iVersion >= 3) tf->base.pMethods = &timed_methods_v3;
  else if (m->iVersion == 2) tf->base.pMethods = &timed_methods_v2;
  else tf->base.pMethods = &timed_methods_v1;
  return rc;
}

#define FORWARD(name, sig, args)                  \
  static int v_##name sig {                       \
    sqlite3_vfs *r = vfs->pAppData;               \
    return r->name args;                          \
  }
FORWARD(xDelete, (sqlite3_vfs * vfs, const char *n, int d), (r, n, d))
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

static void register_vfs(void) {
  ebb__fault_vfs_install(); /* test-only; inert unless EBB_TEST_FAULTS is set */
  sqlite3_vfs *real = sqlite3_vfs_find(NULL);
  if (real == NULL) return;
  sqlite3_io_methods m = {
      .iVersion = 1, .xClose = t_close, .xRead = t_read, .xWrite = t_write,
      .xTruncate = t_truncate, .xSync = t_sync, .xFileSize = t_size, .xLock = t_lock,
      .xUnlock = t_unlock, .xCheckReservedLock = t_check, .xFileControl = t_fcntl,
      .xSectorSize = t_sector, .xDeviceCharacteristics = t_chars};
  timed_methods_v1 = m;
  m.iVersion = 2;
  m.xShmMap = t_shmmap;
  m.xShmLock = t_shmlock;
  m.xShmBarrier = t_shmbarrier;
  m.xShmUnmap = t_shmunmap;
  timed_methods_v2 = m;
  m.iVersion = 3;
  m.xFetch = t_fetch;
  m.xUnfetch = t_unfetch;
  timed_methods_v3 = m;
  timed_vfs = (sqlite3_vfs){
      .iVersion = real->iVersion < 2 ? real->iVersion : 2,
      .szOsFile = (int)sizeof(timed_file) + real->szOsFile,
      .mxPathname = real->mxPathname,
      .zName = "ebb-timed",
      .pAppData = real,
      .xOpen = t_open,
      .xDelete = v_xDelete,
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
  sqlite3_vfs_register(&timed_vfs, 0);
}

const char *ebb__sync_vfs_name(void) {
  pthread_once(&once, register_vfs);
  return timed_vfs.zName; /* NULL (the default VFS) if registering failed */
}

uint64_t ebb__store_sync_failures(void) {
  return atomic_load(&sync_failures);
}

void ebb_store_sync_stats(uint64_t *count, double *seconds) {
  *count = atomic_load(&sync_count);
  *seconds = (double)atomic_load(&sync_ns) / 1e9;
}
