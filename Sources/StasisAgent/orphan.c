// A stasis that died after RELEASE. The physical memory is gone and only a refill from the store brings it
// back, so the program stays held. The agent remembers which process sent RELEASE (its controller) and
// where the rescue entry is (RESCUE_STORE). Once that process is gone (checked by PID and start time, never
// by holding a descriptor: CRIU must find none to a process outside the tree) and no one put the memory back
// within a grace period, the agent starts `stasis resume <its PID> --store <store>` itself, and says so on
// standard error. Only the control thread runs this, between connections, never on a program's thread.
//
// A dump that is merely slow is left alone: its stasis is alive. A dump that completed ended the process
// (CRIU), or refilled it (--leave-running). A restored process has a new start time: its restorer refills it.
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "include/stasis_agent.h"
#include "stasis_agent_protocol.h"

// Settings, read once at load (the program may change its environment later).
static char stasis_binary[PATH_MAX];  // STASIS_AGENT_STASIS, set by `stasis run`
static char library_path[PATH_MAX];   // LD_LIBRARY_PATH, passed on (where the driver may be)
static long grace_ms = 5000;          // STASIS_AGENT_ORPHAN_GRACE seconds; "off": never
static int report_fd = 2;

// The watch of one release.
static char store[PATH_MAX];          // where the rescue entry is ("" : resume's default store)
static pid_t controller;              // who sent RELEASE (0: nobody to watch)
static unsigned long long controller_start, own_start;
static int gone;                      // the controller was seen gone, at gone_since
static struct timespec gone_since;
static int acted;                     // this release's resume was started (never twice)
static pid_t resumer;                 // the `stasis resume` started, until reaped

__attribute__((constructor)) static void orphan_init(void) {
    const char *binary = getenv("STASIS_AGENT_STASIS");
    if (binary) snprintf(stasis_binary, sizeof stasis_binary, "%s", binary);
    const char *libraries = getenv("LD_LIBRARY_PATH");
    if (libraries) snprintf(library_path, sizeof library_path, "%s", libraries);
    const char *grace = getenv("STASIS_AGENT_ORPHAN_GRACE");
    if (grace && *grace) {
        char *end;
        double seconds = strtod(grace, &end);
        grace_ms = (*end || seconds < 0) ? -1 : (long)(seconds * 1000);
    }
}

void stasis_agent_orphan_configure(const char *binary, double grace_seconds, int messages_fd) {
    snprintf(stasis_binary, sizeof stasis_binary, "%s", binary ? binary : "");
    grace_ms = grace_seconds < 0 ? -1 : (long)(grace_seconds * 1000);
    report_fd = messages_fd;
}

static void say(const char *format, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *format, ...) {
    char line[PATH_MAX + 400];
    int prefix = snprintf(line, sizeof line, "stasis-agent: ");
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(line + prefix, sizeof line - (size_t)prefix - 1, format, arguments);
    va_end(arguments);
    size_t length = strlen(line);
    line[length++] = '\n';
    ssize_t ignored = write(report_fd, line, length);
    (void)ignored;
}

/// Field 3 (state) and 22 (start time, in clock ticks since boot) of /proc/PID/stat; 0 when unreadable.
static unsigned long long start_time(const char *stat_path, char *process_state) {
    char text[1024];
    int fd = open(stat_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t got = read(fd, text, sizeof text - 1);
    close(fd);
    if (got <= 0) return 0;
    text[got] = 0;
    char *after_name = strrchr(text, ')');  // the command may hold spaces and parentheses
    if (!after_name) return 0;
    char state_letter = 0;
    unsigned long long start = 0;
    // state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    // priority nice num_threads itrealvalue starttime
    if (sscanf(after_name + 1, " %c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d %llu", &state_letter, &start) != 2) return 0;
    if (process_state) *process_state = state_letter;
    return start;
}

static unsigned long long process_start(pid_t pid, char *process_state) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    return start_time(path, process_state);
}

/// The controller is gone: no such process, a zombie, or another process under its PID.
static int controller_gone(void) {
    if (kill(controller, 0) != 0 && errno == ESRCH) return 1;
    char process_state = 0;
    unsigned long long start = process_start(controller, &process_state);
    if (start == 0) return controller_start != 0 && kill(controller, 0) != 0 && errno == ESRCH;
    return process_state == 'Z' || process_state == 'X' || (controller_start != 0 && start != controller_start);
}

void stasis_agent_orphan_store_piece(const void *piece) {
    const stasis_agent_message *message = piece;
    // A piece that does not fit (or a path too long) leaves no store: resume then tries its default one.
    if (message->offset == 0) store[0] = 0;
    if (message->id >= sizeof store || message->offset > message->id || message->length > message->id - message->offset ||
        message->length > sizeof message->text || message->offset != strlen(store)) {
        store[0] = 0;
        return;
    }
    memcpy(store + message->offset, message->text, message->length);
    store[message->offset + message->length] = 0;
}

void stasis_agent_orphan_released(int controller_fd) {
    struct ucred peer;
    socklen_t length = sizeof peer;
    // 0 where stasis runs outside this process's PID namespace: then there is no one to watch.
    controller = getsockopt(controller_fd, SOL_SOCKET, SO_PEERCRED, &peer, &length) == 0 && peer.pid > 0 ? peer.pid : 0;
    controller_start = controller ? process_start(controller, NULL) : 0;
    own_start = start_time("/proc/self/stat", NULL);
    gone = 0;
    acted = 0;
}

void stasis_agent_orphan_resumed(void) {
    controller = 0;
    store[0] = 0;
}

