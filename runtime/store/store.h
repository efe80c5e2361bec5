/*
 * store.h: the event store, as the rest of ebb sees it.
 *
 * A store keeps streams of immutable events with a global, gap-free position
 * and a 1-based version per stream. Dispatch, the CLI and the Lua binding only
 * use the functions below; a backend (SQLite or PostgreSQL) supplies them
 * through ebb_store_vtable and is opened by name from a table in store.c, so
 * callers never know which one they hold. Backends depend on this interface,
 * never the reverse (their constructors are in store_backend.h). A store
 * handle belongs to one thread at a time.
 *
 * Event data and metadata cross this interface as JSON object text; the store
 * validates it (a malformed text would make its stream unreadable) but never
 * rewrites it.
 */
#ifndef EBB_STORE_H
#define EBB_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "error.h"
#include "uuid.h"

#define EBB_MAX_NAME 512 /* bytes in a stream name, event type or id */

/* The event type that closes a deleted stream. Types starting with '$' are
 * reserved for ebb: writers cannot append them. */
#define EBB_TOMBSTONE "$deleted"

enum ebb_durability {
  EBB_DURABILITY_FULL = 0,   /* fsync the WAL at every commit */
  EBB_DURABILITY_NORMAL = 1  /* WAL without fsync per commit */
};

typedef struct ebb_store_options {
  const char *uri;      /* NULL or "sqlite": SQLite in dir/events.db; a libpq connection URI
                         * (postgresql://...) or "key=value" string: PostgreSQL */
  const char *dir;      /* data directory, created if missing (SQLite only) */
  int durability;       /* enum ebb_durability */
  int readonly;         /* open for reading only */
  int exclusive;        /* hold the database lock while open: no other process may read or
                         * write it, and each transaction skips the lock system calls */
  int manual_checkpoints; /* commits never checkpoint the WAL: the owner calls
                           * ebb_store_checkpoint when it suits it (the daemon's writer,
                           * after it has reported a batch) */
} ebb_store_options;

/* One event to append. All strings are borrowed for the duration of the call. */
typedef struct ebb_event_in {
  const char *id;          /* required: ebb_uuid_new() when the writer gives none */
  const char *type;
  int64_t schema;          /* >= 1 */
  const char *data;        /* JSON object text */
  size_t data_len;
  const char *metadata;    /* JSON object text */
  size_t metadata_len;
  const char *recorded_at; /* NULL: now. Only import passes the original time. */
} ebb_event_in;

typedef struct ebb_append_result {
  int64_t first_version, version;    /* versions of the first and last event */
  int64_t first_position, position;  /* positions of the first and last event */
  int idempotent;                    /* 1: these events were already stored; nothing new */
} ebb_append_result;

/* A command that has been handled, for command-id deduplication: accepted,
 * or refused by its aggregate (a refusal is answered again, never decided
 * again). Set rejection to NULL before a look-up; free it after one
 * (ebb_command_record_clear). */
typedef struct ebb_command_record {
  char stream[EBB_MAX_NAME + 1];
  char type[EBB_MAX_NAME + 1];
  int64_t version;                   /* the stream's version after the command (refused: then) */
  int64_t first_position, position;  /* 0, 0 when the command recorded no event */
  char *rejection;                   /* malloc'd: the refusal as ebb_error_to_json wrote it;
                                      * NULL: the command was accepted */
} ebb_command_record;

void ebb_command_record_clear(ebb_command_record *rec); /* frees rejection */

/* One append request: a stream, its expected version and events. Several go
 * into one ebb_store_append call (one transaction), each failing alone. */
typedef struct ebb_append {
  const char *stream;
  int64_t expected;              /* EBB_EXPECT_* sentinel or an exact version */
  const ebb_event_in *events;
  size_t n;
  const char *command_id;        /* non-NULL: record the command, atomically with the events */
  const char *command_type;
  const char *rejection;         /* non-NULL (with command_id, no events): record that the
                                  * command was refused, this being the error as
                                  * ebb_error_to_json wrote it; it is recorded at the stream's
                                  * version if that is still `expected` */
  int reserved;                  /* may append reserved ('$') types: only ebb_store_delete */
  int json_checked;              /* data and metadata come from ebb_json_encode: no re-check */
  ebb_append_result result;      /* out */
  ebb_error err;                 /* out: EBB_OK or why this request failed */
} ebb_append;

