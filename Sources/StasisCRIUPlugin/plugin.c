// stasis's CRIU plugin: CUDA processes for plain `criu`, runc and podman, through the same driver steps as
// the stasis command (CStasisCUDA). Built by scripts/build-criu-plugin.sh into libstasis_cuda_plugin.so; load
// it with `criu ... -L DIR` or install it in CRIU's plugin directory.
//
// Dump: PAUSE_DEVICES runs for each task before CRIU seizes it, while it still runs; there the plugin locks
// the CUDA process and checkpoints it (its device memory moves into its host memory, which CRIU dumps). The
// process's restore thread runs freely at that point, so no ptrace of CRIU's tasks is needed.
// CHECKPOINT_DEVICES, which runs once CRIU has frozen the task, makes no driver call: the driver's answer to
// any query about a process (even cuCheckpointProcessGetState) needs that process's restore thread, so a
// query there never returns (seen on driver 580.159.04: CRIU hung in this hook until killed). It accepts the
// processes PAUSE_DEVICES checkpointed. Restore: CRIU calls RESUME_DEVICES_LATE while the restored tasks are
// still stopped under its ptrace, so that hook too only leaves a helper, which restores and unlocks each CUDA
// process once CRIU has released it.
//
// When a dump fails, or succeeds with --leave-running, the tasks CRIU froze get their GPU back: CRIU calls
// the exit hook while they are still frozen, so the hook leaves the same kind of helper (a process CRIU
// killed after a good dump is simply gone).
//
// The driver is never initialised inside CRIU's own process: CRIU forks the restored tasks, and a process that
// has called cuInit must not fork. Every driver step runs in a short-lived child of CRIU (as CRIU's own cuda
// plugin runs the cuda-checkpoint binary), which reports the driver's answer through a pipe. A child that does
// not answer in time (STASIS_CUDA_STEP_TIMEOUT_S, default 600 s) is killed and the step fails, so a wedged
// driver cannot hang CRIU.
//
// Not the plugin's business: processes that are not CUDA processes (-ENOTSUP, as CRIU expects), and runs
// where stasis drives the GPU itself (STASIS_CRIU_PLUGIN=off in CRIU's environment).
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "CStasisCUDA.h"
#include "stasis_criu_plugin_abi.h"

#define MAX_TOUCHED 1024

static int enabled;
static int touched[MAX_TOUCHED];
static int touched_count;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    // CRIU keeps the plugin's stderr in its log when logging to a file. Under runc that stderr is runc's
    // (often /dev/null), and the helper that resumes after a restore outlives CRIU: STASIS_CUDA_PLUGIN_LOG
    // names a file that gets every line as well.
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "stasis-cuda-plugin: %s\n", line);
    const char *path = getenv("STASIS_CUDA_PLUGIN_LOG");
    FILE *log = path && *path ? fopen(path, "ae") : NULL;
    if (log) {
        fprintf(log, "stasis-cuda-plugin[%d]: %s\n", (int)getpid(), line);
        fclose(log);
    }
}

static unsigned long setting(const char *name, unsigned long fallback) {
    const char *value = getenv(name);
    return value && *value ? strtoul(value, NULL, 10) : fallback;
}

static unsigned int lock_timeout_ms(void) { return (unsigned int)setting("STASIS_CUDA_LOCK_TIMEOUT_MS", 10000); }

enum step { STEP_PROBE, STEP_STATE, STEP_LOCK_AND_CHECKPOINT, STEP_RESUME };

struct answer {
    int result;  // a CUresult, or STASIS_CUDA_ERROR_NO_DRIVER
    int state;   // STEP_STATE: the process's CUDA state
};

// Waits for the child's answer on fd; 0 when it came, -1 on timeout or error.
static int wait_answer(int fd, struct answer *answer) {
    long long left_ms = (long long)setting("STASIS_CUDA_STEP_TIMEOUT_S", 600) * 1000;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int ready = poll(&p, 1, left_ms > 60000 ? 60000 : (int)left_ms);
        if (ready > 0) return read(fd, answer, sizeof *answer) == sizeof *answer ? 0 : -1;
        if (ready < 0 && errno != EINTR) return -1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long long spent = (now.tv_sec - start.tv_sec) * 1000LL + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (spent >= left_ms) return -1;
    }
}

