/*
 * project.c: `ebb init` and `ebb test`, the two commands that make a
 * directory of Lua modules an ebb project.
 *
 * init copies the skeleton (an example aggregate, projection and reactor,
 * their specs, a commented config and a README; see skeleton/ in the source
 * tree) and
 * never overwrites: a file that exists is reported as skipped, and the copy
 * opens with O_EXCL so even a file appearing meanwhile is left alone.
 *
 * test runs busted as a child with LUA_PATH and LUA_CPATH set, so a user
 * never needs to know where ebb's Lua library and C module are (paths.c).
 * busted's standard output goes through a pipe, line by line, so that the
 * summary can be read and repeated as the "N passed, N failed" last line
 * that scripts/test and CI read everywhere else.
 */
#define _GNU_SOURCE
#include "project.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "paths.h"

/* ---------------------------------------------------------------- init */

/* mkdir -p: every missing directory of path (a directory path). */
static int make_dirs(const char *path, ebb_error *err) {
  char p[PATH_MAX];
  if (snprintf(p, sizeof p, "%s", path) >= (int)sizeof p)
    return ebb_error_set(err, EBB_EBADREQ, "path too long: %s", path);
  for (char *s = p + 1;; s++) {
    if (*s != '/' && *s != '\0') continue;
    char was = *s;
    *s = '\0';
    struct stat st;
    if (mkdir(p, 0755) != 0 && errno != EEXIST)
      return ebb_error_set(err, EBB_ESTORE, "cannot create %s: %s", p, strerror(errno));
    if (stat(p, &st) != 0 || !S_ISDIR(st.st_mode))
      return ebb_error_set(err, EBB_ESTORE, "%s exists and is not a directory", p);
    *s = was;
    if (was == '\0') break;
  }
  return 0;
}

/* Copies from to the new file to (O_EXCL). 1 when `to` exists, 0 when copied. */
static int copy_new(const char *from, const char *to, ebb_error *err) {
  int in = open(from, O_RDONLY | O_CLOEXEC);
  if (in < 0) return ebb_error_set(err, EBB_ESTORE, "cannot read %s: %s", from, strerror(errno));
  int out = open(to, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (out < 0) {
    int e = errno;
    close(in);
    if (e == EEXIST) return 1;
    return ebb_error_set(err, EBB_ESTORE, "cannot create %s: %s", to, strerror(e));
  }
  char buf[65536];
  ssize_t n;
  int rc = 0;
  while ((n = read(in, buf, sizeof buf)) != 0) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || write(out, buf, (size_t)n) != n) {
      rc = ebb_error_set(err, EBB_ESTORE, "cannot copy %s to %s: %s", from, to, strerror(errno));
      break;
    }
  }
  if (close(out) != 0 && rc == 0)
    rc = ebb_error_set(err, EBB_ESTORE, "cannot write %s: %s", to, strerror(errno));
  close(in);
  return rc;
}

static int skip_hidden_dots(const struct dirent *e) {
  return strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
}

/* Copies skeleton/rel into dir/rel, recursively, in name order. */
static int copy_tree(const char *skeleton, const char *dir, const char *rel, ebb_buf *report,
                     ebb_error *err) {
  char src[PATH_MAX], dst[PATH_MAX];
  if (snprintf(src, sizeof src, "%s%s%s", skeleton, rel[0] ? "/" : "", rel) >= (int)sizeof src)
    return ebb_error_set(err, EBB_EBADREQ, "path too long: %s", rel);
  struct dirent **names;
  int n = scandir(src, &names, skip_hidden_dots, alphasort);
  if (n < 0) return ebb_error_set(err, EBB_ESTORE, "cannot read %s: %s", src, strerror(errno));
  int rc = 0;
  for (int i = 0; i < n; i++) {
    char sub[PATH_MAX];
    if (rc == 0 && snprintf(sub, sizeof sub, "%s%s%s", rel, rel[0] ? "/" : "", names[i]->d_name) >=
                       (int)sizeof sub)
      rc = ebb_error_set(err, EBB_EBADREQ, "path too long: %s", names[i]->d_name);
    if (rc == 0) {
      struct stat st;
      if (snprintf(src, sizeof src, "%s/%s", skeleton, sub) >= (int)sizeof src ||
          snprintf(dst, sizeof dst, "%s/%s", dir, sub) >= (int)sizeof dst) {
        rc = ebb_error_set(err, EBB_EBADREQ, "path too long: %s/%s", dir, sub);
      } else if (stat(src, &st) != 0) {
        rc = ebb_error_set(err, EBB_ESTORE, "cannot read %s: %s", src, strerror(errno));
      } else if (S_ISDIR(st.st_mode)) {
        rc = make_dirs(dst, err);
        if (rc == 0) rc = copy_tree(skeleton, dir, sub, report, err);
      } else {
        struct stat there;
        int exists = lstat(dst, &there) == 0 ? 1 : copy_new(src, dst, err);
        if (exists == 1) ebb_buf_printf(report, "skipped %s (it exists)\n", dst);
        else if (exists == 0) ebb_buf_printf(report, "created %s\n", dst);
        else rc = exists;
      }
    }
    free(names[i]);
  }
  free(names);
  return rc;
}

int ebb_project_init(const char *dir, const char *skeleton_dir, ebb_buf *report, ebb_error *err) {
  struct stat st;
  if (stat(skeleton_dir, &st) != 0 || !S_ISDIR(st.st_mode))
    return ebb_error_set(err, EBB_ESTORE, "the project skeleton is missing: %s", skeleton_dir);
  int rc = make_dirs(dir, err);
  return rc ? rc : copy_tree(skeleton_dir, dir, "", report, err);
}

