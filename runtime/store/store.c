/*
 * store.c: the backend-independent half of the event store (see store.h):
 * argument checks that every backend would otherwise repeat, event lists,
 * and dispatch through the backend's vtable (an append goes to append.c,
 * which decides it for every backend).
 */
#include "store.h"

#include "json.h"
#include "store_backend.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- names */

size_t ebb_stream_category_len(const char *stream) {
  const char *dash = strchr(stream, '-');
  return dash ? (size_t)(dash - stream) : strlen(stream);
}

int ebb_validate_name(const char *what, const char *s, ebb_error *err) {
  if (s == NULL || s[0] == '\0') return ebb_error_set(err, EBB_EBADREQ, "%s must not be empty", what);
  size_t n = strlen(s);
  if (n > EBB_MAX_NAME)
    return ebb_error_set(err, EBB_EBADREQ, "%s is %zu bytes long; the limit is %d", what, n,
                         EBB_MAX_NAME);
  const unsigned char *p = (const unsigned char *)s;
  for (size_t i = 0; i < n;) {
    if (p[i] < 0x20 || p[i] == 0x7F)
      return ebb_error_set(err, EBB_EBADREQ, "%s contains a control character at byte %zu", what, i);
    size_t k = ebb_utf8_seq(p + i, n - i);
    if (k == 0) return ebb_error_set(err, EBB_EBADREQ, "%s is not valid UTF-8 at byte %zu", what, i);
    i += k;
  }
  return 0;
}

int ebb_expected_matches(int64_t expected, int64_t actual) {
  if (expected == EBB_EXPECT_ANY) return 1;
  if (expected == EBB_EXPECT_NO_STREAM) return actual == 0;
  if (expected == EBB_EXPECT_EXISTS) return actual > 0;
  return expected == actual;
}

int ebb_parse_expected(const char *s, int64_t *out) {
  if (strcmp(s, "any") == 0) *out = EBB_EXPECT_ANY;
  else if (strcmp(s, "no_stream") == 0) *out = EBB_EXPECT_NO_STREAM;
  else if (strcmp(s, "exists") == 0) *out = EBB_EXPECT_EXISTS;
  else {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end != '\0' || v < 0 || s[0] == '-' || s[0] == '+') return -1;
    *out = v;
  }
  return 0;
}

/* ---------------------------------------------------------------- event lists */

void ebb_event_list_init(ebb_event_list *l) {
  memset(l, 0, sizeof *l);
}

static void event_free(ebb_event *e) {
  free(e->stream);
  free(e->id);
  free(e->type);
  free(e->data);
  free(e->metadata);
  free(e->recorded_at);
  free(e->upcast_error);
}

void ebb_event_list_clear(ebb_event_list *l) {
  for (size_t i = 0; i < l->n; i++) event_free(&l->items[i]);
  l->n = 0;
}

void ebb_event_list_free(ebb_event_list *l) {
  ebb_event_list_clear(l);
  free(l->items);
  ebb_event_list_init(l);
}

static char *dup_n(const char *s, size_t n) {
  char *p = malloc(n + 1);
  if (p) {
    memcpy(p, s, n);
    p[n] = '\0';
  }
  return p;
}

int ebb_event_list_push(ebb_event_list *l, const ebb_event *ev) {
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 16;
    ebb_event *items = realloc(l->items, cap * sizeof *items);
    if (items == NULL) return EBB_ENOMEM;
    l->items = items;
    l->cap = cap;
  }
  ebb_event *e = &l->items[l->n];
  *e = *ev;
  e->stream = dup_n(ev->stream, strlen(ev->stream));
  e->id = dup_n(ev->id, strlen(ev->id));
  e->type = dup_n(ev->type, strlen(ev->type));
  e->data = dup_n(ev->data, ev->data_len);
  e->metadata = dup_n(ev->metadata, ev->metadata_len);
  e->recorded_at = dup_n(ev->recorded_at, strlen(ev->recorded_at));
  e->upcast_error = ev->upcast_error ? dup_n(ev->upcast_error, strlen(ev->upcast_error)) : NULL;
  if (!e->stream || !e->id || !e->type || !e->data || !e->metadata || !e->recorded_at ||
      (ev->upcast_error && !e->upcast_error)) {
    event_free(e);
    return EBB_ENOMEM;
  }
  l->n++;
  return 0;
}