// Runs one driver step for PID in a child process and returns the driver's answer.
static struct answer run_step(enum step step, int pid) {
    struct answer answer = {STASIS_CUDA_ERROR_NO_DRIVER, -1};
    int ends[2];
    if (pipe(ends) != 0) return answer;
    pid_t child = fork();
    if (child < 0) {
        close(ends[0]);
        close(ends[1]);
        return answer;
    }
    if (child == 0) {
        close(ends[0]);
        struct answer mine = {STASIS_CUDA_ERROR_NO_DRIVER, -1};
        char error[256];
        if (stasis_cuda_load(error, sizeof error) == 0 && stasis_cuda_has_checkpoint_api()) {
            switch (step) {
            case STEP_PROBE: mine.result = 0; break;
            case STEP_STATE: mine.result = stasis_cuda_get_state(pid, &mine.state); break;
            case STEP_LOCK_AND_CHECKPOINT:
                mine.result = stasis_cuda_lock(pid, lock_timeout_ms());
                if (mine.result == 0) mine.result = stasis_cuda_checkpoint(pid);
                break;
            case STEP_RESUME: mine.result = stasis_cuda_resume(pid); break;
            }
        }
        if (write(ends[1], &mine, sizeof mine) != sizeof mine) _exit(1);
        _exit(0);
    }
    close(ends[1]);
    if (wait_answer(ends[0], &answer) != 0) {
        say("no answer from the driver step for PID %d (it hung past STASIS_CUDA_STEP_TIMEOUT_S, or crashed)", pid);
        kill(child, SIGKILL);
        answer.result = STASIS_CUDA_ERROR_TIMEOUT;
    }
    close(ends[0]);
    while (waitpid(child, NULL, 0) < 0 && errno == EINTR) {}
    return answer;
}

static int switched_off(void) {
    const char *value = getenv("STASIS_CRIU_PLUGIN");
    return value && !strcmp(value, "off");  // stasis drives the GPU itself
}

static int plugin_init(int stage) {
    (void)stage;
    // No driver, or one without the checkpoint API: nothing for us here, stay quiet.
    enabled = !switched_off() && run_step(STEP_PROBE, 0).result == 0;
    return 0;
}

// The process's CUDA state, or -1 for a process the driver does not know (not a CUDA process).
static int cuda_state(int pid) {
    struct answer answer = run_step(STEP_STATE, pid);
    return answer.result == 0 ? answer.state : -1;
}

// True when the process carries stasis's agent (started by `stasis run`).
static int has_agent(int pid) {
    char path[64], line[1024];
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *maps = fopen(path, "re");
    if (!maps) return 0;
    int found = 0;
    while (!found && fgets(line, sizeof line, maps)) found = strstr(line, "/libstasis-agent.so") != NULL;
    fclose(maps);
    return found;
}

static int pause_devices(int pid) {
    if (!enabled) return -ENOTSUP;
    int state = cuda_state(pid);
    if (state < 0) return -ENOTSUP;
    // Seen on the H200 under runc: the driver checkpointed such a process, and its restore then failed
    // (CUresult 1) or never resumed it, losing the job. `stasis dump --container` handles it (the agent
    // moves the memory first). Refused here, before anything is touched: the dump fails, the job runs on.
    if (has_agent(pid)) {
        say("PID %d runs under `stasis run` (its agent is loaded): checkpoint it with `stasis dump` (or `stasis dump --container`), not through the plugin", pid);
        return -1;
    }
    if (state != STASIS_CUDA_RUNNING) {
        say("PID %d is in CUDA state %d, not running", pid, state);
        return -1;
    }
    if (touched_count == MAX_TOUCHED) {
        say("more than %d CUDA processes", MAX_TOUCHED);
        return -1;
    }
    touched[touched_count++] = pid;
    struct answer answer = run_step(STEP_LOCK_AND_CHECKPOINT, pid);
    if (answer.result != 0) {
        say("checkpoint of PID %d failed: CUresult %d", pid, answer.result);
        return -1;
    }
    say("PID %d: device state checkpointed", pid);
    return 0;
}