/* An event read back. Strings are owned by the list that holds the event. */
typedef struct ebb_event {
  int64_t position, version, schema;
  char *stream, *id, *type, *data, *metadata, *recorded_at;
  size_t data_len, metadata_len;
  char *upcast_error; /* NULL, or why a reader could not upcast it (it is then as stored) */
} ebb_event;

typedef struct ebb_event_list {
  ebb_event *items;
  size_t n, cap;
} ebb_event_list;

void ebb_event_list_init(ebb_event_list *l);
void ebb_event_list_clear(ebb_event_list *l); /* frees the events, keeps the list usable */
void ebb_event_list_free(ebb_event_list *l);
/* Adds a copy of the given fields; returns 0 or EBB_ENOMEM. Used by backends. */
int ebb_event_list_push(ebb_event_list *l, const ebb_event *ev);
/* Keeps, in order, only the events for which keep(ud, event) is non-zero; frees the others. */
void ebb_event_list_filter(ebb_event_list *l, int (*keep)(const void *ud, const ebb_event *e),
                           const void *ud);

typedef struct ebb_read_all {
  int64_t after;          /* events with position > after */
  int64_t limit;          /* > 0 */
  const char *category;   /* NULL: any */
  const char *type;       /* NULL: any */
  size_t max_bytes;       /* 0: no bound; else stop once the events read hold this many bytes of
                           * data and metadata (at least one event is read): a reader that must
                           * bound its memory (a subscriber) asks for less with large events */
} ebb_read_all;

/* A saved aggregate state. In a list, strings are owned by the entry. */
typedef struct ebb_snapshot {
  const char *stream;
  int64_t version, position;  /* of the last event folded into it */
  const char *recorded_at;    /* of that event: time queries need it */
  const char *fingerprint;    /* of the code that made it: only that code may load it */
  const char *state;          /* ebb_serialize output */
  size_t state_len;
  const char *created_at;     /* list only */
} ebb_snapshot;

/* One stream as listed by ebb_store_list_streams. Strings are borrowed for the
 * duration of the callback. */
typedef struct ebb_stream_info {
  const char *stream;
  int64_t version;                  /* its last version */
  int64_t first_position, last_position;
  const char *recorded_at;          /* of its last event */
  int deleted;                      /* it ends with a tombstone */
} ebb_stream_info;

/* Which streams ebb_store_list_streams lists: in name order, after `after`. */
typedef struct ebb_list_streams {
  const char *after;      /* NULL or "": from the first */
  const char *prefix;     /* NULL: any; else names starting with it */
  const char *category;   /* NULL: any */
  int64_t limit;          /* > 0 */
} ebb_list_streams;

/* Called once per stream; a non-zero return stops the listing. */
typedef int (*ebb_stream_fn)(void *ud, const ebb_stream_info *info);

/* The metadata field an indexed lookup of related events reads. */
enum ebb_link { EBB_LINK_CORRELATION, EBB_LINK_CAUSATION };

/* Called once per snapshot by ebb_store_snapshot_list (state is NULL there);
 * a non-zero return stops the listing. */
typedef int (*ebb_snapshot_fn)(void *ud, const ebb_snapshot *snap);

typedef struct ebb_store ebb_store;

/* What deciding a command on a stream not cached needs first, asked for
 * several commands at once (see ebb_store_prefetch). */
typedef struct ebb_prefetch {
  const char *stream;     /* in */
  const char *command_id; /* in; NULL: none */
  ebb_event_list *events; /* out: the stream's first events (version 1 on), appended */
  int command_known;      /* out: command_id is stored (handled before) */
  ebb_error err;          /* out: this item's own failure (a bad name); init'd by the caller */
} ebb_prefetch;

struct ebb__append_ops; /* store_backend.h */

