/*
 * append.c: what an append decides, written once for every backend (see
 * ebb__append_ops in store_backend.h). Expected versions, deleted streams,
 * command-id dedupe (refused commands included), idempotent re-sends by
 * event id, the numbering of versions and positions, batches whose requests
 * fail alone or all together, and the message of every error an append
 * answers are all here; a backend only opens its transaction, shows what is
 * stored (including what this transaction wrote so far), writes what was
 * accepted and commits.
 *
 * Requests are decided in order, each seeing the ones before it. A backend
 * may answer the questions from the database as they come (SQLite) or from
 * what it read for the whole batch at once (PostgreSQL): the decisions are
 * the same.
 */
#include "store_backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"

/* How a request ended. STALE: read without the lock, what it saw cannot
 * decide it (see begin_unlocked): the batch is decided again, locked. */
enum { WROTE, ANSWERED, FAILED, LOST, STALE };

/* A stream's version read without the lock may be behind, never ahead, and a
 * tombstone stays: is a mismatch with what was read a mismatch now too? */
static int surely_mismatched(int64_t expected, int64_t seen) {
  if (expected == EBB_EXPECT_NO_STREAM) return seen > 0;
  if (expected >= 0) return seen > expected;
  return 0; /* exists, with nothing seen: the stream may exist by now */
}

static int version_error(ebb_append *r, int64_t actual) {
  char buf[24];
  ebb_error_set(&r->err, EBB_EVERSION, "wrong expected version for %s: expected %s, actual %lld",
                r->stream, ebb_expected_name(r->expected, buf, sizeof buf), (long long)actual);
  r->err.expected = r->expected;
  r->err.actual = actual;
  return EBB_EVERSION;
}

/* Are r's events already stored, exactly where r would have put them? 1: yes
 * (r->result holds the original result), 0: none of its ids is stored, < 0:
 * some are stored elsewhere, or only some are stored (r->err says which).
 * Called before anything of r is written. */
static int find_resend(const ebb__append_ops *ops, ebb_store *s, ebb_append *r) {
  size_t found = 0;
  int64_t first_version = 0, first_position = 0, last_version = 0, last_position = 0;
  const char *first_found = NULL;
  ebb__event_place at;
  for (size_t i = 0; i < r->n; i++) {
    int rc = ops->event(s, r->events[i].id, &at, &r->err);
    if (rc < 0) return rc;
    if (rc == 0) continue;
    if (found == 0) {
      first_found = r->events[i].id;
      first_version = at.version;
      first_position = at.position;
    }
    if (strcmp(at.stream, r->stream) != 0 || at.version != first_version + (int64_t)i || found != i)
      return ebb_error_set(&r->err, EBB_ECONFLICT,
                           "event id %s is already stored in stream %s at version %lld",
                           r->events[i].id, at.stream, (long long)at.version);
    last_version = at.version;
    last_position = at.position;
    found++;
  }
  if (found == 0) return 0;
  /* Where this request would have put its first event; 0: anywhere. */
  int64_t want_first = r->expected >= 0                      ? r->expected + 1
                       : r->expected == EBB_EXPECT_NO_STREAM ? 1
                                                             : 0;
  if (found == r->n && (want_first == 0 || first_version == want_first) &&
      (r->expected != EBB_EXPECT_EXISTS || first_version > 1)) {
    ebb_error_clear(&r->err);
    r->result.first_version = first_version;
    r->result.version = last_version;
    r->result.first_position = first_position;
    r->result.position = last_position;
    r->result.idempotent = 1;
    return 1;
  }
  return ebb_error_set(&r->err, EBB_ECONFLICT,
                       "event id %s is already stored in %s at version %lld, and %zu of the %zu "
                       "events are; an idempotent re-send must repeat exactly the same events at "
                       "the same place",
                       first_found, r->stream, (long long)first_version, found, r->n);
}

/* A command id handled before answers with what that command did: its
 * result, or its refusal (whether this request is a refusal or events: the
 * first decision stands). */