static int was_touched(int pid) {
    for (int i = 0; i < touched_count; i++)
        if (touched[i] == pid) return 1;
    return 0;
}

static int checkpoint_devices(int pid) {
    // PAUSE_DEVICES checkpointed it already (or failed, and CRIU stopped there); see the top of the file.
    return enabled && was_touched(pid) ? 0 : -ENOTSUP;
}

static int resume_in_child(int pid) {
    struct answer answer = run_step(STEP_RESUME, pid);
    if (answer.result != 0) say("resuming the GPU of PID %d failed: CUresult %d", pid, answer.result);
    return answer.result == 0 ? 0 : -1;
}

// True while CRIU still traces (holds) the process.
static int traced(int pid) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    int tracer = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "TracerPid: %d", &tracer) == 1) break;
    fclose(f);
    return tracer != 0;
}

// Leaves a detached helper that, for each of the PIDs, waits until CRIU has let the process go and then gives
// it its GPU back (restore + unlock) if it is a CUDA process the driver holds checkpointed or locked.
static void resume_when_released(const int *pids, int count) {
    pid_t first = fork();
    if (first < 0) {
        say("cannot fork to resume CUDA processes: %s", strerror(errno));
        return;
    }
    if (first > 0) {
        waitpid(first, NULL, 0);
        return;
    }
    if (fork() != 0) _exit(0);
    setsid();
    for (int fd = 3; fd < 1024; fd++) close(fd);
    for (int i = 0; i < count; i++) {
        int pid = pids[i];
        // CRIU releases the tasks right after its hooks; give it a minute at most.
        for (int waited = 0; waited < 60000 && kill(pid, 0) == 0 && traced(pid); waited += 10) {
            struct timespec ts = {0, 10 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        if (kill(pid, 0) != 0) {  // gone: CRIU killed it after a good dump
            say("PID %d is gone", pid);
            continue;
        }
        if (traced(pid)) {
            say("PID %d is still held after a minute; its GPU stays checkpointed", pid);
            continue;
        }
        int state = cuda_state(pid);
        if (state == STASIS_CUDA_CHECKPOINTED || state == STASIS_CUDA_LOCKED) {
            if (resume_in_child(pid) == 0) say("PID %d: GPU restored", pid);
        } else {
            say("PID %d is in CUDA state %d after its release: nothing to resume", pid, state);
        }
    }
    _exit(0);
}

// CRIU runs this hook while the restored tasks are still stopped under its ptrace, and the driver needs the
// process's restore thread to run (a query there never returns, like CHECKPOINT_DEVICES's): the restore is
// left to a helper that acts once CRIU has released the process. Until then the process's CUDA calls wait
// on the driver's lock.
static int resume_devices_late(int pid) {
    if (!enabled) return -ENOTSUP;
    resume_when_released(&pid, 1);
    return 0;
}

static void plugin_exit(int stage, int ret) {
    (void)ret;
    // After a dump, touched processes that still exist need their GPU back: that covers a failed dump and
    // --leave-running; after a good dump without it, CRIU kills them and the helper finds them gone.
    if (enabled && stage == STASIS_STAGE_DUMP && touched_count > 0) resume_when_released(touched, touched_count);
}

__attribute__((visibility("default"))) stasis_cr_plugin_desc_t CR_PLUGIN_DESC = {
    .name = "stasis_cuda",
    .init = plugin_init,
    .exit = plugin_exit,
    .version = STASIS_CRIU_PLUGIN_VERSION,
    .max_hooks = STASIS_HOOK_MAX,
    .hooks =
        {
            [STASIS_HOOK_RESUME_DEVICES_LATE] = (void *)resume_devices_late,
            [STASIS_HOOK_PAUSE_DEVICES] = (void *)pause_devices,
            [STASIS_HOOK_CHECKPOINT_DEVICES] = (void *)checkpoint_devices,
        },
};
