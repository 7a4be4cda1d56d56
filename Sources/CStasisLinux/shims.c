#define _GNU_SOURCE
#include <sys/prctl.h>
#include "CStasisLinux.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

int stasis_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int stasis_start_writeback(int fd, int64_t offset, int64_t length) {
    return sync_file_range(fd, (off_t)offset, (off_t)length, SYNC_FILE_RANGE_WRITE);
}

int stasis_syncfs(int fd) { return syncfs(fd); }

int stasis_set_child_subreaper(int on) { return prctl(PR_SET_CHILD_SUBREAPER, (unsigned long)on, 0, 0, 0); }

long stasis_vmsplice(int fd, const void *buffer, unsigned long length) {
    struct iovec vector = { .iov_base = (void *)buffer, .iov_len = length };
    return (long)vmsplice(fd, &vector, 1, 0);
}

long stasis_process_read(int pid, void *local, uint64_t remote, unsigned long length) {
    struct iovec here = {local, length}, there = {(void *)(uintptr_t)remote, length};
    return (long)process_vm_readv(pid, &here, 1, &there, 1, 0);
}

long stasis_process_write(int pid, const void *local, uint64_t remote, unsigned long length) {
    struct iovec here = {(void *)local, length}, there = {(void *)(uintptr_t)remote, length};
    return (long)process_vm_writev(pid, &here, 1, &there, 1, 0);
}

int stasis_socket_peer_pid(int fd) {
    struct ucred peer;
    socklen_t length = sizeof peer;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &length) != 0) return -1;
    return peer.pid;
}