void ebb_event_list_filter(ebb_event_list *l, int (*keep)(const void *ud, const ebb_event *e),
                           const void *ud) {
  size_t w = 0;
  for (size_t i = 0; i < l->n; i++) {
    if (keep(ud, &l->items[i])) l->items[w++] = l->items[i];
    else event_free(&l->items[i]);
  }
  l->n = w;
}

/* ---------------------------------------------------------------- dispatch */

/* The backends, opened by name. */
static const struct backend {
  const char *name;
  int needs_dir; /* keeps its events in the data directory */
  int (*open)(ebb_store **out, const ebb_store_options *opt, ebb_error *err);
  /* NULL: a store of one process, without links */
  int (*link)(ebb_store_link **out, const char *uri, int kind, ebb_error *err);
} backends[] = {
    {"sqlite", 1, ebb__store_sqlite_open, NULL},
    {"postgres", 0, ebb__store_postgres_open, ebb__store_postgres_link_new},
};

const char *ebb_store_backend(const char *uri) {
  if (uri == NULL || uri[0] == '\0' || strcmp(uri, "sqlite") == 0) return "sqlite";
  if (strncmp(uri, "postgresql://", 13) == 0 || strncmp(uri, "postgres://", 11) == 0 ||
      strchr(uri, '=') != NULL)
    return "postgres";
  return NULL;
}

int ebb_store_open(ebb_store **out, const ebb_store_options *opt, ebb_error *err) {
  *out = NULL;
  if (opt == NULL) return ebb_error_set(err, EBB_EBADREQ, "no store options given");
  const char *name = ebb_store_backend(opt->uri);
  if (name == NULL)
    return ebb_error_set(err, EBB_EBADREQ,
                         "store must be sqlite or a PostgreSQL connection URI "
                         "(postgresql://user@host:port/database), not \"%s\"",
                         opt->uri);
  if (opt->durability != EBB_DURABILITY_FULL && opt->durability != EBB_DURABILITY_NORMAL)
    return ebb_error_set(err, EBB_EBADREQ, "unknown durability level %d", opt->durability);
  for (size_t i = 0; i < sizeof backends / sizeof backends[0]; i++) {
    if (strcmp(backends[i].name, name) != 0) continue;
    if (backends[i].needs_dir && (opt->dir == NULL || opt->dir[0] == '\0'))
      return ebb_error_set(err, EBB_EBADREQ, "no data directory given");
    return backends[i].open(out, opt, err);
  }
  return ebb_error_set(err, EBB_EBADREQ, "no %s store backend in this build", name);
}

int ebb_store_link_new(ebb_store_link **out, const char *uri, int kind, ebb_error *err) {
  *out = NULL;
  const char *name = ebb_store_backend(uri);
  if (name == NULL) return ebb_error_set(err, EBB_EBADREQ, "store names no backend: \"%s\"", uri);
  if (kind != EBB_LINK_WATCH && kind != EBB_LINK_LEADER)
    return ebb_error_set(err, EBB_EBADREQ, "unknown store link kind %d", kind);
  for (size_t i = 0; i < sizeof backends / sizeof backends[0]; i++)
    if (strcmp(backends[i].name, name) == 0)
      return backends[i].link ? backends[i].link(out, uri, kind, err) : 0;
  return ebb_error_set(err, EBB_EBADREQ, "no %s store backend in this build", name);
}

int ebb_store_link_start(ebb_store_link *l, ebb_error *err) {
  return l->vt->start(l, err);
}

int ebb_store_link_fd(const ebb_store_link *l) {
  return l->vt->fd(l);
}

int ebb_store_link_wants(const ebb_store_link *l) {
  return l->vt->wants(l);
}

int ebb_store_link_up(const ebb_store_link *l) {
  return l->vt->up(l);
}

int ebb_store_link_step(ebb_store_link *l, ebb_store_link_news *news, ebb_error *err) {
  news->head = -1;
  news->leader = 0;
  news->retry_ms = 0;
  return l->vt->step(l, news, err);
}

int ebb_store_link_retry(ebb_store_link *l, ebb_error *err) {
  return l->vt->retry(l, err);
}

