/*
 * runtime.h: ebb's command path. A runtime owns one store and one sandboxed
 * Lua state with the aggregate modules loaded, and turns commands into
 * events: load the stream, fold it with `apply`, run `handle`, append what it
 * returns with the version it saw as the expected version.
 *
 * A runtime belongs to one thread. Commands and results cross this interface
 * as C strings and JSON text, never as Lua values, so any host (CLI, daemon,
 * the Lua binding) can drive it.
 */
#ifndef EBB_RUNTIME_H
#define EBB_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "error.h"
#include "store.h"

typedef struct ebb_runtime ebb_runtime;

typedef struct ebb_runtime_options {
  const char *data_dir;        /* the store's directory */
  const char *store;           /* NULL or "sqlite": data_dir/events.db; else a PostgreSQL URI */
  const char *aggregates_dir;  /* where aggregate modules live */
  const char *lua_dir;         /* the runtime's Lua library; NULL: the built-in default */
  int durability;              /* enum ebb_durability */
  size_t memory_limit;         /* Lua state cap in bytes; 0: the sandbox default */
  int64_t instruction_budget;  /* per call; 0: the sandbox default */
  int64_t cache_size;          /* streams whose folded state is kept; 0: default, < 0: none */
  int exclusive;               /* the store's exclusive lock (see ebb_store_options) */
  int no_snapshots;            /* neither take nor load snapshots */
  int snapshots_read_only;     /* load snapshots, never take or write any (a reader beside a writer) */
} ebb_runtime_options;

#define EBB_DEFAULT_CACHE_SIZE 10000

typedef struct ebb_command {
  const char *aggregate;       /* the module's `type` ("Order") or its file name ("order") */
  const char *id;              /* the aggregate instance: stream = type .. "-" .. id */
  const char *type;            /* the command: a key of the module's `handle` */
  const char *data;            /* JSON object text; NULL: {} */
  size_t data_len;
  const char *metadata;        /* JSON object text; NULL: {} (user_id, correlation_id, free keys) */
  size_t metadata_len;
  int has_expected;            /* 1: `expected` must equal the version loaded */
  int64_t expected;
  const char *command_id;      /* NULL: no deduplication */
} ebb_command;

int ebb_runtime_open(ebb_runtime **out, const ebb_runtime_options *opt, ebb_error *err);
void ebb_runtime_close(ebb_runtime *rt); /* NULL-safe */
ebb_store *ebb_runtime_store(ebb_runtime *rt);

/* Runs a command. On success *result is a malloc'd JSON object
 * {"stream","version","position","events":[...]} (position: the last event's,
 * or the stream's last when the command recorded none). On failure returns the
 * EBB_E* code with err filled (EBB_EREJECTED may carry details) and nothing
 * was appended. */
int ebb_runtime_send(ebb_runtime *rt, const ebb_command *cmd, char **result, ebb_error *err);

/* The same in two halves, so that a host can store the events elsewhere (the
 * daemon's writer thread groups many commands' appends into one commit)
 * while the runtime goes on deciding other commands:
 *
 *   ebb_runtime_decide: folds and runs the handler. Returns 0 with either
 *     *result (a command id handled before: the original answer) or
 *     *decided; or an EBB_E* code and nothing pending (a command id refused
 *     before: EBB_EREJECTED with the original refusal). A command with a
 *     command id that the aggregate refuses is decided too: its append
 *     records the refusal, and finish answers it (EBB_EREJECTED).
 *   ebb_decided_append: the request to store, or NULL when the command
 *     records nothing. It and its memory belong to the decision and may be
 *     handed to ebb_store_append on any thread; the runtime does not touch
 *     them until ebb_runtime_finish.
 *   ebb_runtime_finish: after the append ran (its result and err filled),
 *     caches the new state, queues a snapshot and makes the answer; frees
 *     the decision. EBB_RETRY means the cached state was stale: decide again.
 *
 * The command must stay valid until finish. Commands for one stream must not
 * overlap: decide the next only after the previous one finished. */
