// stasis-workload: CPU processes that build state, get checkpointed and restored, and then verify their
// own state (the shape of CRIU's ZDTM tests). Used by the test suite, the README demo and the benchmarks.
//
//   stasis-workload MODE --dir DIR [--daemon] [--mem MIB] [--count N] [--file PATH] [--fill random|zero]
//
// MODE:
//   counter  a counter that ticks every 10 ms over a pattern-filled buffer; with --file it appends each
//            value to that file, keeping the file open
//   threads  --count worker threads, each ticking its own counter over its own pattern buffer
//   tree     a ring of the root and --count children passing a sequence number through pipes
//   unix     parent and child ping-pong a sequence number over a UNIX socket pair
//   tcp      parent and child ping-pong over an established TCP connection on 127.0.0.1
//   memory   --mem MiB of anonymous memory filled with --fill random|zero, then idle (for benchmarks)
//
// With --daemon the workload detaches (setsid, double fork, stdio to DIR/log), prints its PID once its state
// is built and exits, leaving the workload running. It writes DIR/ready when ready. On SIGUSR1 it checks its
// state, waits until it has made progress again (proof that it runs and its threads, pipes or sockets work),
// and writes "PASS ..." or "FAIL ..." to DIR/result (atomically, through a rename).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../common/workload_protocol.h"

#define MAX_CHILDREN 16
#define MAX_THREADS 64
#define PROGRESS_TIMEOUT_MS 10000

static const char *log_file_path = NULL;
static size_t mem_bytes = 16u << 20;
static int count = 4;
static int fill_zero = 0;

// The pattern: word i of a buffer seeded s is splitmix64(s ^ i), so it can be checked without a copy.
static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static uint64_t *make_buffer(size_t bytes, uint64_t seed) {
    uint64_t *buf = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) die("mmap");
    size_t words = bytes / 8;
    if (fill_zero) memset(buf, 0, bytes);
    else for (size_t i = 0; i < words; i++) buf[i] = splitmix64(seed ^ i);
    return buf;
}

// Returns the index of the first wrong word, or -1.
static long check_buffer(const uint64_t *buf, size_t bytes, uint64_t seed) {
    size_t words = bytes / 8;
    for (size_t i = 0; i < words; i++) {
        uint64_t want = fill_zero ? 0 : splitmix64(seed ^ i);
        if (buf[i] != want) return (long)i;
    }
    return -1;
}

// Waits until *progress has advanced by `steps` from its value now; 0 on success.
static int wait_progress(_Atomic uint64_t *progress, uint64_t steps) {
    uint64_t start = atomic_load(progress), deadline = now_ms() + PROGRESS_TIMEOUT_MS;
    while (atomic_load(progress) < start + steps) {
        if (now_ms() > deadline) return -1;
        sleep_ms(5);
    }
    return 0;
}

// ---- counter ----------------------------------------------------------------------------------------

static _Atomic uint64_t counter_value;