static int answer_command(ebb_append *r, const ebb_command_record *rec) {
  if (strcmp(rec->stream, r->stream) != 0 ||
      (r->command_type && strcmp(rec->type, r->command_type) != 0))
    return ebb_error_set(&r->err, EBB_ECONFLICT, "command id %s was already used for %s on %s",
                         r->command_id, rec->type, rec->stream);
  if (rec->rejection) return ebb_error_from_json(&r->err, rec->rejection, strlen(rec->rejection));
  r->result.first_position = rec->first_position;
  r->result.position = rec->position;
  r->result.version = rec->version;
  r->result.first_version =
      rec->first_position ? rec->version - (rec->position - rec->first_position) : rec->version;
  r->result.idempotent = 1;
  return 0;
}

/* Decides one request inside the open transaction and writes it when it is
 * accepted, its events taking the positions after *head. own_savepoint: the
 * batch has other requests, so a failed write must be undone alone.
 * unlocked: the batch was read by begin_unlocked. Stored command records and
 * event places never change, so answers from them stand; a write of events
 * is checked by the commit (its version or ids clash); everything else that
 * depends on a stream's version being current is STALE. */
static int decide(const ebb__append_ops *ops, ebb_store *s, ebb_append *r, int64_t *head,
                  const char *now, int own_savepoint, int unlocked, ebb_error *txerr) {
  if (r->command_id) {
    ebb_command_record rec;
    rec.rejection = NULL;
    int found = ops->command(s, r->command_id, &rec, &r->err);
    if (found < 0) return FAILED;
    if (found) {
      int rc = answer_command(r, &rec);
      ebb_command_record_clear(&rec);
      return rc ? FAILED : ANSWERED;
    }
  }
  ebb__stream_state st;
  if (ops->stream(s, r->stream, r->n == 0 && !r->rejection, &st, &r->err)) return FAILED;
  if (st.deleted) {
    /* A re-send of what was stored before the tombstone (an export imported
     * again, with it) is answered like any other; anything else is refused. */
    int rc = r->n ? find_resend(ops, s, r) : 0;
    if (rc > 0) return ANSWERED;
    if (rc < 0 && r->err.code != EBB_ECONFLICT) return FAILED;
    ebb_error_clear(&r->err);
    ebb_error_set(&r->err, EBB_EDELETED,
                  "stream %s was deleted at version %lld; its events stay readable", r->stream,
                  (long long)st.version);
    return FAILED;
  }
  if (!ebb_expected_matches(r->expected, st.version)) {
    int rc = r->n ? find_resend(ops, s, r) : 0;
    /* Unlocked, the ids were read after the stream: refused for an id stored
     * elsewhere, the stream may have been deleted in between, which the
     * locked path answers first. */
    if (rc < 0 && unlocked) return STALE;
    if (rc != 0) return rc > 0 ? ANSWERED : FAILED;
    if (unlocked && !surely_mismatched(r->expected, st.version)) return STALE;
    version_error(r, st.version);
    return FAILED;
  }
  /* Nothing of it would clash at the commit if the stream moved meanwhile. */
  if (unlocked && r->n == 0) return STALE;
  r->result.first_version = r->n ? st.version + 1 : st.version;
  r->result.version = st.version + (int64_t)r->n;
  if (r->n) {
    r->result.first_position = *head + 1;
    r->result.position = *head + (int64_t)r->n;
  } else if (st.version > 0 && !r->rejection) {
    r->result.position = st.position; /* a command that recorded nothing */
  }
  if (own_savepoint && ops->savepoint && ops->savepoint(s, txerr)) return LOST;
  int rc = ops->write(s, r, now, &r->err);
  if (own_savepoint && ops->release && ops->release(s, rc != 0, txerr)) return LOST;
  if (rc == 0) {
    *head += (int64_t)r->n;
    return WROTE;
  }
  memset(&r->result, 0, sizeof r->result);
  if (rc != EBB__CLASH) return FAILED;
  /* Only an event id can clash: the version was checked in this transaction.
   * A clash at the request's first event may be an idempotent re-send (the
   * expected version allowed the append, e.g. "any"); a later one never is.
   * When r is the batch's only request, what it wrote before the clash is
   * still in the transaction, which is rolled back: the answer is the same,
   * since the clashing id is then stored outside what r wrote. */
  ebb_error clash;
  ebb_error_init(&clash);
  ebb_error_move(&clash, &r->err);
  rc = find_resend(ops, s, r);
  if (rc == 0) ebb_error_move(&r->err, &clash); /* none found after all: the write's own error */
  ebb_error_clear(&clash);
  if (rc <= 0 && unlocked) return STALE; /* as above */
  return rc > 0 ? ANSWERED : FAILED;
}