typedef struct ebb_decided ebb_decided;
#define EBB_RETRY 1
int ebb_runtime_decide(ebb_runtime *rt, const ebb_command *cmd, ebb_decided **decided,
                       char **result, ebb_error *err);
ebb_append *ebb_decided_append(ebb_decided *dc);
const char *ebb_decided_stream(const ebb_decided *dc);
int ebb_runtime_finish(ebb_runtime *rt, ebb_decided *dc, char **result, ebb_error *err);
void ebb_decided_free(ebb_runtime *rt, ebb_decided *dc); /* without finishing; NULL-safe */

/* Reading off the loop. A host whose store is across a network (PostgreSQL)
 * has what a command folds read on another thread, with a store handle of its
 * own, and hands it over just before deciding, so that the thread deciding
 * never waits for a round trip (or for a server that stopped answering):
 *   ebb_runtime_wants_preload: 1 when deciding a command on stream would read
 *     the store (its state is not cached).
 *   ebb_runtime_preload: the stream's first events (version 1 on, at most
 *     EBB_PRELOAD_EVENTS), moved into the runtime; complete when they are the
 *     whole stream (fewer than asked for); and a command id found unknown
 *     then (NULL: none looked up). Only the next ebb_runtime_decide uses them,
 *     and only if complete and for its stream; any other drops them.
 * What was read may be behind by then (another process appended): the
 * append's version check catches it as it catches a stale cached state
 * (ebb_runtime_finish: EBB_RETRY). When the command's own expected_version
 * does not match what was read, ebb_runtime_decide returns EBB_RETRY with
 * nothing pending: read again and preload that with final set, which the
 * next decision trusts as it trusts a read of its own (a mismatch is then
 * the command's: 409). */
#define EBB_PRELOAD_EVENTS 256
int ebb_runtime_wants_preload(ebb_runtime *rt, const char *stream);
int ebb_runtime_preload(ebb_runtime *rt, const char *stream, ebb_event_list *events, int complete,
                        int final, const char *unknown_command_id);

/* The answer {"stream","version","position","events"} of an append that
 * committed earlier (a repeated command id, an idempotent re-append), read
 * back from the store: its events are at positions first..last (first = 0:
 * it recorded none). */
int ebb_runtime_answer_stored(ebb_runtime *rt, const char *stream, int64_t version,
                              int64_t first, int64_t last, char **result, ebb_error *err);

/* The aggregate's current state as a malloc'd JSON object
 * {"aggregate","id","stream","version","state"}. */
int ebb_runtime_state(ebb_runtime *rt, const char *aggregate, const char *id, char **result,
                      ebb_error *err);

/* The state as it was after `version` (>= 0; -1: no limit), or at time `at`
 * (RFC 3339, any offset; NULL: no limit): the stream's events up to that point folded,
 * {"aggregate","id","stream","version","position","state"}. Before the first
 * event it is the initial state at version 0. */
int ebb_runtime_state_at(ebb_runtime *rt, const char *aggregate, const char *id, int64_t version,
                         const char *at, char **result, ebb_error *err);

/* Writes the snapshots taken since the last flush, in one transaction of
 * their own. Commands only take (serialize) snapshots; writing them waits for
 * this, which ebb_runtime_close also does, so no answer waits for it. */
int ebb_runtime_flush(ebb_runtime *rt, ebb_error *err);

/* Snapshots taken and not yet written, moved out of the runtime so that
 * another thread can write them (into its own store handle on the same
 * data). NULL when there are none. */
typedef struct ebb_snapshot_batch ebb_snapshot_batch;
ebb_snapshot_batch *ebb_runtime_take_snapshots(ebb_runtime *rt);
int ebb_snapshot_batch_write(ebb_snapshot_batch *b, ebb_store *s, ebb_error *err);
size_t ebb_snapshot_batch_size(const ebb_snapshot_batch *b);
void ebb_snapshot_batch_free(ebb_snapshot_batch *b); /* NULL-safe */