void ebb_store_link_free(ebb_store_link *l) {
  if (l) l->vt->free(l);
}

const char *ebb_store_kind(const ebb_store *s) {
  return s->vt->name;
}

int ebb_store_schema_version(ebb_store *s, int *version, ebb_error *err) {
  return s->vt->schema_version(s, version, err);
}

void ebb_store_close(ebb_store *s) {
  if (s) s->vt->close(s);
}

/* Refuses a request that names one event id twice. A hash set, so that one
 * large append (tens of thousands of events) costs linear time rather than
 * holding the writer for seconds with a pairwise comparison. */
static uint64_t id_hash(const char *s) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

static int check_unique_ids(ebb_append *r) {
  if (r->n < 2) return 0;
  size_t cap = 16;
  while (cap < r->n * 2) cap *= 2;
  size_t *slots = calloc(cap, sizeof *slots); /* index + 1 of the event; 0: empty */
  if (slots == NULL) return ebb_error_set(&r->err, EBB_ENOMEM, "out of memory checking event ids");
  int rc = 0;
  for (size_t i = 0; i < r->n && rc == 0; i++) {
    const char *id = r->events[i].id;
    for (size_t k = (size_t)id_hash(id) & (cap - 1);; k = (k + 1) & (cap - 1)) {
      if (slots[k] == 0) {
        slots[k] = i + 1;
        break;
      }
      if (strcmp(r->events[slots[k] - 1].id, id) == 0) {
        rc = ebb_error_set(&r->err, EBB_EBADREQ, "event id %s appears twice in one append", id);
        break;
      }
    }
  }
  free(slots);
  return rc;
}

/* A backend without a WAL of its own leaves both NULL: nothing to copy. */
int64_t ebb_store_wal_pages(ebb_store *s) {
  return s->vt->wal_pages ? s->vt->wal_pages(s) : 0;
}

int ebb_store_checkpoint(ebb_store *s, ebb_error *err) {
  return s->vt->checkpoint ? s->vt->checkpoint(s, err) : 0;
}

static int check_request(ebb_append *r) {
  ebb_error_clear(&r->err);
  memset(&r->result, 0, sizeof r->result);
  if (ebb_validate_name("stream name", r->stream, &r->err)) return -1;
  if (r->expected < 0 && r->expected != EBB_EXPECT_ANY && r->expected != EBB_EXPECT_NO_STREAM &&
      r->expected != EBB_EXPECT_EXISTS)
    return ebb_error_set(&r->err, EBB_EBADREQ, "invalid expected version %lld",
                         (long long)r->expected);
  if (r->command_id && ebb_validate_name("command id", r->command_id, &r->err)) return -1;
  if (r->n == 0 && r->command_id == NULL)
    return ebb_error_set(&r->err, EBB_EBADREQ, "an append needs at least one event");
  if (r->rejection && (r->command_id == NULL || r->n))
    return ebb_error_set(&r->err, EBB_EBADREQ, "a refusal is recorded for a command id, without events");
  for (size_t i = 0; i < r->n; i++) {
    const ebb_event_in *e = &r->events[i];
    if (ebb_validate_name("event id", e->id, &r->err) ||
        ebb_validate_name("event type", e->type, &r->err))
      return -1;
    if (e->type[0] == '$' && !r->reserved)
      return ebb_error_set(&r->err, EBB_EBADREQ,
                           "event %zu: types starting with '$' (%s) are reserved for ebb", i + 1,
                           e->type);
    if (e->schema < 1)
      return ebb_error_set(&r->err, EBB_EBADREQ, "event %zu: schema must be at least 1", i + 1);
    if (e->data == NULL || e->data_len == 0 || e->data[0] != '{' || e->metadata == NULL ||
        e->metadata_len == 0 || e->metadata[0] != '{')
      return ebb_error_set(&r->err, EBB_EBADREQ, "event %zu: data and metadata must be JSON objects",
                           i + 1);
    /* A malformed text would make the stream unreadable forever: check it here,
     * whoever the caller is, unless it comes straight from ebb_json_encode. */
    char msg[256];
    if (!r->json_checked && ebb_json_validate(e->data, e->data_len, msg, sizeof msg) != 0)
      return ebb_error_set(&r->err, EBB_EBADREQ, "event %zu: data is not valid JSON: %s", i + 1, msg);
    if (!r->json_checked && ebb_json_validate(e->metadata, e->metadata_len, msg, sizeof msg) != 0)
      return ebb_error_set(&r->err, EBB_EBADREQ, "event %zu: metadata is not valid JSON: %s", i + 1,
                           msg);
  }
  return check_unique_ids(r);
}

