// Linux calls that Swift's Glibc module does not expose (they need _GNU_SOURCE).
#ifndef C_STASIS_LINUX_H
#define C_STASIS_LINUX_H

#include <stdint.h>

/// Frees the blocks of [offset, offset + length) of fd, keeping the file's size: fallocate(2) with
/// FALLOC_FL_PUNCH_HOLE. Returns 0, or -1 with errno set.
int stasis_punch_hole(int fd, int64_t offset, int64_t length);

#endif