static void run_counter(void) {
    uint64_t *buf = make_buffer(mem_bytes, 1);
    int fd = -1;
    if (log_file_path) {
        fd = open(log_file_path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
        if (fd < 0) die(log_file_path);
    }
    write_file("ready", "%d\n", (int)getpid());
    for (;;) {
        uint64_t next = atomic_load(&counter_value) + 1;
        if (fd >= 0) {
            char line[32];
            int n = snprintf(line, sizeof line, "%" PRIu64 "\n", next);
            if (write(fd, line, (size_t)n) != n) die("append");
        }
        atomic_store(&counter_value, next);
        buf[next % (mem_bytes / 8)] ^= 0;  // touch the buffer without changing it
        if (verify_requested) {
            verify_requested = 0;
            long bad = check_buffer(buf, mem_bytes, 1);
            if (bad >= 0) { write_file("result", "FAIL pattern word %ld changed\n", bad); continue; }
            if (fd >= 0) {
                // The file must hold exactly the values 1..counter, one per line, and our offset must be its end.
                FILE *f = fopen(log_file_path, "r");
                if (!f) { write_file("result", "FAIL cannot reopen %s\n", log_file_path); continue; }
                uint64_t expect = 1, value;
                int ok = 1;
                while (fscanf(f, "%" SCNu64, &value) == 1) {
                    if (value != expect++) { ok = 0; break; }
                }
                fclose(f);
                uint64_t lines = expect - 1, now = atomic_load(&counter_value);
                off_t pos = lseek(fd, 0, SEEK_CUR), end = lseek(fd, 0, SEEK_END);
                if (!ok || lines != now) { write_file("result", "FAIL file has %" PRIu64 " good lines, counter %" PRIu64 "\n", lines, now); continue; }
                if (pos != end) { write_file("result", "FAIL file offset %ld, size %ld\n", (long)pos, (long)end); continue; }
            }
            // Progress: the loop itself must tick again, so check it after more iterations below.
            uint64_t target = atomic_load(&counter_value) + 5;
            while (atomic_load(&counter_value) < target) {
                uint64_t v = atomic_load(&counter_value) + 1;
                if (fd >= 0) {
                    char line[32];
                    int n = snprintf(line, sizeof line, "%" PRIu64 "\n", v);
                    if (write(fd, line, (size_t)n) != n) die("append");
                }
                atomic_store(&counter_value, v);
                sleep_ms(10);
            }
            write_file("result", "PASS counter %" PRIu64 "\n", atomic_load(&counter_value));
        }
        sleep_ms(10);
    }
}

// ---- threads ----------------------------------------------------------------------------------------

struct worker {
    pthread_t thread;
    int index;
    _Atomic uint64_t ticks;
    _Atomic int broken;
    uint64_t *buf;
};
static struct worker workers[MAX_THREADS];
static size_t worker_bytes;

static void *worker_main(void *arg) {
    struct worker *w = arg;
    for (;;) {
        // Each tick re-checks a slice of the thread's own buffer.
        uint64_t t = atomic_load(&w->ticks);
        size_t words = worker_bytes / 8, slice = words / 64 + 1, from = (t * slice) % words;
        for (size_t i = from; i < from + slice && i < words; i++)
            if (w->buf[i] != splitmix64((uint64_t)(100 + w->index) ^ i)) atomic_store(&w->broken, 1);
        atomic_store(&w->ticks, t + 1);
        sleep_ms(10);
    }
    return NULL;
}

static void run_threads(void) {
    if (count < 1 || count > MAX_THREADS) { fprintf(stderr, "--count must be 1..%d\n", MAX_THREADS); exit(2); }
    worker_bytes = mem_bytes / (size_t)count;
    worker_bytes -= worker_bytes % 8;
    for (int i = 0; i < count; i++) {
        workers[i].index = i;
        workers[i].buf = make_buffer(worker_bytes, (uint64_t)(100 + i));
        if (pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]) != 0) die("pthread_create");
    }
    write_file("ready", "%d\n", (int)getpid());
    for (;;) {
        if (verify_requested) {
            verify_requested = 0;
            int failed = -1;
            for (int i = 0; i < count && failed < 0; i++) {
                if (atomic_load(&workers[i].broken) || check_buffer(workers[i].buf, worker_bytes, (uint64_t)(100 + i)) >= 0) failed = i;
                else if (wait_progress(&workers[i].ticks, 5) != 0) failed = 1000 + i;
            }
            if (failed >= 1000) write_file("result", "FAIL thread %d made no progress\n", failed - 1000);
            else if (failed >= 0) write_file("result", "FAIL thread %d buffer changed\n", failed);
            else write_file("result", "PASS %d threads progressing, buffers intact\n", count);
        }
        sleep_ms(10);
    }
}

// ---- tree: a ring of pipes ----------------------------------------------------------------------------

static _Atomic uint64_t round_trips;
static _Atomic int ring_error;

// A child of the ring: read a number, check it is the next one, pass it on.
static void ring_member(int in, int out) {
    uint64_t expect = 1, value;
    uint64_t *buf = make_buffer(1 << 20, 7);
    for (;;) {
        ssize_t n = read(in, &value, sizeof value);
        if (n != sizeof value) _exit(3);
        if (value != expect || check_buffer(buf, 1 << 20, 7) >= 0) value = UINT64_MAX;  // poison: the root sees it
        expect++;
        if (write(out, &value, sizeof value) != sizeof value) _exit(3);
    }
}