int ebb_store_append(ebb_store *s, ebb_append *reqs, size_t n, ebb_error *err) {
  for (size_t i = 0; i < n; i++) check_request(&reqs[i]);
  return ebb__append_run(s, reqs, n, 0, err);
}

int ebb_store_append_atomic(ebb_store *s, ebb_append *reqs, size_t n, ebb_error *err) {
  for (size_t i = 0; i < n; i++) check_request(&reqs[i]);
  return ebb__append_run(s, reqs, n, 1, err);
}

static int check_limit(int64_t limit, ebb_error *err) {
  if (limit <= 0) return ebb_error_set(err, EBB_EBADREQ, "limit must be positive");
  return 0;
}

int ebb_store_read_stream(ebb_store *s, const char *stream, int64_t from, int64_t limit,
                          int backward, ebb_event_list *out, ebb_error *err) {
  if (ebb_validate_name("stream name", stream, err) || check_limit(limit, err)) return err->code;
  if (from < 0) return ebb_error_set(err, EBB_EBADREQ, "from must not be negative");
  return s->vt->read_stream(s, stream, from, limit, backward, out, err);
}

int ebb_store_read_all(ebb_store *s, const ebb_read_all *q, ebb_event_list *out, ebb_error *err) {
  if (check_limit(q->limit, err)) return err->code;
  if (q->after < 0) return ebb_error_set(err, EBB_EBADREQ, "after must not be negative");
  if (q->category && ebb_validate_name("category", q->category, err)) return err->code;
  if (q->type && ebb_validate_name("event type", q->type, err)) return err->code;
  return s->vt->read_all(s, q, out, err);
}

int ebb_store_read_range(ebb_store *s, int64_t first, int64_t last, ebb_event_list *out,
                         ebb_error *err) {
  return s->vt->read_range(s, first, last, out, err);
}

int ebb_store_stream_version(ebb_store *s, const char *stream, int64_t *version, int *deleted,
                             ebb_error *err) {
  int ignored;
  if (ebb_validate_name("stream name", stream, err)) return err->code;
  return s->vt->stream_version(s, stream, version, deleted ? deleted : &ignored, err);
}

int ebb_store_delete(ebb_store *s, const char *stream, int64_t expected, const char *reason,
                     ebb_append_result *result, ebb_error *err) {
  ebb_buf data = EBB_BUF_INIT;
  ebb_buf_puts(&data, "{");
  if (reason) {
    ebb_buf_puts(&data, "\"reason\":");
    ebb_buf_json_string(&data, reason, strlen(reason));
  }
  ebb_buf_puts(&data, "}");
  char id[EBB_UUID_LEN + 1];
  ebb_uuid_new(id);
  ebb_event_in ev = {.id = id, .type = EBB_TOMBSTONE, .schema = 1, .data = data.data,
                     .data_len = data.len, .metadata = "{}", .metadata_len = 2};
  ebb_append req = {.stream = stream, .expected = expected, .events = &ev, .n = 1, .reserved = 1};
  ebb_error_init(&req.err);
  if (data.oom) {
    ebb_buf_free(&data);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  }
  if (reason && ebb_validate_name("reason", reason, &req.err) != 0) {
    ebb_buf_free(&data);
    ebb_error_move(err, &req.err);
    return err->code;
  }
  int rc = ebb_store_append(s, &req, 1, NULL);
  ebb_buf_free(&data);
  if (rc == 0 && req.err.code == EBB_EVERSION && req.err.actual == 0) {
    ebb_error_clear(&req.err);
    ebb_error_set(&req.err, EBB_ENOTFOUND, "stream %s does not exist", stream);
  }
  if (req.err.code) {
    int code = req.err.code;
    ebb_error_move(err, &req.err);
    return code;
  }
  if (result) *result = req.result;
  return 0;
}

