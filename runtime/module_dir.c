/* module_dir.c: see module_dir.h. */
#include "module_dir.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"

uint64_t ebb_fnv1a(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

int ebb_file_hash(const char *path, uint64_t *h) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) return -1;
  uint64_t x = *h;
  char buf[8192];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0) x = ebb_fnv1a(x, buf, n);
  int failed = ferror(f);
  fclose(f);
  if (failed) return -1;
  *h = x;
  return 0;
}

int ebb_module_dir_each(const char *dir, ebb_module_fn fn, void *ud) {
  DIR *d = opendir(dir);
  if (d == NULL) return -1;
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    size_t n = strlen(de->d_name);
    if (n < 5 || strcmp(de->d_name + n - 4, ".lua") != 0 || de->d_name[0] == '.') continue;
    char *name = ebb_strdupf("%.*s", (int)(n - 4), de->d_name);
    char *path = ebb_strdupf("%s/%s", dir, de->d_name);
    if (name && path) fn(ud, name, path);
    free(name);
    free(path);
  }
  closedir(d);
  return 0;
}

void ebb_module_check_note(ebb_module_check *c, const char *name, int ok, const char *msg) {
  if (!ok) {
    ebb_buf_printf(c->report, "%s\n", msg ? msg : "out of memory");
    c->problems++;
  } else if (c->names) {
    if (c->names->len) ebb_buf_putc(c->names, ',');
    ebb_buf_json_string(c->names, name, strlen(name));
  }
}
