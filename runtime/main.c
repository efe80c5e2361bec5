/*
 * main.c: the `ebb` executable. See cli.c.
 */
#include "cli.h"

int main(int argc, char **argv) {
  return ebb_cli_main(argc, argv);
}
