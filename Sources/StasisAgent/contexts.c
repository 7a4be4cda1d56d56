// The contexts the agent works in: each device's primary context, which it copies and pins in, and the
// contexts of the program's own that it synchronises at a checkpoint.
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "tables.h"

static CUcontext device_contexts[MAX_DEVICES];

/// The device's primary context: what the agent copies and pins in. VMM memory belongs to the device, not
/// to a context, and the primary context lives as long as the process (a context the program creates and
/// destroys would take the ring with it).
static CUresult primary_context(int device, CUcontext *context) {
    if (device < 0 || device >= MAX_DEVICES) return CUDA_ERROR_INVALID_VALUE;
    if (!device_contexts[device]) {
        CUresult result = real.cuDevicePrimaryCtxRetain(&device_contexts[device], device);
        if (result != CUDA_SUCCESS) return result;
    }
    *context = device_contexts[device];
    return CUDA_SUCCESS;
}

// Contexts of the program's own (not the primary one) that it allocated in, per device: they are
// synchronised at a checkpoint too, and forgotten when the program destroys them.
#define CONTEXTS_PER_DEVICE 4
static CUcontext program_contexts[MAX_DEVICES][CONTEXTS_PER_DEVICE];

HIDDEN void remember_program_context(int device) {
    CUcontext current = NULL, primary = NULL;
    CUdevice current_device;
    if (device < 0 || real.cuCtxGetCurrent(&current) != CUDA_SUCCESS || !current) return;
    if (real.cuCtxGetDevice(&current_device) != CUDA_SUCCESS || current_device != device) return;
    if (primary_context(device, &primary) != CUDA_SUCCESS || current == primary) return;
    for (int i = 0; i < CONTEXTS_PER_DEVICE; i++) {
        if (program_contexts[device][i] == current) return;
        if (!program_contexts[device][i]) {
            program_contexts[device][i] = current;
            return;
        }
    }
    agent_log("more than %d contexts of the program's own on GPU %d: the others are not synchronised at checkpoints", CONTEXTS_PER_DEVICE, device);
}

HIDDEN void memory_context_destroyed(CUcontext context) {
    pthread_mutex_lock(&tables);
    for (int device = 0; device < MAX_DEVICES; device++) {
        for (int i = 0; i < CONTEXTS_PER_DEVICE; i++) {
            if (program_contexts[device][i] == context) program_contexts[device][i] = NULL;
        }
    }
    pthread_mutex_unlock(&tables);
}

HIDDEN CUresult memory_use_device(int device) {
    CUcontext primary = NULL;
    CUresult result = primary_context(device, &primary);
    return result == CUDA_SUCCESS ? real.cuCtxSetCurrent(primary) : result;
}

/// A synchronisation that may never end (GPU work waiting on a host thread held at the gate): it runs on a
/// thread of its own, and whoever gives up on it leaves it to free itself.
typedef struct {
    pthread_mutex_t mutex;
    pthread_cond_t finished;
    int devices[(1 + CONTEXTS_PER_DEVICE) * MAX_DEVICES];
    CUcontext contexts[(1 + CONTEXTS_PER_DEVICE) * MAX_DEVICES];
    int count, context_count, done, abandoned;
    CUresult result;
    char why[160];
} sync_job;

static void *synchronise(void *argument) {
    sync_job *job = argument;
    CUresult result = CUDA_SUCCESS;
    for (int i = 0; i < job->context_count && result == CUDA_SUCCESS; i++) {
        result = real.cuCtxSetCurrent(job->contexts[i]);
        if (result == CUDA_SUCCESS) result = real.cuCtxSynchronize();
        if (result != CUDA_SUCCESS) snprintf(job->why, sizeof job->why, "synchronising a context of GPU %d failed: %s", job->devices[i], driver_error_name(result));
    }
    pthread_mutex_lock(&job->mutex);
    job->result = result;
    job->done = 1;
    int abandoned = job->abandoned;
    pthread_cond_signal(&job->finished);
    pthread_mutex_unlock(&job->mutex);
    if (abandoned) free(job);
    return NULL;
}

HIDDEN CUresult memory_synchronize(unsigned timeout_ms, char *why, size_t length) {
    sync_job *job = calloc(1, sizeof *job);
    if (!job) return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_init(&job->mutex, NULL);
    pthread_cond_init(&job->finished, NULL);
    pthread_mutex_lock(&tables);
    int seen[MAX_DEVICES] = {0};
    for (size_t i = 0; i < handle_count; i++) {
        int device = device_of(&handles[i]->prop);
        if (device >= 0 && !seen[device]) seen[device] = 1;
    }
    pthread_mutex_unlock(&tables);
    for (int device = 0; device < MAX_DEVICES; device++) {
        if (!seen[device]) continue;
        CUcontext primary = NULL;
        CUresult result = primary_context(device, &primary);
        if (result != CUDA_SUCCESS) {
            snprintf(why, length, "no primary context on GPU %d: %s", device, driver_error_name(result));
            free(job);
            return result;
        }
        job->devices[job->context_count] = device;
        job->contexts[job->context_count++] = primary;
        pthread_mutex_lock(&tables);
        for (int i = 0; i < CONTEXTS_PER_DEVICE; i++) {
            if (!program_contexts[device][i]) continue;
            job->devices[job->context_count] = device;
            job->contexts[job->context_count++] = program_contexts[device][i];
        }
        pthread_mutex_unlock(&tables);
    }
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    pthread_t thread;
    int started = pthread_create(&thread, NULL, synchronise, job) == 0;
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (!started) {
        free(job);
        snprintf(why, length, "cannot start a thread to synchronise");
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    pthread_detach(thread);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&job->mutex);
    while (!job->done && pthread_cond_timedwait(&job->finished, &job->mutex, &deadline) != ETIMEDOUT) {}
    if (!job->done) {
        job->abandoned = 1;
        pthread_mutex_unlock(&job->mutex);
        snprintf(why, length, "the GPU did not finish its work within %u ms with CUDA calls held (does it wait on a host thread?)", timeout_ms);
        return CUDA_ERROR_TIMEOUT;
    }
    pthread_mutex_unlock(&job->mutex);
    CUresult result = job->result;
    if (result != CUDA_SUCCESS) snprintf(why, length, "%s", job->why);
    free(job);
    return result;
}