/* The stream an aggregate instance lives in ("order", "o-1" -> "Order-o-1"). */
int ebb_runtime_stream_of(ebb_runtime *rt, const char *aggregate, const char *id,
                          char stream[EBB_MAX_NAME + 1], ebb_error *err);

/* Loads the aggregate modules again (after they changed). If any fails to
 * load or validate, the running ones stay, report gets one line per problem
 * and EBB_ESCRIPT is returned. Cached states are dropped on success. */
int ebb_runtime_reload(ebb_runtime *rt, ebb_buf *report, ebb_error *err);

/* Appends one JSON line per stored snapshot: {stream, version, position,
 * recorded_at, fingerprint, bytes, created_at, current} (current: made by the
 * code loaded now, so it will be used). */
int ebb_runtime_snapshots(ebb_runtime *rt, ebb_buf *out, ebb_error *err);
/* Deletes the snapshots of stream (NULL: all), only the stale ones (made by
 * other code) if stale_only. */
int ebb_runtime_delete_snapshots(ebb_runtime *rt, const char *stream, int stale_only,
                                 int64_t *deleted, ebb_error *err);

/* Cache figures for metrics: entries, capacity, hits, misses, evictions. */
void ebb_runtime_cache_stats(ebb_runtime *rt, size_t *size, size_t *max, uint64_t *hits,
                             uint64_t *misses, uint64_t *evictions);

/* Appends one line per problem found while loading and validating the
 * modules ("order.lua:12: ..."); returns the number of problems. */
int ebb_runtime_check(ebb_runtime *rt, ebb_buf *report);

/* Brings stored events of an older schema to their type's current schema
 * through the aggregate modules' upcasters, in the list (the store is never
 * changed). EBB_ESCRIPT, naming the event's position, type and schema, when
 * an upcaster is missing or fails; the list may then be partly upcast. */
int ebb_runtime_upcast(ebb_runtime *rt, ebb_event_list *events, ebb_error *err);
/* The same for readers that must not fail as a whole for one event: an event
 * that cannot be upcast stays as stored (type, schema, data) with its
 * upcast_error set, and the others are upcast. Fails only when the modules
 * cannot run at all. */
int ebb_runtime_upcast_each(ebb_runtime *rt, ebb_event_list *events, ebb_error *err);

/* 0 when events of `type` at `schema` can be stored: EBB_EBADREQ when the
 * aggregate modules declare the type at an older schema (its events would
 * be unreadable by this code, and by every reader of the store). */
int ebb_runtime_check_schema(const ebb_runtime *rt, const char *type, int64_t schema,
                             ebb_error *err);

/* Appends the loaded aggregates as a JSON array, in type order: each
 * {"type", "file", "commands": [names], "events": [{"type", "schema"}]}
 * (events: those it applies or declares a schema for). GET /modules. */
int ebb_runtime_modules(ebb_runtime *rt, ebb_buf *out, ebb_error *err);

/* The schema version the modules declare for an event type (1 when none
 * does): what a raw append writes when the writer names none. */
int64_t ebb_runtime_schema_of(const ebb_runtime *rt, const char *type);

/* Pushes the event as the Lua table modules see: {stream, version, id, type,
 * schema, recorded_at, data, metadata} and, with_position (the consumers of the
 * global order), position and aggregate_id (the stream's id part). Raises
 * if its data or metadata cannot be read. Protected context. */
struct lua_State;
void ebb_event_push(struct lua_State *L, const ebb_event *e, int with_position);

/* A lua_CFunction for a new sandbox: loads the runtime library (`require
 * "ebb"`) and gives it the JSON null. Aggregates and projections both run it. */
int ebb__lua_prepare(struct lua_State *L);

/* Appends {"stream","version","position","events":[...]} for n events that
 * were just appended as `in` with result r (their recorded_at set by the
 * caller): the answer a command or an append gives, without reading back. */
void ebb_append_answer(ebb_buf *out, const char *stream, const ebb_append_result *r,
                       const ebb_event_in *in, size_t n);

/* Appends the JSON text of an event read from the store (without a newline). */
void ebb_event_to_json(const ebb_event *e, ebb_buf *out);

#endif
