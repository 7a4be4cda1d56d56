// Thin shims for Linux calls Swift's Glibc module does not import (they need _GNU_SOURCE).
#ifndef C_STASIS_LINUX_H
#define C_STASIS_LINUX_H

#include <stdint.h>

/// Starts writeback of a file range without waiting for it (sync_file_range with SYNC_FILE_RANGE_WRITE),
/// so a later fsync finds little left to write. Returns 0, or -1 with errno set.
int stasis_start_writeback(int fd, int64_t offset, int64_t length);

#endif