typedef struct ebb_store_vtable {
  const char *name;
  const struct ebb__append_ops *append; /* an append transaction's operations */
  int (*read_stream)(ebb_store *, const char *stream, int64_t from, int64_t limit, int backward,
                     ebb_event_list *out, ebb_error *err);
  int (*read_all)(ebb_store *, const ebb_read_all *q, ebb_event_list *out, ebb_error *err);
  int (*read_range)(ebb_store *, int64_t first, int64_t last, ebb_event_list *out, ebb_error *err);
  int (*stream_version)(ebb_store *, const char *stream, int64_t *version, int *deleted,
                        ebb_error *err);
  int (*head)(ebb_store *, int64_t *position, ebb_error *err);
  int (*find_command)(ebb_store *, const char *command_id, ebb_command_record *out, ebb_error *err);
  /* NULL: each item read in turn (read_stream, find_command). Items with
   * err set are skipped. */
  int (*prefetch)(ebb_store *, ebb_prefetch *items, size_t n, int64_t limit, ebb_error *err);
  int (*snapshot_save)(ebb_store *, const ebb_snapshot *snaps, size_t n, ebb_error *err);
  int (*snapshot_load)(ebb_store *, const char *stream, const char *fingerprint,
                       int64_t max_version, const char *max_time, int64_t *version,
                       int64_t *position, ebb_buf *state_buf, ebb_error *err);
  int (*snapshot_list)(ebb_store *, ebb_snapshot_fn fn, void *ud, ebb_error *err);
  int (*snapshot_delete)(ebb_store *, const char *stream, const char *fingerprint, int64_t version,
                         int64_t *deleted, ebb_error *err);
  int (*schema_version)(ebb_store *, int *version, ebb_error *err);
  int (*list_streams)(ebb_store *, const ebb_list_streams *q, ebb_stream_fn fn, void *ud,
                      ebb_error *err);
  int (*read_linked)(ebb_store *, int link, const char *value, int64_t after, int64_t limit,
                     ebb_event_list *out, ebb_error *err);
  void (*close)(ebb_store *);
  int64_t (*wal_pages)(ebb_store *);             /* NULL: no WAL to checkpoint */
  int (*checkpoint)(ebb_store *, ebb_error *err); /* NULL: likewise */
} ebb_store_vtable;

/* fsyncs issued by every SQLite store of the process so far, and their total
 * time: what durability costs, for metrics. */
void ebb_store_sync_stats(uint64_t *count, double *seconds);
/* TEST-ONLY (fault_vfs.c): when EBB_TEST_FAULTS is set, makes the power-cut
 * and fault-injecting VFS the default one; otherwise does nothing. */
void ebb__fault_vfs_install(void);
/* fsyncs of the store that failed in this process, ever (see writer.c). */
uint64_t ebb__store_sync_failures(void);

/* Every backend's handle starts with this. */
struct ebb_store {
  const ebb_store_vtable *vt;
};

/* The backend that opt->uri names: "sqlite" (NULL, "" or "sqlite") or
 * "postgres" (a postgresql:// or postgres:// URI, or a libpq "key=value"
 * string); NULL when it names none. */
const char *ebb_store_backend(const char *uri);
/* Opens the store that opt->uri names. 0 or an EBB_E* code. */
int ebb_store_open(ebb_store **out, const ebb_store_options *opt, ebb_error *err);
/* The backend's name ("sqlite", "postgres") and its schema version. */
const char *ebb_store_kind(const ebb_store *s);
int ebb_store_schema_version(ebb_store *s, int *version, ebb_error *err);
void ebb_store_close(ebb_store *s); /* NULL-safe */
/* Pages in the write-ahead log since this handle's last checkpoint (0 when
 * unknown), and a passive checkpoint: copies what no reader still needs from
 * the log into the database, never waiting for readers. */
int64_t ebb_store_wal_pages(ebb_store *s);
int ebb_store_checkpoint(ebb_store *s, ebb_error *err);

/* Appends each request in one transaction. Returns 0 when the transaction
 * committed, whatever the individual requests' outcomes (see reqs[i].err);
 * a negative code when the transaction itself failed, in which case every
 * request carries that error and nothing was written. Validates names and
 * expected versions before touching the database. */
