// The gate every driver entry point the agent hands out passes through. Open, it costs two atomic
// operations a call, on a counter of the calling thread's own (threads that call the driver at once, such as
// PyTorch's main and autograd threads, do not share a cache line). Closed (a checkpoint is in progress), a
// thread that arrives waits until it opens, and the closer waits until every thread already inside the
// driver has come out; the agent's own thread never passes it.
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agent.h"
#include "include/stasis_agent.h"

#define GATE_SLOTS 4096
#define TRAMPOLINE_BYTES 16

// Read by the trampolines (gate_x86_64.S).
HIDDEN void *stasis_gate_targets[GATE_SLOTS];
HIDDEN extern char stasis_gate_trampolines[];

// A thread's count of the driver calls it is inside, on a cache line of its own. Records are never freed:
// a thread that ends gives its record back for the next new thread (the closer may be reading it).
typedef struct thread_record {
    _Alignas(64) atomic_long inside;
    struct thread_record *next;
    atomic_int taken;
} thread_record;

static _Alignas(64) atomic_int closed;
static _Atomic(thread_record *) records;  // every record, newest first; only ever grows
static __thread thread_record *mine __attribute__((tls_model("initial-exec")));
static pthread_key_t record_key;
static pthread_once_t record_key_once = PTHREAD_ONCE_INIT;

// At thread exit. A driver call from a later destructor takes a record again (any record counts correctly:
// the counts are only ever summed).
static void give_back(void *record) {
    mine = NULL;
    atomic_store(&((thread_record *)record)->taken, 0);
}
static void make_record_key(void) { pthread_key_create(&record_key, give_back); }

static thread_record *my_record(void) {
    if (__builtin_expect(mine != NULL, 1)) return mine;
    thread_record *record = NULL;
    for (thread_record *r = atomic_load(&records); r; r = r->next) {
        int free_one = 0;
        if (atomic_compare_exchange_strong(&r->taken, &free_one, 1)) { record = r; break; }
    }
    if (!record) {
        record = aligned_alloc(64, sizeof *record);
        if (!record) abort();
        atomic_init(&record->inside, 0);
        atomic_init(&record->taken, 1);
        record->next = atomic_load(&records);
        while (!atomic_compare_exchange_weak(&records, &record->next, record)) {}
    }
    pthread_once(&record_key_once, make_record_key);
    pthread_setspecific(record_key, record);
    mine = record;
    return record;
}

// Threads inside driver calls now.
static long inside_now(void) {
    long total = 0;
    for (thread_record *r = atomic_load(&records); r; r = r->next) total += atomic_load(&r->inside);
    return total;
}

static pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t table_mutex = PTHREAD_MUTEX_INITIALIZER;
static unsigned used_slots;
static atomic_ulong ungated;
// Calls through the gate, counted only with STASIS_AGENT_LOG (for the overhead measurements: how many driver
// calls a training step makes), on a cache line of its own.
static _Alignas(64) atomic_ulong calls;
// Target -> slot + 1 (0: empty), open addressing: programs look entry points up again and again (cuBLAS,
// Triton), so finding an existing trampoline must not scan the table.
#define INDEX_SIZE (2 * GATE_SLOTS)
static unsigned slot_index[INDEX_SIZE];

static size_t index_of(void *target) {
    uintptr_t key = (uintptr_t)target;
    key ^= key >> 17;
    key *= 0xed5ad4bbu;
    key ^= key >> 11;
    return (size_t)(key % INDEX_SIZE);
}

// Dekker-style: a thread counts itself in, then looks at the gate; the closer closes, then looks at every
// thread's count. Sequentially consistent atomics on both sides make one of them see the other.
HIDDEN void gate_enter(void) {
    if (__builtin_expect(settings.verbose, 0)) atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
    thread_record *record = my_record();
    for (;;) {
        atomic_fetch_add(&record->inside, 1);
        if (!atomic_load(&closed)) return;
        gate_leave();
        pthread_mutex_lock(&mutex);
        while (atomic_load(&closed)) pthread_cond_wait(&changed, &mutex);
        pthread_mutex_unlock(&mutex);
    }
}

HIDDEN void gate_leave(void) {
    if (atomic_fetch_sub(&mine->inside, 1) == 1 && atomic_load(&closed)) {
        pthread_mutex_lock(&mutex);
        pthread_cond_broadcast(&changed);
        pthread_mutex_unlock(&mutex);
    }
}

HIDDEN void stasis_gate_enter_hook(void) { gate_enter(); }
HIDDEN void stasis_gate_leave_hook(void) { gate_leave(); }

HIDDEN long gate_close(unsigned timeout_ms) {
    atomic_store(&closed, 1);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&mutex);
    long left;
    while ((left = inside_now()) > 0) {
        if (pthread_cond_timedwait(&changed, &mutex, &deadline) == ETIMEDOUT) {
            left = inside_now();
            break;
        }
    }
    pthread_mutex_unlock(&mutex);
    if (left > 0) gate_open();
    return left > 0 ? left : 0;
}

HIDDEN void gate_open(void) {
    pthread_mutex_lock(&mutex);
    atomic_store(&closed, 0);
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&mutex);
}

HIDDEN int gate_is_closed(void) { return atomic_load(&closed); }

