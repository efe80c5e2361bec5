/*
 * pg_link.c: links to a PostgreSQL store (see "links" in store.h), the
 * connections a daemon keeps beside its store handles to learn of other
 * daemons' commits and to hold the leader lock. Everything here is libpq's
 * asynchronous API (PQconnectStartParams, PQconnectPoll, PQsendQuery,
 * PQconsumeInput): a step never blocks, and the caller's event loop waits on
 * the socket.
 *
 * Watch: LISTEN on the channel every append notifies on COMMIT, then read the
 * head. A notification is only a wake-up (its payload names the schema, so a
 * store in another schema of the same database is ignored): the head is read
 * again after it, one query at a time, so a burst of commits costs one read,
 * and a reader never trusts a number it was sent. After a reconnect the first
 * head read covers whatever was committed while the link was down.
 *
 * Leader: `pg_try_advisory_lock` on the link's own connection, asked again
 * every LEADER_RETRY_MS while another session holds it (news.retry_ms), so a
 * standby takes over within that pause once the holder's session ends (its
 * process died or its connection broke). It never waits for the lock inside
 * a statement (pg_advisory_lock): a statement keeps its snapshot while it
 * waits, and for as long as a standby waited, no row version deleted in the
 * whole cluster could be removed, the position counter's among them, whose
 * dead versions every append then walked through. The lock's key is a
 * constant and the schema's hash, so stores in other schemas elect their own
 * leaders. Keepalives (unless the URI sets its own) detect a server that
 * vanished without closing the connection.
 */
#include "store_backend.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* pg_advisory_lock's first key: "ebbl" in ASCII. */
#define LEADER_KEY "1700946540"
#define LEADER_RETRY_MS 500
#define TRY_LOCK "SELECT pg_try_advisory_lock(" LEADER_KEY ", hashtext(current_schema()))"
/* The watch link's head read, prepared once per connection: it runs after
 * every burst of commits, and planning it each time cost the server more
 * than running it (perf: 57% of that backend's CPU parsing and planning).
 * Without parameters its one plan is made at once, and kept: without
 * sequential scans (as on the store's connections, postgres.c), lest a plan
 * made while the table looked empty scan it whole at every wake-up. */
#define HEAD_PLAN "ebb_head"

enum { DOWN, CONNECTING, QUERY, IDLE };

typedef struct pg_link {
  ebb_store_link base;
  int kind;
  char *uri;
  PGconn *conn;
  int state;
  int wants;          /* EBB_LINK_READ / EBB_LINK_WRITE */
  int again;          /* watch: a wake-up came while a head read was running */
  int leader;         /* the lock is held */
  int refused;        /* leader: the last try found the lock held elsewhere */
  char schema[256];   /* watch: the payload that concerns this store */
} pg_link;

static void trim(char *msg) {
  size_t n = strlen(msg);
  while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' ')) msg[--n] = '\0';
}

static void drop(pg_link *l) {
  if (l->conn) PQfinish(l->conn);
  l->conn = NULL;
  l->state = DOWN;
  l->wants = 0;
  l->again = 0;
  l->leader = 0;
  l->refused = 0;
}

/* The link broke: why, and down it goes. */
static int fail(pg_link *l, ebb_error *err, const char *doing, PGresult *res) {
  char msg[512];
  snprintf(msg, sizeof msg, "%s",
           res && PQresultErrorMessage(res)[0] ? PQresultErrorMessage(res)
           : l->conn                           ? PQerrorMessage(l->conn)
                                               : "no connection");
  trim(msg);
  if (res) PQclear(res);
  drop(l);
  return ebb_error_set(err, EBB_EUNAVAIL, "%s: %s", doing, msg[0] ? msg : "connection lost");
}

/* Sends sql; the answer comes in later steps. */
static int send(pg_link *l, const char *sql, ebb_error *err) {
  if (!PQsendQuery(l->conn, sql)) return fail(l, err, "sending a query", NULL);
  l->state = QUERY;
  int f = PQflush(l->conn);
  if (f < 0) return fail(l, err, "sending a query", NULL);
  l->wants = EBB_LINK_READ | (f ? EBB_LINK_WRITE : 0);
  return 0;
}

static int link_start(ebb_store_link *base, ebb_error *err) {
  pg_link *l = (pg_link *)base;
  drop(l);
  /* Defaults first: the URI, expanded in place of dbname, overrides them. */
  const char *const keys[] = {"connect_timeout", "keepalives_idle", "keepalives_interval",
                              "keepalives_count", "application_name", "dbname", NULL};
  const char *const values[] = {"10", "10", "5", "3",
                                l->kind == EBB_LINK_LEADER ? "ebb leader" : "ebb watch", l->uri,
                                NULL};
  l->conn = PQconnectStartParams(keys, values, 1);
  if (l->conn == NULL) return ebb_error_set(err, EBB_ENOMEM, "out of memory connecting");
  if (PQstatus(l->conn) == CONNECTION_BAD)
    return fail(l, err, "cannot connect to the PostgreSQL store", NULL);
  l->state = CONNECTING;
  l->wants = EBB_LINK_WRITE;
  return 0;
}

static int link_fd(const ebb_store_link *base) {
  const pg_link *l = (const pg_link *)base;
  return l->conn ? PQsocket(l->conn) : -1;
}

static int link_wants(const ebb_store_link *base) {
  return ((const pg_link *)base)->wants;
}

