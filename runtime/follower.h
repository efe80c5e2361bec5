/*
 * follower.h: the checkpointed reader of the global event order that every
 * consumer of the store shares (projections, reactors, publishers). It owns
 * what a consumer needs to know where it is and what it reads: its
 * checkpoint, the fingerprint written with it (the id of the last event read
 * at or before it), the categories and event types its `from` names, and the
 * positions an operator skipped.
 *
 * One read gives the next batch after the checkpoint: read up to `limit`
 * events, keep those `from` names and that were not skipped (before
 * upcasting: an event the consumer does not read, even one no code can
 * upcast, must not stop it), upcast them, and cut the batch at the first
 * event that cannot be upcast. The consumer runs the batch its own way and
 * moves the checkpoint with ebb_follower_done once what it did is durable.
 *
 * It also tells a checkpoint that is ahead of the store (the store was
 * restored or lost events the consumer saw): such a consumer must start
 * again from 0, never trust what it built.
 *
 * A follower belongs to one thread; it holds no store handle of its own.
 */
#ifndef EBB_FOLLOWER_H
#define EBB_FOLLOWER_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "runtime.h"
#include "store.h"

/* The states every follower reports, with the same names in every status. */
enum { EBB_FOLLOW_CATCHING_UP, EBB_FOLLOW_LIVE, EBB_FOLLOW_REBUILDING, EBB_FOLLOW_FAULTED,
       EBB_FOLLOW_STOPPED, EBB_FOLLOW_N_STATES };
extern const char *const ebb_follow_state_names[EBB_FOLLOW_N_STATES];

typedef struct ebb_follower {
  int64_t position;               /* the checkpoint: everything up to it is done */
  int64_t mark_position;          /* the fingerprint: the last event read at or before */
  char mark_id[EBB_MAX_NAME + 1]; /* the checkpoint (0, "": none) */
  char **from;                    /* categories or event types */
  size_t n_from;
  int64_t *skipped;               /* positions skipped by an operator, sorted */
  size_t n_skipped;
} ebb_follower;

/* Frees from and skipped (not the struct, which its owner embeds). NULL-safe. */
void ebb_follower_clear(ebb_follower *f);
/* Adds a category or event type to `from`: 0, or -1 out of memory. */
int ebb_follower_add_from(ebb_follower *f, const char *category_or_type);
/* Replaces the skipped positions (any order; the follower takes the array). */
void ebb_follower_set_skipped(ebb_follower *f, int64_t *positions, size_t n);
/* Moves from and skipped of src into f (a reload of the same consumer). */
void ebb_follower_take(ebb_follower *f, ebb_follower *src);

/* Does `from` name the event's category or type? (An empty `from` names every event.) */
int ebb_follower_matches(const ebb_follower *f, const ebb_event *e);
int ebb_follower_is_skipped(const ebb_follower *f, int64_t position);

typedef struct ebb_follower_batch {
  ebb_event_list events; /* the events the follower reads, upcast, in order */
  size_t n;              /* how many of them to run: all but the first that cannot be
                            upcast and those after it */
  int64_t checkpoint;    /* the checkpoint once those n ran */
  const ebb_event *bad;  /* events.items[n] when it cannot be upcast (a fault), or NULL */
  int64_t read_to;       /* the checkpoint once every event read ran, the bad one included
                            (a consumer that passes such an event on as stored, with its
                            upcast_error, as GET /events does) */
} ebb_follower_batch;

/* Reads the next batch after the checkpoint, up to `limit` events read from
 * the store, with the store head at `head`. Returns 1 with a batch to run
 * (n may be 0: none of the events read is the follower's, or the first is
 * bad; the checkpoint still moves to b->checkpoint), 0 when there is nothing to run
 * (the checkpoint moved on to what it read, and the fingerprint with it: write
 * it when convenient), -1 with err when the store cannot be read, or -2 with
 * err (and the events read, unrun, in the batch) when the modules cannot
 * upcast at all. The batch is the caller's to free in every case. Sets the fingerprint to go with
 * b->checkpoint. */
int ebb_follower_read(ebb_follower *f, ebb_runtime *rt, int64_t head, int64_t limit,
                      ebb_follower_batch *b, ebb_error *err);
/* Sets the fingerprint for a checkpoint at the (kept) event e: when only a
 * prefix of a batch is done. */
void ebb_follower_mark(ebb_follower *f, const ebb_event *e);
void ebb_follower_batch_free(ebb_follower_batch *b);

/* Has the consumer seen events the store does not hold (its checkpoint past
 * the store's head, or its fingerprint event gone or replaced)? A malloc'd
 * reason naming the consumer as `who` ("the read model"), or NULL (also
 * when the store cannot tell: reading fails soon enough). */
char *ebb_follower_ahead(const ebb_follower *f, ebb_store *store, const char *who);

#endif