HIDDEN void *gate_wrap(void *target) {
#if defined(__x86_64__)
    if (!target) return NULL;
    pthread_mutex_lock(&table_mutex);
    size_t at = index_of(target);
    while (slot_index[at] && stasis_gate_targets[slot_index[at] - 1] != target) at = (at + 1) % INDEX_SIZE;
    if (slot_index[at]) {
        unsigned found = slot_index[at] - 1;
        pthread_mutex_unlock(&table_mutex);
        return stasis_gate_trampolines + (size_t)found * TRAMPOLINE_BYTES;
    }
    if (used_slots == GATE_SLOTS) {
        pthread_mutex_unlock(&table_mutex);
        atomic_fetch_add(&ungated, 1);
        return target;
    }
    unsigned slot = used_slots;
    stasis_gate_targets[slot] = target;
    // The target is in place before any thread can learn the trampoline's address.
    atomic_thread_fence(memory_order_release);
    used_slots++;
    slot_index[at] = slot + 1;
    pthread_mutex_unlock(&table_mutex);
    return stasis_gate_trampolines + (size_t)slot * TRAMPOLINE_BYTES;
#else
    atomic_fetch_add(&ungated, 1);
    return target;
#endif
}

HIDDEN uint64_t gate_calls(void) { return atomic_load(&calls); }

HIDDEN void gate_counts(uint64_t *gated, uint64_t *ungated_out) {
    pthread_mutex_lock(&table_mutex);
    *gated = used_slots;
    pthread_mutex_unlock(&table_mutex);
    *ungated_out = atomic_load(&ungated);
}

// After fork the child has one thread, outside any call: nothing is inside, nothing is held.
HIDDEN void gate_after_fork_child(void) {
    pthread_mutex_init(&mutex, NULL);
    pthread_cond_init(&changed, NULL);
    pthread_mutex_init(&table_mutex, NULL);
    // Only this thread is left: every other record is free, and this one counts nothing.
    for (thread_record *r = atomic_load(&records); r; r = r->next) {
        atomic_store(&r->inside, 0);
        if (r != mine) atomic_store(&r->taken, 0);
    }
    atomic_store(&closed, 0);
}

// ---- self-test (no GPU needed)

// Sixteen integer arguments (ten on the stack, the most any driver function passes) and a double.
typedef long (*sixteen_fn)(long, long, long, long, long, long, long, long, long, long, long, long, long, long, long, long, double);

static long sixteen(long a, long b, long c, long d, long e, long f, long g, long h, long i, long j, long k, long l, long m, long n,
                    long o, long p, double x) {
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h + 9 * i + 10 * j + 11 * k + 12 * l + 13 * m + 14 * n + 15 * o +
           16 * p + (long)(x * 100);
}

static atomic_int held_call_done;

static void *call_while_closed(void *function) {
    sixteen_fn call = (sixteen_fn)function;
    call(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0.5);
    atomic_store(&held_call_done, 1);
    return NULL;
}

int stasis_agent_selftest(char *report, unsigned long length) {
    sixteen_fn through = (sixteen_fn)gate_wrap((void *)sixteen);
    if ((void *)through == (void *)sixteen) { snprintf(report, length, "no trampoline on this architecture"); return 1; }
    if (gate_wrap((void *)sixteen) != (void *)through) { snprintf(report, length, "the same target got two trampolines"); return 2; }
    long expected = sixteen(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 1.25);
    long got = through(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 1.25);
    if (got != expected) { snprintf(report, length, "sixteen arguments through the gate: %ld, expected %ld", got, expected); return 3; }
    if (gate_close(100) != 0) { snprintf(report, length, "the gate did not close with nobody inside"); return 4; }
    atomic_store(&held_call_done, 0);
    pthread_t thread;
    pthread_create(&thread, NULL, call_while_closed, (void *)through);
    struct timespec pause = {0, 100 * 1000000L};
    nanosleep(&pause, NULL);
    int early = atomic_load(&held_call_done);
    gate_open();
    pthread_join(thread, NULL);
    if (early) { snprintf(report, length, "a call went through the closed gate"); return 5; }
    if (!atomic_load(&held_call_done)) { snprintf(report, length, "a held call did not go on after the gate opened"); return 6; }
    snprintf(report, length, "gate: sixteen arguments and a double pass (%ld), a call waits while closed and goes on after", got);
    return 0;
}

// ---- cost of the gate (no GPU needed)

static long __attribute__((noinline)) four(long a, long b, long c, long d) { return a + b + c + d; }

typedef struct {
    long (*call)(long, long, long, long);
    long rounds;
    long sum;
} cost_work;

static void *cost_thread(void *argument) {
    cost_work *work = argument;
    long sum = 0;
    for (long i = 0; i < work->rounds; i++) sum += work->call(i, 1, 2, 3);
    work->sum = sum;
    return NULL;
}

static double cost_of(long (*call)(long, long, long, long), long rounds, int threads) {
    pthread_t ids[16];
    cost_work work[16];
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int t = 0; t < threads; t++) {
        work[t] = (cost_work){call, rounds, 0};
        pthread_create(&ids[t], NULL, cost_thread, &work[t]);
    }
    for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
    clock_gettime(CLOCK_MONOTONIC, &end);
    return ((double)(end.tv_sec - start.tv_sec) * 1e9 + (double)(end.tv_nsec - start.tv_nsec)) / (double)rounds;
}

double stasis_agent_gate_cost(long rounds, int threads, double *direct) {
    if (threads < 1) threads = 1;
    if (threads > 16) threads = 16;
    long (*through)(long, long, long, long) = (long (*)(long, long, long, long))gate_wrap((void *)four);
    *direct = cost_of(four, rounds, threads);
    return cost_of(through, rounds, threads);
}