void stasis_agent_orphan_after_fork_child(void) {
    controller = 0;
    resumer = 0;
    store[0] = 0;
}

/// Closes every descriptor above 2 in the child: glibc 2.34's closefrom action where there is one (looked
/// up at run time, so that the agent still loads on an older glibc), else each descriptor open now.
static void close_the_rest(posix_spawn_file_actions_t *actions) {
    int (*closefrom_action)(posix_spawn_file_actions_t *, int) =
        (int (*)(posix_spawn_file_actions_t *, int))real_dlsym(RTLD_DEFAULT, "posix_spawn_file_actions_addclosefrom_np");
    if (closefrom_action && closefrom_action(actions, 3) == 0) return;
    DIR *descriptors = opendir("/proc/self/fd");
    if (!descriptors) return;
    int own = dirfd(descriptors);
    for (struct dirent *entry; (entry = readdir(descriptors));) {
        int fd = atoi(entry->d_name);
        // One closed in between is no failure: glibc ignores EBADF for a close action.
        if (fd > 2 && fd != own) posix_spawn_file_actions_addclose(actions, fd);
    }
    closedir(descriptors);
}

/// Starts `stasis resume PID [--store STORE]` as a process of its own session, with no signal blocked,
/// nothing of the program's but its standard error (its output goes there too), and a plain environment
/// (no LD_PRELOAD: no agent in stasis). posix_spawn: no fork of a multi-threaded CUDA process.
static pid_t start_resume(char *pid_text) {
    char *arguments[] = {stasis_binary, "resume", pid_text, store[0] ? "--store" : NULL, store, NULL};
    char library_setting[PATH_MAX + 20];
    snprintf(library_setting, sizeof library_setting, "LD_LIBRARY_PATH=%s", library_path);
    char *environment[] = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", library_path[0] ? library_setting : NULL, NULL};
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    posix_spawn_file_actions_init(&actions);
    posix_spawnattr_init(&attributes);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, report_fd, 1);
    posix_spawn_file_actions_adddup2(&actions, report_fd, 2);
    close_the_rest(&actions);
    sigset_t none, every;
    sigemptyset(&none);
    sigfillset(&every);
    posix_spawnattr_setsigmask(&attributes, &none);
    posix_spawnattr_setsigdefault(&attributes, &every);
    posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSID);
    pid_t child = 0;
    int failure = posix_spawn(&child, stasis_binary, &actions, &attributes, arguments, environment);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attributes);
    if (failure != 0) {
        errno = failure;
        return -1;
    }
    return child;
}

static long elapsed_ms(const struct timespec *since) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000 + (now.tv_nsec - since->tv_nsec) / 1000000;
}

/// Reaps the resume this agent started, once it ended, and says how it went.
static void reap(int contents_lost) {
    int status = 0;
    pid_t ended = waitpid(resumer, &status, WNOHANG);
    if (ended == 0) return;
    // -1 (ECHILD): the program reaped it, or ignores SIGCHLD; the agent's state says how it went.
    pid_t pid = resumer;
    resumer = 0;
    if (!contents_lost) {
        say("`stasis resume %d` (PID %d) put the device memory back; CUDA calls go on", (int)getpid(), (int)pid);
        return;
    }
    char how[64] = "it ended";
    if (ended == pid && WIFEXITED(status)) snprintf(how, sizeof how, "it exited with status %d", WEXITSTATUS(status));
    else if (ended == pid && WIFSIGNALED(status)) snprintf(how, sizeof how, "it was killed by signal %d", WTERMSIG(status));
    say("`stasis resume %d` (PID %d) could not put the device memory back (%s); CUDA calls stay held: run `stasis resume %d%s%s` once "
        "the cause is fixed (the rescue entry is kept)", (int)getpid(), (int)pid, how, (int)getpid(), store[0] ? " --store " : "", store);
}

int stasis_agent_orphan_step(int contents_lost) {
    if (resumer > 0) reap(contents_lost);
    if (!contents_lost || controller == 0 || acted || grace_ms < 0) return resumer > 0 ? 200 : -1;
    if (own_start != 0 && start_time("/proc/self/stat", NULL) != own_start) {
        controller = 0;  // restored: the stasis restoring it refills it
        return -1;
    }
    if (!controller_gone()) {
        gone = 0;
        return 250;
    }
    if (!gone) {
        gone = 1;
        clock_gettime(CLOCK_MONOTONIC, &gone_since);
    }
    long waited = elapsed_ms(&gone_since);
    if (waited < grace_ms) return (int)(grace_ms - waited < 250 ? grace_ms - waited : 250);
    acted = 1;
    char pid_text[16];
    snprintf(pid_text, sizeof pid_text, "%d", (int)getpid());
    const char *store_words = store[0] ? " --store " : "";
    if (!stasis_binary[0] || access(stasis_binary, X_OK) != 0) {
        say("the stasis that was checkpointing this process (PID %d) is gone, and %s%s; CUDA calls stay held until `stasis resume %s%s%s`",
            (int)controller, stasis_binary[0] ? "cannot run " : "no stasis binary is known (STASIS_AGENT_STASIS)", stasis_binary, pid_text,
            store_words, store);
        return -1;
    }
    say("the stasis that was checkpointing this process (PID %d) is gone; putting device memory back (%s resume %s%s%s)", (int)controller,
        stasis_binary, pid_text, store_words, store);
    resumer = start_resume(pid_text);
    if (resumer < 0) {
        resumer = 0;
        say("cannot start %s: %s; CUDA calls stay held until `stasis resume %s%s%s`", stasis_binary, strerror(errno), pid_text, store_words, store);
        return -1;
    }
    return 200;
}
