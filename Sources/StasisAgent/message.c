// One protocol message (stasis_agent_message) over a stream socket, whole, with a descriptor or without
// (SCM_RIGHTS): the one send path and the one receive path of every message the agent exchanges, with stasis
// (control.c, ring.c, evacuate.c) and with another process's agent (ipc.c).
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "agent.h"

typedef union {
    struct cmsghdr header;
    char space[CMSG_SPACE(sizeof(int))];
} one_descriptor;

HIDDEN int message_send(int fd, const stasis_agent_message *message, int passed) {
    const char *bytes = (const char *)message;
    size_t done = 0;
    while (done < sizeof *message) {
        struct iovec vector = {(char *)bytes + done, sizeof *message - done};
        one_descriptor control;
        memset(&control, 0, sizeof control);
        struct msghdr header = {0};
        header.msg_iov = &vector;
        header.msg_iovlen = 1;
        if (passed >= 0 && done == 0) {
            // The descriptor goes with the first byte; the rest of the message follows without it.
            header.msg_control = control.space;
            header.msg_controllen = sizeof control.space;
            struct cmsghdr *attached = CMSG_FIRSTHDR(&header);
            attached->cmsg_level = SOL_SOCKET;
            attached->cmsg_type = SCM_RIGHTS;
            attached->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(attached), &passed, sizeof passed);
        }
        ssize_t sent = sendmsg(fd, &header, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR) continue;
        if (sent <= 0) return -1;
        done += (size_t)sent;
    }
    return 0;
}

HIDDEN int message_receive(int fd, stasis_agent_message *message, int *passed) {
    char *bytes = (char *)message;
    size_t done = 0;
    while (done < sizeof *message) {
        struct iovec vector = {bytes + done, sizeof *message - done};
        one_descriptor control;
        struct msghdr header = {0};
        header.msg_iov = &vector;
        header.msg_iovlen = 1;
        header.msg_control = control.space;
        header.msg_controllen = sizeof control.space;
        ssize_t got = recvmsg(fd, &header, MSG_CMSG_CLOEXEC);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        struct cmsghdr *attached = CMSG_FIRSTHDR(&header);
        if (attached && attached->cmsg_level == SOL_SOCKET && attached->cmsg_type == SCM_RIGHTS) {
            int received;
            memcpy(&received, CMSG_DATA(attached), sizeof received);
            if (*passed >= 0) close(*passed);
            *passed = received;
        }
        done += (size_t)got;
    }
    return 0;
}

HIDDEN int message_waiting(int fd) {
    struct pollfd poller = {fd, POLLIN, 0};
    return poll(&poller, 1, 0) > 0;
}