static int link_up(const ebb_store_link *base) {
  const pg_link *l = (const pg_link *)base;
  return l->state == QUERY || l->state == IDLE;
}

static int connected(pg_link *l, ebb_error *err) {
  if (PQsetnonblocking(l->conn, 1) != 0) return fail(l, err, "setting up the connection", NULL);
  /* LISTEN takes effect when its transaction commits: the head is read
   * after that, in a transaction of its own. Read in the same one, a commit
   * landing between the read's snapshot and the LISTEN's commit would be in
   * neither the head nor a notification, and this daemon would not see it
   * until the next commit anywhere. */
  if (l->kind == EBB_LINK_WATCH)
    return send(l,
                "BEGIN; LISTEN " EBB__PG_CHANNEL "; COMMIT; SET enable_seqscan = off; PREPARE "
                HEAD_PLAN " AS SELECT " EBB__PG_HEAD "; SELECT current_schema(), (SELECT "
                EBB__PG_HEAD ")",
                err);
  return send(l, TRY_LOCK, err);
}

/* One result of the query in flight. */
static int take(pg_link *l, PGresult *res, ebb_store_link_news *news, ebb_error *err) {
  ExecStatusType st = PQresultStatus(res);
  if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK)
    return fail(l, err,
                l->kind == EBB_LINK_LEADER ? "waiting for the leader lock" : "watching the store",
                res);
  if (st == PGRES_TUPLES_OK && PQntuples(res) > 0) {
    if (l->kind == EBB_LINK_LEADER) {
      if (strcmp(PQgetvalue(res, 0, 0), "t") == 0) {
        l->leader = 1;
        news->leader = 1;
      } else {
        l->refused = 1;
      }
    } else {
      int col = PQnfields(res) - 1;
      if (PQnfields(res) == 2)
        snprintf(l->schema, sizeof l->schema, "%s", PQgetvalue(res, 0, 0));
      if (!PQgetisnull(res, 0, col)) news->head = strtoll(PQgetvalue(res, 0, col), NULL, 10);
    }
  }
  PQclear(res);
  return 0;
}

static int link_step(ebb_store_link *base, ebb_store_link_news *news, ebb_error *err) {
  pg_link *l = (pg_link *)base;
  if (l->state == DOWN)
    return ebb_error_set(err, EBB_EUNAVAIL, "the link to the PostgreSQL store is not connected");
  if (l->state == CONNECTING) {
    switch (PQconnectPoll(l->conn)) {
      case PGRES_POLLING_READING: l->wants = EBB_LINK_READ; return 0;
      case PGRES_POLLING_WRITING: l->wants = EBB_LINK_WRITE; return 0;
      case PGRES_POLLING_OK: return connected(l, err);
      default: return fail(l, err, "cannot connect to the PostgreSQL store", NULL);
    }
  }
  if (!PQconsumeInput(l->conn)) return fail(l, err, "the PostgreSQL store connection broke", NULL);
  if (l->state == QUERY) {
    int f = PQflush(l->conn);
    if (f < 0) return fail(l, err, "sending a query", NULL);
    l->wants = EBB_LINK_READ | (f ? EBB_LINK_WRITE : 0);
    while (!PQisBusy(l->conn)) {
      PGresult *res = PQgetResult(l->conn);
      if (res == NULL) {
        l->state = IDLE;
        l->wants = EBB_LINK_READ;
        break;
      }
      if (take(l, res, news, err)) return err->code;
    }
  }
  PGnotify *n;
  while ((n = PQnotifies(l->conn)) != NULL) {
    if (l->kind == EBB_LINK_WATCH && strcmp(n->extra, l->schema) == 0) l->again = 1;
    PQfreemem(n);
  }
  if (l->state == IDLE && l->refused) {
    l->refused = 0;
    news->retry_ms = LEADER_RETRY_MS;
  }
  if (l->state == IDLE && l->again) {
    l->again = 0;
    if (send(l, "EXECUTE " HEAD_PLAN, err)) return err->code;
  }
  if (PQstatus(l->conn) != CONNECTION_OK)
    return fail(l, err, "the PostgreSQL store connection broke", NULL);
  return 0;
}

static int link_retry(ebb_store_link *base, ebb_error *err) {
  pg_link *l = (pg_link *)base;
  if (l->kind != EBB_LINK_LEADER || l->leader) return 0;
  /* Busy (connecting, or a try in flight): whatever it answers, ask again
   * once the link is idle. */
  if (l->state != IDLE) {
    l->refused = 1;
    return 0;
  }
  return send(l, TRY_LOCK, err);
}

static void link_free(ebb_store_link *base) {
  pg_link *l = (pg_link *)base;
  drop(l);
  free(l->uri);
  free(l);
}

static const ebb_store_link_vtable pg_link_vtable = {
    .start = link_start,
    .fd = link_fd,
    .wants = link_wants,
    .up = link_up,
    .step = link_step,
    .retry = link_retry,
    .free = link_free,
};

int ebb__store_postgres_link_new(ebb_store_link **out, const char *uri, int kind, ebb_error *err) {
  *out = NULL;
  pg_link *l = calloc(1, sizeof *l);
  if (l == NULL || (l->uri = strdup(uri)) == NULL) {
    free(l);
    return ebb_error_set(err, EBB_ENOMEM, "out of memory");
  }
  l->base.vt = &pg_link_vtable;
  l->kind = kind;
  l->state = DOWN;
  *out = &l->base;
  return 0;
}
