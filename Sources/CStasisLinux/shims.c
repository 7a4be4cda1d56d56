#define _GNU_SOURCE
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/kcmp.h>
#include "CStasisLinux.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/stat.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <spawn.h>
#include <stdio.h>
#include <unistd.h>

int stasis_is_in_memory(const char *path) {
    struct statfs info;
    if (statfs(path, &info) != 0) return -1;
    return info.f_type == TMPFS_MAGIC || info.f_type == RAMFS_MAGIC;
}

int stasis_memfd(const char *name) { return memfd_create(name, MFD_CLOEXEC); }

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

// ---- TIME_WAIT sockets on a port a restored listener needs (sock_diag over netlink)

#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>

#ifndef SOCK_DESTROY
#define SOCK_DESTROY 21
#endif

struct diag_request {
    struct nlmsghdr header;
    struct inet_diag_req_v2 request;
};

static int diag_send(int fd, uint16_t type, uint16_t flags, int family, const struct inet_diag_sockid *id) {
    struct diag_request message;
    memset(&message, 0, sizeof message);
    message.header.nlmsg_len = sizeof message;
    message.header.nlmsg_type = type;
    message.header.nlmsg_flags = NLM_F_REQUEST | flags;
    message.request.sdiag_family = (uint8_t)family;
    message.request.sdiag_protocol = IPPROTO_TCP;
    message.request.idiag_states = 1u << TCP_TIME_WAIT;
    if (id) message.request.id = *id;
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    return sendto(fd, &message, sizeof message, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0 ? -errno : 0;
}

/// The TIME_WAIT sockets of `family` whose local end matches, into a malloc'd array.
static int time_wait_matching(int fd, int family, const uint8_t *address, uint16_t port, struct inet_diag_sockid **out, size_t *count) {
    int error = diag_send(fd, SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, family, NULL);
    if (error) return error;
    size_t length = family == AF_INET ? 4 : 16, capacity = 0;
    uint8_t zeros[16] = {0};
    int any = memcmp(address, zeros, length) == 0;
    static __thread char buffer[32768] __attribute__((aligned(NLMSG_ALIGNTO)));
    for (;;) {
        ssize_t received = recv(fd, buffer, sizeof buffer, 0);
        if (received < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        int got = (int)received;  // NLMSG_OK and NLMSG_NEXT want a signed int they count down
        for (struct nlmsghdr *header = (struct nlmsghdr *)buffer; NLMSG_OK(header, got); header = NLMSG_NEXT(header, got)) {
            if (header->nlmsg_type == NLMSG_DONE) return 0;
            if (header->nlmsg_type == NLMSG_ERROR) {
                const struct nlmsgerr *failure = NLMSG_DATA(header);
                return failure->error ? failure->error : -EIO;
            }
            if (header->nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg))) continue;
            const struct inet_diag_msg *socket_info = NLMSG_DATA(header);
            if (ntohs(socket_info->id.idiag_sport) != port) continue;
            if (!any && memcmp(socket_info->id.idiag_src, address, length) != 0) continue;
            if (*count == capacity) {
                capacity = capacity ? capacity * 2 : 16;
                struct inet_diag_sockid *bigger = realloc(*out, capacity * sizeof **out);
                if (!bigger) return -ENOMEM;
                *out = bigger;
            }
            (*out)[(*count)++] = socket_info->id;
        }
    }
}

int stasis_destroy_time_wait(int family, const uint8_t *address, uint16_t port) {
    if (family != AF_INET && family != AF_INET6) return -EAFNOSUPPORT;
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0) return -errno;
    struct inet_diag_sockid *found = NULL;
    size_t count = 0;
    int result = time_wait_matching(fd, family, address, port, &found, &count);
    int destroyed = 0;
    for (size_t i = 0; result == 0 && i < count; i++) {
        result = diag_send(fd, SOCK_DESTROY, NLM_F_ACK, family, &found[i]);
        char reply[4096];
        ssize_t got = result == 0 ? recv(fd, reply, sizeof reply, 0) : -1;
        if (result != 0) break;
        if (got < 0) { result = -errno; break; }
        const struct nlmsghdr *header = (const struct nlmsghdr *)reply;
        if (got >= (ssize_t)NLMSG_LENGTH(sizeof(struct nlmsgerr)) && header->nlmsg_type == NLMSG_ERROR) {
            int error = ((const struct nlmsgerr *)NLMSG_DATA(header))->error;
            // Gone by itself in between: as good as destroyed.
            if (error == 0 || error == -ENOENT) destroyed++;
            else result = error;
        }
    }
    free(found);
    close(fd);
    return result < 0 ? result : destroyed;
}

int stasis_pipe_cloexec(int ends[2]) {
    return pipe2(ends, O_CLOEXEC);
}

int stasis_start_is_cached(int fd) {
    char bytes[512];
    struct iovec vector = { bytes, sizeof bytes };
    if (preadv2(fd, &vector, 1, 0, RWF_NOWAIT) >= 0) return 1;
    return errno == EAGAIN ? 0 : -1;
}

int stasis_spawn_close_from(void *actions, int lowest) {
    return posix_spawn_file_actions_addclosefrom_np((posix_spawn_file_actions_t *)actions, lowest);
}

int stasis_accept_cloexec(int listener) {
    return accept4(listener, NULL, NULL, SOCK_CLOEXEC);
}

int stasis_same_file(int pid1, int fd1, int pid2, int fd2) {
    return (int)syscall(SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2);
}
