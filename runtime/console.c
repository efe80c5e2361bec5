/*
 * console.c: serves the web console's files (runtime/console/, see
 * console_dir) under /console/, and sends GET / there.
 *
 * The files are public: the page holds no data. Everything it shows comes
 * from the HTTP API with the bearer token the user types in, so the console
 * sees exactly what curl sees. The files are read on each request, on the
 * loop: they are a few small files in the page cache, read once per page
 * load, and reading them fresh means an edited file needs no restart.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "daemon.h"
#include "paths.h"

#define MAX_FILE (1 << 20) /* the console's files are a few KB; a bigger one is refused */

/* Strict: only the page's own scripts and styles, no inline code, no other
 * origin, not framed. Charts are SVG drawn by the page's own modules. */
static const char security_headers[] =
    "Content-Security-Policy: default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "Referrer-Policy: no-referrer\r\n"
    "Cache-Control: no-cache\r\n";

/* Where the files are: the source tree's runtime/console, or an installed
 * tree's share/ebb/console (paths.c); EBB_CONSOLE_DIR in the environment wins. */
static const char *console_dir(void) {
  return ebb_paths_console_dir();
}

static const char *content_type(const char *name) {
  const char *dot = strrchr(name, '.');
  if (dot == NULL) return NULL;
  if (!strcmp(dot, ".html")) return "text/html; charset=utf-8";
  if (!strcmp(dot, ".js")) return "text/javascript; charset=utf-8";
  if (!strcmp(dot, ".css")) return "text/css; charset=utf-8";
  if (!strcmp(dot, ".svg")) return "image/svg+xml";
  return NULL;
}

/* A file name the console may serve: letters, digits, '-', '_' and '.', not
 * starting with '.', so no path can leave the directory. */
static int plain_name(const char *s) {
  if (s[0] == '\0' || s[0] == '.' || strlen(s) > 64) return 0;
  for (const char *p = s; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
          *p == '-' || *p == '_' || *p == '.'))
      return 0;
  return 1;
}

static int not_found(ebb_http_conn *c, const char *what) {
  char body[256];
  snprintf(body, sizeof body,
           "{\"error\":{\"code\":\"not_found\",\"message\":\"the console has no file %s\"}}", what);
  ebb_http_respond(c, 404, "application/json", security_headers, body, strlen(body));
  return 404;
}

int ebb__console_serve(ebb_http_conn *c, const ebb_http_request *req) {
  const char *path = req->path;
  if (!strcmp(path, "/") || !strcmp(path, "/console")) {
    char hdr[sizeof security_headers + 64];
    snprintf(hdr, sizeof hdr, "Location: /console/\r\n%s", security_headers);
    ebb_http_respond(c, 302, NULL, hdr, NULL, 0);
    return 302;
  }
  const char *name = path + strlen("/console/");
  if (name[0] == '\0') name = "index.html";
  const char *type = content_type(name);
  if (!plain_name(name) || type == NULL) return not_found(c, "by that name");
  char file[4096];
  snprintf(file, sizeof file, "%s/%s", console_dir(), name);
  FILE *f = fopen(file, "rb");
  if (f == NULL) return not_found(c, name);
  struct stat st;
  if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
    fclose(f);
    return not_found(c, name);
  }
  size_t size = st.st_size > MAX_FILE ? MAX_FILE : (size_t)st.st_size;
  char *data = malloc(size ? size : 1);
  size_t n = data ? fread(data, 1, size, f) : 0;
  int failed = data == NULL || ferror(f) || (off_t)n != st.st_size;
  fclose(f);
  if (failed) {
    free(data);
    ebb_http_respond_error(c, 500, "internal", "cannot read the console's file");
    return 500;
  }
  ebb_http_respond(c, 200, type, security_headers, data, n);
  free(data);
  return 200;
}