static pid_t children[MAX_CHILDREN];

static void *ring_driver(void *arg) {
    int *ends = arg;  // ends[0]: write to first child, ends[1]: read from last child
    for (uint64_t seq = 1;; seq++) {
        uint64_t back;
        if (write(ends[0], &seq, sizeof seq) != sizeof seq || read(ends[1], &back, sizeof back) != sizeof back) {
            atomic_store(&ring_error, 1);
            return NULL;
        }
        if (back != seq) { atomic_store(&ring_error, 2); return NULL; }
        atomic_store(&round_trips, seq);
        sleep_ms(5);
    }
}

static int children_alive(int n) {
    for (int i = 0; i < n; i++) {
        int status;
        if (waitpid(children[i], &status, WNOHANG) != 0) return 0;
    }
    return 1;
}

static void run_tree(void) {
    if (count < 1 || count > MAX_CHILDREN) { fprintf(stderr, "--count must be 1..%d\n", MAX_CHILDREN); exit(2); }
    int pipes[MAX_CHILDREN + 1][2];
    for (int i = 0; i <= count; i++) if (pipe(pipes[i]) != 0) die("pipe");
    for (int i = 0; i < count; i++) {
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) {
            for (int j = 0; j <= count; j++) {
                if (j != i) close(pipes[j][0]);
                if (j != i + 1) close(pipes[j][1]);
            }
            ring_member(pipes[i][0], pipes[i + 1][1]);
        }
        children[i] = pid;
    }
    static int ends[2];
    ends[0] = pipes[0][1];
    ends[1] = pipes[count][0];
    pthread_t driver;
    if (pthread_create(&driver, NULL, ring_driver, ends) != 0) die("pthread_create");
    if (wait_progress(&round_trips, 3) != 0) { fprintf(stderr, "ring did not start\n"); exit(2); }
    write_file("ready", "%d\n", (int)getpid());
    for (;;) {
        if (verify_requested) {
            verify_requested = 0;
            if (atomic_load(&ring_error)) write_file("result", "FAIL ring error %d\n", atomic_load(&ring_error));
            else if (!children_alive(count)) write_file("result", "FAIL a child exited\n");
            else if (wait_progress(&round_trips, 5) != 0) write_file("result", "FAIL ring made no progress (error %d)\n", atomic_load(&ring_error));
            else write_file("result", "PASS ring of %d children, %" PRIu64 " round trips\n", count, atomic_load(&round_trips));
        }
        sleep_ms(10);
    }
}

// ---- unix and tcp: ping-pong between parent and child ----------------------------------------------------

// The child side: answer every number with the number plus one.
static void echo_child(int fd) {
    uint64_t value, expect = 1;
    for (;;) {
        if (recv(fd, &value, sizeof value, MSG_WAITALL) != sizeof value) _exit(3);
        if (value != expect) value = UINT64_MAX;
        expect += 2;
        value += 1;
        if (send(fd, &value, sizeof value, MSG_NOSIGNAL) != sizeof value) _exit(3);
    }
}

static void *pingpong_driver(void *arg) {
    int fd = *(int *)arg;
    for (uint64_t seq = 1;; seq += 2) {
        uint64_t back;
        if (send(fd, &seq, sizeof seq, MSG_NOSIGNAL) != sizeof seq || recv(fd, &back, sizeof back, MSG_WAITALL) != sizeof back) {
            atomic_store(&ring_error, 1);
            return NULL;
        }
        if (back != seq + 1) { atomic_store(&ring_error, 2); return NULL; }
        atomic_fetch_add(&round_trips, 1);
        sleep_ms(5);
    }
}

static void serve_pingpong(int fd, const char *kind) {
    static int driver_fd;
    driver_fd = fd;
    pthread_t driver;
    if (pthread_create(&driver, NULL, pingpong_driver, &driver_fd) != 0) die("pthread_create");
    if (wait_progress(&round_trips, 3) != 0) { fprintf(stderr, "%s ping-pong did not start\n", kind); exit(2); }
    write_file("ready", "%d\n", (int)getpid());
    for (;;) {
        if (verify_requested) {
            verify_requested = 0;
            if (atomic_load(&ring_error)) write_file("result", "FAIL %s error %d\n", kind, atomic_load(&ring_error));
            else if (!children_alive(1)) write_file("result", "FAIL the %s peer exited\n", kind);
            else if (wait_progress(&round_trips, 5) != 0) write_file("result", "FAIL %s made no progress\n", kind);
            else write_file("result", "PASS %s, %" PRIu64 " round trips\n", kind, atomic_load(&round_trips));
        }
        sleep_ms(10);
    }
}

