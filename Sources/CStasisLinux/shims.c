#define _GNU_SOURCE
#include <sys/prctl.h>
#include "CStasisLinux.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/stat.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
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

struct netns_socket {
    int pid;
    int fd;
    int error;
};

static void *make_socket_in_netns(void *argument) {
    struct netns_socket *request = argument;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/ns/net", request->pid);
    int ns = open(path, O_RDONLY | O_CLOEXEC);
    if (ns < 0 || setns(ns, CLONE_NEWNET) != 0) {
        request->error = errno;
        if (ns >= 0) close(ns);
        return NULL;
    }
    close(ns);
    request->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (request->fd < 0) request->error = errno;
    return NULL;
}

int stasis_unix_socket_in_netns_of(int pid) {
    char theirs[64];
    struct stat mine_stat, their_stat;
    snprintf(theirs, sizeof theirs, "/proc/%d/ns/net", pid);
    if (stat("/proc/self/ns/net", &mine_stat) == 0 && stat(theirs, &their_stat) == 0 && mine_stat.st_ino == their_stat.st_ino &&
        mine_stat.st_dev == their_stat.st_dev) {
        return socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    }
    struct netns_socket request = {pid, -1, 0};
    pthread_t thread;
    int failed = pthread_create(&thread, NULL, make_socket_in_netns, &request);
    if (failed) {
        errno = failed;
        return -1;
    }
    pthread_join(thread, NULL);
    if (request.fd < 0) errno = request.error;
    return request.fd;
}
