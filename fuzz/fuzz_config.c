/*
 * fuzz_config.c: loading a Lua config file (runtime/config.c) whose text is
 * the input. Any text must end in a loaded config or a clean error, within
 * the bounds a config file runs under (instructions, memory): never a
 * crash, a hang or a leak. What loads is then validated and dumped as
 * `ebb config` does.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#include "buf.h"
#include "config.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* The file lives in memory: no disk traffic per input. */
  static int fd = -1;
  static char path[64];
  if (fd < 0) {
    fd = memfd_create("ebb-fuzz-config.lua", 0);
    if (fd < 0) abort();
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  }
  if (ftruncate(fd, 0) != 0 || (size && pwrite(fd, data, size, 0) != (ssize_t)size)) abort();
  ebb_config c;
  ebb_config_init(&c);
  ebb_error err;
  ebb_error_init(&err);
  if (ebb_config_load_file(&c, path, &err) == 0) {
    ebb_config_validate(&c, &err);
    ebb_error_clear(&err);
    char host[256];
    int port;
    ebb_config_listen(&c, host, sizeof host, &port, &err);
    ebb_buf b = EBB_BUF_INIT;
    ebb_config_dump(&c, &b);
    ebb_buf_free(&b);
  } else {
    FUZZ_CHECK(err.code != 0 && err.message[0] != '\0', "a failed load gave no message");
  }
  ebb_error_clear(&err);
  ebb_config_free(&c);
  return 0;
}