int ebb_store_append(ebb_store *s, ebb_append *reqs, size_t n, ebb_error *err);
/* The same, all or nothing: the first request that fails rolls the whole
 * transaction back; it keeps its error, and every other request gets
 * EBB_EUNAVAIL ("not appended"). Returns the failing request's code, or 0. */
int ebb_store_append_atomic(ebb_store *s, ebb_append *reqs, size_t n, ebb_error *err);

/* Events of one stream from version `from` (inclusive; 0 or 1 = the start when
 * reading forward, 0 = the end when reading backward), at most `limit` (> 0). */
int ebb_store_read_stream(ebb_store *s, const char *stream, int64_t from, int64_t limit,
                          int backward, ebb_event_list *out, ebb_error *err);
int ebb_store_read_all(ebb_store *s, const ebb_read_all *q, ebb_event_list *out, ebb_error *err);
/* The streams q selects, in name order, each given to fn (see ebb_stream_fn).
 * Walks the (stream, version) index: it costs the events of the streams
 * listed, not the store. */
int ebb_store_list_streams(ebb_store *s, const ebb_list_streams *q, ebb_stream_fn fn, void *ud,
                           ebb_error *err);
/* Events whose metadata's correlation_id (link EBB_LINK_CORRELATION) or
 * causation_id (EBB_LINK_CAUSATION) is `value`, position > after, in
 * position order, at most limit: an index lookup, never a scan. */
int ebb_store_read_linked(ebb_store *s, int link, const char *value, int64_t after,
                          int64_t limit, ebb_event_list *out, ebb_error *err);
/* Events with first <= position <= last, in order. */
int ebb_store_read_range(ebb_store *s, int64_t first, int64_t last, ebb_event_list *out,
                         ebb_error *err);
/* The stream's last version (0 when it does not exist) and, if deleted is not
 * NULL, whether it ends with a tombstone. */
int ebb_store_stream_version(ebb_store *s, const char *stream, int64_t *version, int *deleted,
                             ebb_error *err);
/* Soft-deletes a stream: appends a tombstone (its data {"reason": reason} when
 * reason is not NULL, a JSON string literal's contents are escaped here) with
 * the expected version given (EBB_EXPECT_EXISTS for none). Later appends fail
 * with EBB_EDELETED; the events stay readable. EBB_ENOTFOUND when there is no
 * such stream. */
int ebb_store_delete(ebb_store *s, const char *stream, int64_t expected, const char *reason,
                     ebb_append_result *result, ebb_error *err);
/* The last position in the store; 0 when empty. */
int ebb_store_head(ebb_store *s, int64_t *position, ebb_error *err);
/* 1 and *out filled when command_id was handled before (out->rejection set
 * when it was refused), 0 when not, or < 0. */
int ebb_store_find_command(ebb_store *s, const char *command_id, ebb_command_record *out,
                           ebb_error *err);

/* For each item, its stream's first events (at most limit, > 0) and whether
 * its command id is stored: what a command on a stream not cached needs
 * before it is decided. A backend reads them all at once where a read is a
 * round trip (PostgreSQL: one for every item). An item with a bad name gets
 * its own error (items[i].err) and the others go on; a failure of the store
 * fails the call, and every item with it. */
int ebb_store_prefetch(ebb_store *s, ebb_prefetch *items, size_t n, int64_t limit, ebb_error *err);

/* Saves snapshots in one transaction (a snapshot at the same stream, version
 * and fingerprint is replaced). */
int ebb_store_snapshot_save(ebb_store *s, const ebb_snapshot *snaps, size_t n, ebb_error *err);
/* The newest snapshot of stream by fingerprint at or below max_version (< 0:
 * any) and max_time (canonical RFC 3339; NULL: any): 1 with its version,
 * position and state (appended to the ebb_buf state_buf), 0 when there is
 * none, or < 0. */
int ebb_store_snapshot_load(ebb_store *s, const char *stream, const char *fingerprint,
                            int64_t max_version, const char *max_time, int64_t *version,
                            int64_t *position, ebb_buf *state_buf, ebb_error *err);
