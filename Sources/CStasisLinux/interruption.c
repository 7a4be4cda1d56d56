// SIGINT, SIGTERM and SIGHUP during an operation that must not stop half-way (a migration's commit): the
// handler only does what is async-signal-safe (atomics, shutdown(2), _exit(2)); the operation reads the
// outcome at its own steps.
#include "CStasisLinux.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum { GUARD_IDLE = 0, GUARD_ARMED = 1, GUARD_DEFERRING = 2 };

static atomic_int guard_state = GUARD_IDLE;
static atomic_int guard_fd = -1;
static atomic_int guard_caught = 0;

static void guard_handler(int signal_number) {
    int expected = 0;
    // The first signal is the one reported; later ones change nothing.
    atomic_compare_exchange_strong(&guard_caught, &expected, signal_number);
    switch (atomic_load(&guard_state)) {
    case GUARD_IDLE:
        _exit(128 + signal_number);
    case GUARD_ARMED: {
        int fd = atomic_load(&guard_fd);
        // Every thread blocked on the connection returns: the operation fails where it stands, and undoes.
        if (fd >= 0) shutdown(fd, SHUT_RDWR);
        break;
    }
    default:
        break;
    }
}

int stasis_interruption_install(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = guard_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    int signals[] = {SIGINT, SIGTERM, SIGHUP};
    sigset_t unblock;
    sigemptyset(&unblock);
    for (unsigned i = 0; i < sizeof signals / sizeof signals[0]; i++) {
        if (sigaction(signals[i], &action, NULL) != 0) return -1;
        sigaddset(&unblock, signals[i]);
    }
    // A parent may have started stasis with these blocked (a test runner's thread did): a blocked signal
    // would wait unseen until the migration ends, so this thread takes them.
    return pthread_sigmask(SIG_UNBLOCK, &unblock, NULL) == 0 ? 0 : -1;
}

void stasis_interruption_idle(void) {
    atomic_store(&guard_fd, -1);
    atomic_store(&guard_state, GUARD_IDLE);
}

void stasis_interruption_arm(int fd) {
    atomic_store(&guard_fd, fd);
    atomic_store(&guard_state, GUARD_ARMED);
}

int stasis_interruption_defer(void) {
    atomic_store(&guard_state, GUARD_DEFERRING);
    return atomic_load(&guard_caught);
}

int stasis_interruption_caught(void) { return atomic_load(&guard_caught); }