static void run_unix(void) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) die("socketpair");
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) { close(sv[0]); echo_child(sv[1]); }
    children[0] = pid;
    close(sv[1]);
    serve_pingpong(sv[0], "unix socket pair");
}

static void run_tcp(void) {
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0) die("socket");
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK), .sin_port = 0};
    socklen_t len = sizeof addr;
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(listener, 1) != 0) die("bind/listen");
    if (getsockname(listener, (struct sockaddr *)&addr, &len) != 0) die("getsockname");
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        close(listener);
        // A first connection, which the listener's side closes first (as NCCL's bootstrap does): it leaves
        // a TIME_WAIT socket on the listener's own address and port, which a restore must get past.
        int first = socket(AF_INET, SOCK_STREAM, 0);
        char byte;
        if (first < 0 || connect(first, (struct sockaddr *)&addr, sizeof addr) != 0) _exit(3);
        while (recv(first, &byte, 1, 0) > 0) {}
        close(first);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) _exit(3);
        echo_child(fd);
    }
    children[0] = pid;
    int first = accept(listener, NULL, NULL);
    if (first < 0) die("accept");
    close(first);
    int fd = accept(listener, NULL, NULL);
    if (fd < 0) die("accept");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    // The listening socket stays open: CRIU must carry it too.
    serve_pingpong(fd, "tcp connection");
}

// ---- memory -------------------------------------------------------------------------------------------

static void run_memory(void) {
    uint64_t *buf = make_buffer(mem_bytes, 42);
    write_file("ready", "%d\n", (int)getpid());
    for (;;) {
        if (verify_requested) {
            verify_requested = 0;
            long bad = check_buffer(buf, mem_bytes, 42);
            if (bad >= 0) write_file("result", "FAIL word %ld changed\n", bad);
            else write_file("result", "PASS %zu MiB intact\n", mem_bytes >> 20);
        }
        sleep_ms(50);
    }
}

// ---- start-up -----------------------------------------------------------------------------------------

int main(int argc, char **argv) {
    program_name = "stasis-workload";
    if (argc < 2) {
        fprintf(stderr, "usage: stasis-workload counter|threads|tree|unix|tcp|memory --dir DIR [--daemon] [--mem MIB] [--count N] [--file PATH] [--fill random|zero]\n");
        return 2;
    }
    const char *mode = argv[1];
    int detach = 0;
    for (int i = 2; i < argc; i++) {
        const char *arg = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(arg, "--daemon")) { detach = 1; continue; }
        if (!value) { fprintf(stderr, "%s needs a value\n", arg); return 2; }
        if (!strcmp(arg, "--dir")) dir = value;
        else if (!strcmp(arg, "--mem")) mem_bytes = (size_t)strtoull(value, NULL, 10) << 20;
        else if (!strcmp(arg, "--count")) count = atoi(value);
        else if (!strcmp(arg, "--file")) log_file_path = value;
        else if (!strcmp(arg, "--fill")) fill_zero = !strcmp(value, "zero");
        else { fprintf(stderr, "unknown option %s\n", arg); return 2; }
        i++;
    }
    if (mem_bytes < 4096) mem_bytes = 4096;
    char resolved[4096];
    if (!realpath(dir, resolved)) die(dir);
    dir = strdup(resolved);
    if (detach) daemonize();

    listen_for_verify_requests();

    if (!strcmp(mode, "counter")) run_counter();
    else if (!strcmp(mode, "threads")) run_threads();
    else if (!strcmp(mode, "tree")) run_tree();
    else if (!strcmp(mode, "unix")) run_unix();
    else if (!strcmp(mode, "tcp")) run_tcp();
    else if (!strcmp(mode, "memory")) run_memory();
    else { fprintf(stderr, "unknown mode %s\n", mode); return 2; }
    return 0;
}
