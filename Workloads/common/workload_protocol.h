// The protocol every stasis test workload follows (Workloads/cpu, Workloads/cuda; Workloads/torch has a
// Python copy): status files written atomically in a directory, --daemon detaching the workload from its
// caller, and SIGUSR1 asking it to verify itself. Included by exactly one C or C++ file per program.
#ifndef STASIS_WORKLOAD_PROTOCOL_H
#define STASIS_WORKLOAD_PROTOCOL_H

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/// The program's name in messages, and the directory of its status files (made absolute before use).
static const char *program_name = "workload";
static const char *dir = ".";

/// Set by SIGUSR1: the workload should verify itself and write DIR/result.
static volatile sig_atomic_t verify_requested = 0;

static void on_usr1(int sig) {
    (void)sig;
    verify_requested = 1;
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

static void die(const char *what) {
    fprintf(stderr, "%s: %s: %s\n", program_name, what, strerror(errno));
    exit(2);
}

// Writes DIR/NAME atomically: readers see the whole text or nothing.
static void write_file(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void write_file(const char *name, const char *fmt, ...) {
    char path[4096], tmp[4200], text[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) die(tmp);
    fputs(text, f);
    fclose(f);
    if (rename(tmp, path) != 0) die(path);
}

// Detaches (double fork, then setsid): the caller's process waits for the workload's ready file, prints the
// workload's PID and exits. Call it before anything that does not survive a fork (CUDA, threads).
static void daemonize(void) {
    char ready[4096];
    snprintf(ready, sizeof ready, "%s/ready", dir);
    unlink(ready);
    int report[2];
    if (pipe(report) != 0) die("pipe");
    pid_t first = fork();
    if (first < 0) die("fork");
    if (first > 0) {
        close(report[1]);
        int pid = 0;
        ssize_t got = read(report[0], &pid, sizeof pid);
        waitpid(first, NULL, 0);
        if (got != sizeof pid) {
            fprintf(stderr, "%s: the workload did not start\n", program_name);
            exit(2);
        }
        for (uint64_t deadline = now_ms() + 60000; access(ready, F_OK) != 0; sleep_ms(10)) {
            if (now_ms() > deadline || kill(pid, 0) != 0) {
                fprintf(stderr, "%s: PID %d never became ready (see %s/log)\n", program_name, pid, dir);
                exit(2);
            }
        }
        printf("%d\n", pid);
        exit(0);
    }
    close(report[0]);
    pid_t second = fork();
    if (second < 0) die("fork");
    if (second > 0) _exit(0);
    // The workload leads its own session, as CRIU wants of a tree's root (else it needs --shell-job).
    setsid();
    int me = (int)getpid();
    if (write(report[1], &me, sizeof me) != sizeof me) _exit(2);
    close(report[1]);
    char log[4096];
    snprintf(log, sizeof log, "%s/log", dir);
    int null = open("/dev/null", O_RDONLY);
    int out = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (null < 0 || out < 0) _exit(2);
    dup2(null, 0);
    dup2(out, 1);
    dup2(out, 2);
    // Keep nothing else of the caller's: an inherited pipe end would keep its reader waiting forever.
    for (int fd = 3; fd < 1024; fd++) close(fd);
    if (chdir("/") != 0) _exit(2);
}

// Installs the SIGUSR1 handler and unblocks the signal: the caller may have blocked it (Foundation's Process
// does for its children), and threads inherit the mask. SA_RESTART because any thread (the CUDA runtime's
// own too) may take it.
static void listen_for_verify_requests(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_UNBLOCK, &usr1, NULL);
}

#endif