/* Positions past start (given by this batch) move by moved (see commit). */
static void move_results(ebb_append *reqs, size_t n, int64_t start, int64_t moved) {
  for (size_t i = 0; i < n; i++) {
    ebb_append_result *res = &reqs[i].result;
    if (reqs[i].err.code) continue;
    if (res->first_position > start) res->first_position += moved;
    if (res->position > start) res->position += moved;
  }
}

int ebb__append_run(ebb_store *s, ebb_append *reqs, size_t n, int atomic, ebb_error *err) {
  const ebb__append_ops *ops = s->vt->append;
  char now[EBB_TIME_LEN + 1];
  ebb_clock_format(ebb_clock_now_ms(), now);
  ebb_error txerr;
  ebb_error_init(&txerr);
  /* The requests refused by store.c's checks, to tell them apart when a
   * batch read without the lock is decided again. A daemon's batches fit
   * the buffer on the stack. */
  unsigned char small[256];
  unsigned char *refused =
      ops->begin_unlocked == NULL ? NULL : n <= sizeof small ? small : malloc(n);
  int unlocked = refused != NULL;
  for (size_t i = 0; unlocked && i < n; i++) refused[i] = reqs[i].err.code != 0;
again:;
  int64_t head = 0, start = 0, moved = 0;
  size_t failed = 0;
  int wrote = 0;
  if ((unlocked ? ops->begin_unlocked : ops->begin)(s, reqs, n, &head, &txerr)) goto fail;
  start = head;
  for (size_t i = 0; i < n; i++) {
    ebb_append *r = &reqs[i];
    if (r->err.code == 0) { /* else refused by the checks in store.c */
      int how = decide(ops, s, r, &head, now, n > 1, unlocked, &txerr);
      if (how == LOST) goto fail;
      if (how == STALE) goto locked;
      if (how == WROTE) wrote = 1;
      if (how != FAILED) continue;
    }
    memset(&r->result, 0, sizeof r->result);
    if (atomic) {
      failed = i;
      goto undo_all;
    }
    /* A failure that took the transaction with it fails the others too. */
    if (n > 1 && ops->lost && ops->lost(s)) {
      ebb_error_move(&txerr, &r->err);
      goto fail;
    }
  }
  /* Nothing new (all failed or were answered): write nothing, release the lock. */
  if (!wrote) {
    ops->rollback(s);
    goto done;
  }
  int rc = ops->commit(s, head, &moved, &txerr);
  if (rc == EBB__STALE && unlocked) goto locked;
  if (rc == EBB__STALE) /* only an unlocked batch can be behind: a backend's bug */
    ebb_error_set(&txerr, EBB_ESTORE, "committing: a batch read under the lock was behind");
  if (rc) goto fail;
  move_results(reqs, n, start, moved);
done:
  if (refused != small) free(refused);
  return 0;
locked:
  ops->rollback(s);
  ebb_error_clear(&txerr);
  for (size_t i = 0; i < n; i++) {
    memset(&reqs[i].result, 0, sizeof reqs[i].result);
    if (!refused[i]) ebb_error_clear(&reqs[i].err);
  }
  unlocked = 0;
  goto again;
undo_all:
  ops->rollback(s);
  if (refused != small) free(refused);
  for (size_t i = 0; i < n; i++) {
    memset(&reqs[i].result, 0, sizeof reqs[i].result);
    if (i == failed) continue;
    ebb_error_clear(&reqs[i].err);
    ebb_error_set(&reqs[i].err, EBB_EUNAVAIL, "not appended: request %zu of this append failed",
                  failed + 1);
  }
  return reqs[failed].err.code;
fail:
  ops->rollback(s);
  if (refused != small) free(refused);
  for (size_t i = 0; i < n; i++) {
    memset(&reqs[i].result, 0, sizeof reqs[i].result);
    ebb_error_clear(&reqs[i].err);
    ebb_error_set(&reqs[i].err, txerr.code, "%s", txerr.message);
  }
  int code = txerr.code;
  if (err) ebb_error_move(err, &txerr);
  ebb_error_clear(&txerr);
  return code;
}