int ebb_store_snapshot_save(ebb_store *s, const ebb_snapshot *snaps, size_t n, ebb_error *err) {
  if (n == 0) return 0;
  return s->vt->snapshot_save(s, snaps, n, err);
}

int ebb_store_snapshot_load(ebb_store *s, const char *stream, const char *fingerprint,
                            int64_t max_version, const char *max_time, int64_t *version,
                            int64_t *position, ebb_buf *state_buf, ebb_error *err) {
  return s->vt->snapshot_load(s, stream, fingerprint, max_version, max_time, version, position,
                              state_buf, err);
}

int ebb_store_snapshot_list(ebb_store *s, ebb_snapshot_fn fn, void *ud, ebb_error *err) {
  return s->vt->snapshot_list(s, fn, ud, err);
}

int ebb_store_snapshot_delete(ebb_store *s, const char *stream, const char *fingerprint,
                              int64_t version, int64_t *deleted, ebb_error *err) {
  if (stream && ebb_validate_name("stream name", stream, err)) return err->code;
  return s->vt->snapshot_delete(s, stream, fingerprint, version, deleted, err);
}

int ebb_store_list_streams(ebb_store *s, const ebb_list_streams *q, ebb_stream_fn fn, void *ud,
                           ebb_error *err) {
  if (q->limit < 1) return ebb_error_set(err, EBB_EBADREQ, "limit must be at least 1");
  if (q->category && ebb_validate_name("category", q->category, err)) return err->code;
  if (q->prefix && q->prefix[0] && ebb_validate_name("prefix", q->prefix, err)) return err->code;
  if (q->after && q->after[0] && ebb_validate_name("after", q->after, err)) return err->code;
  /* A category's streams all start with its name (the category is the name
   * up to the first '-'): that prefix makes the listing a range of the index
   * instead of a walk past every other category's streams. */
  ebb_list_streams ranged = *q;
  if (q->category && (q->prefix == NULL || q->prefix[0] == '\0')) ranged.prefix = q->category;
  return s->vt->list_streams(s, &ranged, fn, ud, err);
}

int ebb_store_read_linked(ebb_store *s, int link, const char *value, int64_t after,
                          int64_t limit, ebb_event_list *out, ebb_error *err) {
  if (limit < 1) return ebb_error_set(err, EBB_EBADREQ, "limit must be at least 1");
  if (link != EBB_LINK_CORRELATION && link != EBB_LINK_CAUSATION)
    return ebb_error_set(err, EBB_EBADREQ, "unknown link %d", link);
  if (ebb_validate_name(link == EBB_LINK_CORRELATION ? "correlation_id" : "causation_id", value,
                        err))
    return err->code;
  return s->vt->read_linked(s, link, value, after, limit, out, err);
}

int ebb_store_head(ebb_store *s, int64_t *position, ebb_error *err) {
  return s->vt->head(s, position, err);
}

int ebb_store_find_command(ebb_store *s, const char *command_id, ebb_command_record *out,
                           ebb_error *err) {
  if (ebb_validate_name("command id", command_id, err)) return err->code;
  return s->vt->find_command(s, command_id, out, err);
}

int ebb_store_prefetch(ebb_store *s, ebb_prefetch *items, size_t n, int64_t limit, ebb_error *err) {
  if (check_limit(limit, err)) return err->code;
  for (size_t i = 0; i < n; i++) {
    items[i].command_known = 0;
    if (ebb_validate_name("stream name", items[i].stream, &items[i].err) == 0 &&
        items[i].command_id)
      ebb_validate_name("command id", items[i].command_id, &items[i].err);
  }
  if (s->vt->prefetch) return s->vt->prefetch(s, items, n, limit, err);
  for (size_t i = 0; i < n; i++) {
    ebb_prefetch *it = &items[i];
    if (it->err.code) continue;
    if (s->vt->read_stream(s, it->stream, 1, limit, 0, it->events, err)) return err->code;
    if (it->command_id) {
      ebb_command_record rec = {.rejection = NULL};
      int found = s->vt->find_command(s, it->command_id, &rec, err);
      if (found < 0) return err->code;
      ebb_command_record_clear(&rec);
      it->command_known = found > 0;
    }
  }
  return 0;
}

void ebb_command_record_clear(ebb_command_record *rec) {
  free(rec->rejection);
  rec->rejection = NULL;
}