int ebb_store_snapshot_list(ebb_store *s, ebb_snapshot_fn fn, void *ud, ebb_error *err);
/* Deletes the snapshots matching stream, fingerprint and version (NULL, NULL,
 * -1: all); *deleted says how many. */
int ebb_store_snapshot_delete(ebb_store *s, const char *stream, const char *fingerprint,
                              int64_t version, int64_t *deleted, ebb_error *err);

/* ---------------------------------------------------------------- links
 *
 * A link is a connection of its own to a store that several processes share
 * (PostgreSQL), driven without blocking by an event loop that watches its
 * socket: ebb_store_link_fd and ebb_store_link_wants say what to wait for,
 * ebb_store_link_step does what the socket allows and reports what it
 * learned. It never blocks, so the loop's owner keeps its thread; this file
 * stays free of any event loop. A store of one process (SQLite) has no
 * links: ebb_store_link_new gives NULL, and that process's own writer is
 * the only source of new events and always the leader.
 *
 *   EBB_LINK_WATCH: LISTENs for commits of every process (each append
 *     transaction notifies on commit) and reads the head after each wake-up
 *     and after every (re)connect: a wake-up, never the data itself, so a
 *     notification lost while disconnected costs nothing.
 *   EBB_LINK_LEADER: asks for the store's leader lock (a session advisory
 *     lock) until it gets it, and holds it while the link lives; whoever
 *     holds it runs the singleton work. A process that dies, or whose link
 *     breaks, loses it, and another link gets it at its next try. */
typedef struct ebb_store_link ebb_store_link;
enum ebb_store_link_kind { EBB_LINK_WATCH = 0, EBB_LINK_LEADER = 1 };
enum { EBB_LINK_READ = 1, EBB_LINK_WRITE = 2 };

typedef struct ebb_store_link_news {
  int64_t head;   /* the store's head read just now; -1: none read in this step */
  int leader;     /* LEADER links: 1 once the lock was granted in this step */
  int retry_ms;   /* LEADER links: > 0: the lock is held elsewhere; call
                   * ebb_store_link_retry after this many milliseconds */
} ebb_store_link_news;

/* A link of `kind` to the store `uri` names; *out is NULL (and 0 returned)
 * when that store is not shared. Not connected yet: call start. */
int ebb_store_link_new(ebb_store_link **out, const char *uri, int kind, ebb_error *err);
/* Starts connecting (dropping any connection the link had). 0 or EBB_EUNAVAIL
 * when it failed at once; then try again later. */
int ebb_store_link_start(ebb_store_link *l, ebb_error *err);
/* The socket to watch (-1: none) and for what (EBB_LINK_READ / _WRITE). The
 * socket may change after a step; the caller then watches the new one. */
int ebb_store_link_fd(const ebb_store_link *l);
int ebb_store_link_wants(const ebb_store_link *l);
/* 1 once connected and set up (listening, or queued for the lock). */
int ebb_store_link_up(const ebb_store_link *l);
/* After the socket was ready: 0, with news filled; or EBB_EUNAVAIL when the
 * connection failed or broke (err says why): the link is down (a leader lost
 * the lock), and start must be called again, after a pause. */
int ebb_store_link_step(ebb_store_link *l, ebb_store_link_news *news, ebb_error *err);
/* Asks again for the leader lock, as a step's news.retry_ms said to. */
int ebb_store_link_retry(ebb_store_link *l, ebb_error *err);
void ebb_store_link_free(ebb_store_link *l); /* NULL-safe */

/* The store's category of a stream: the text before its first '-' (all of it without one). */
size_t ebb_stream_category_len(const char *stream);
/* Validates a stream name, event type or id: non-empty, at most EBB_MAX_NAME bytes, UTF-8,
 * no control characters. `what` names it in the message. */
int ebb_validate_name(const char *what, const char *s, ebb_error *err);
/* Does a stream at version `actual` (0: none) satisfy `expected`? */
int ebb_expected_matches(int64_t expected, int64_t actual);
/* Parses "any", "no_stream", "exists" or a non-negative integer. */
int ebb_parse_expected(const char *s, int64_t *out);

#endif
