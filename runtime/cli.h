/*
 * cli.h: the `ebb` command line. main() only calls ebb_cli_main; everything
 * it does is reachable from here, and it is the only place that turns
 * error kinds into exit codes.
 */
#ifndef EBB_CLI_H
#define EBB_CLI_H

/* Exit codes, one per kind of failure (documented in README.md). */
enum {
  EBB_EXIT_OK = 0,
  EBB_EXIT_FAILURE = 1,   /* storage, out of memory, anything unexpected */
  EBB_EXIT_USAGE = 2,     /* bad command line */
  EBB_EXIT_NOTFOUND = 3,  /* unknown aggregate, command or stream */
  EBB_EXIT_CONFLICT = 4,  /* wrong expected version, or an id already used elsewhere */
  EBB_EXIT_REJECTED = 5,  /* the aggregate refused the command (ebb.reject) */
  EBB_EXIT_SCRIPT = 6,    /* a module failed: Lua error, budget, memory cap, `ebb check` problems */
  EBB_EXIT_INVALID = 7,   /* invalid input: malformed JSON, bad names */
  EBB_EXIT_BUSY = 8,      /* the data directory is locked by another writer */
  EBB_EXIT_DELETED = 9    /* the stream was deleted (a tombstone closes it) */
};

int ebb_cli_main(int argc, char **argv);

#endif