/* ---------------------------------------------------------------- test */

/* Writes the full path of program `name` found on PATH into out. */
static int find_on_path(const char *name, char *out, size_t size) {
  const char *path = getenv("PATH");
  if (path == NULL || path[0] == '\0') path = "/usr/local/bin:/usr/bin:/bin";
  while (*path) {
    size_t n = strcspn(path, ":");
    if (snprintf(out, size, "%.*s/%s", (int)n, n ? path : ".", name) < (int)size &&
        access(out, X_OK) == 0)
      return 0;
    path += n;
    if (*path == ':') path++;
  }
  return -1;
}

/* Sets var (LUA_PATH_5_4) to `ours` followed by what Lua 5.4 would have used
 * (var, else `plain`, LUA_PATH), or by ";;", Lua's defaults, where busted
 * itself lives. */
static int prepend_env(const char *var, const char *plain, const char *ours) {
  const char *theirs = getenv(var);
  if (theirs == NULL || theirs[0] == '\0') theirs = getenv(plain);
  char *v;
  if (asprintf(&v, "%s;%s", ours, theirs && theirs[0] ? theirs : ";") < 0) return -1;
  int rc = setenv(var, v, 1);
  free(v);
  return rc;
}

/* Copies line without terminal colour sequences (ESC [ ... letter). */
static void strip_colours(const char *line, char *out, size_t size) {
  size_t o = 0;
  for (const char *s = line; *s && o + 1 < size; s++) {
    if (s[0] == '\x1b' && s[1] == '[') {
      s += 2;
      while (*s && !(*s >= '@' && *s <= '~')) s++;
      if (!*s) break;
      continue;
    }
    out[o++] = *s;
  }
  out[o] = '\0';
}

typedef struct counts {
  long passed, failed;
  int summary;     /* busted's "N successes / N failures / N errors" seen */
  long tap_ok, tap_not_ok;
} counts;

static void read_line(const char *line, counts *c) {
  char clean[1024];
  strip_colours(line, clean, sizeof clean);
  long ok, failures, errors;
  int end = 0;
  if (sscanf(clean, "%ld succe%*[^/]/ %ld failur%*[^/]/ %ld erro%n", &ok, &failures, &errors, &end) ==
          3 &&
      end > 0) {
    c->passed = ok;
    c->failed = failures + errors;
    c->summary = 1;
  } else if (strncmp(clean, "ok ", 3) == 0) {
    c->tap_ok++;
  } else if (strncmp(clean, "not ok ", 7) == 0) {
    c->tap_not_ok++;
  }
}

int ebb_project_test(const char *aggregates, const char *projections, const char *reactors,
                     int argc, char **argv, ebb_error *err) {
  char lua[PATH_MAX], busted[PATH_MAX];
  if (find_on_path("lua5.4", lua, sizeof lua) != 0) {
    ebb_error_set(err, EBB_ENOTFOUND, "ebb test needs lua5.4 (Debian: apt-get install lua5.4)");
    return -1;
  }
  if (find_on_path("busted", busted, sizeof busted) != 0) {
    ebb_error_set(err, EBB_ENOTFOUND, "ebb test needs busted (Debian: apt-get install lua-busted)");
    return -1;
  }
  const char *rt = ebb_paths_lua_dir();
  char *lpath = NULL, *cpath = NULL;
  int bad = asprintf(&lpath, "%s/?.lua;%s/?/init.lua;%s/?.lua;%s/?.lua;%s/?.lua;spec/?.lua", rt,
                     rt, aggregates, projections, reactors) < 0;
  bad = bad || asprintf(&cpath, "%s/?.so", ebb_paths_cmod_dir()) < 0;
  bad = bad || prepend_env("LUA_PATH_5_4", "LUA_PATH", lpath) != 0 ||
               prepend_env("LUA_CPATH_5_4", "LUA_CPATH", cpath) != 0;
  free(lpath);
  free(cpath);
  if (bad) {
    ebb_error_set(err, EBB_ENOMEM, "out of memory");
    return -1;
  }

  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    ebb_error_set(err, EBB_ESTORE, "pipe: %s", strerror(errno));
    return -1;
  }
  fflush(stdout);
  pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    ebb_error_set(err, EBB_ESTORE, "fork: %s", strerror(errno));
    return -1;
  }
  if (pid == 0) {
    char **args = calloc((size_t)argc + 3, sizeof *args);
    if (args == NULL || dup2(fds[1], STDOUT_FILENO) < 0) _exit(127);
    args[0] = lua;
    args[1] = busted;
    for (int i = 0; i < argc; i++) args[i + 2] = argv[i];
    execv(lua, args);
    fprintf(stderr, "ebb: cannot run %s: %s\n", lua, strerror(errno));
    _exit(127);
  }
  close(fds[1]);
  FILE *in = fdopen(fds[0], "r");
  counts c = {0};
  char *line = NULL;
  size_t cap = 0;
  while (in && getline(&line, &cap, in) >= 0) {
    fputs(line, stdout);
    fflush(stdout);
    read_line(line, &c);
  }
  free(line);
  if (in) fclose(in);
  else close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  if (!c.summary) {
    c.passed = c.tap_ok;
    c.failed = c.tap_not_ok;
  }
  /* busted failed without saying what failed (a spec file that does not load) */
  if (code != 0 && c.failed == 0) c.failed = 1;
  printf("%ld passed, %ld failed\n", c.passed, c.failed);
  return code;
}
