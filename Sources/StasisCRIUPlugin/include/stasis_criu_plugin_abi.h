// The parts of CRIU's public plugin ABI (criu/include/criu-plugin.h, plugin version 0.2) this plugin uses,
// declared here so it builds where CRIU's header is not installed. Values must match CRIU's.
#ifndef STASIS_CRIU_PLUGIN_ABI_H
#define STASIS_CRIU_PLUGIN_ABI_H

#define STASIS_CRIU_PLUGIN_VERSION ((0 << 16) + (2 << 8) + 0)

enum {
    STASIS_HOOK_RESUME_DEVICES_LATE = 9,
    STASIS_HOOK_PAUSE_DEVICES = 10,
    STASIS_HOOK_CHECKPOINT_DEVICES = 11,
    STASIS_HOOK_MAX = 13,
};

enum { STASIS_STAGE_DUMP = 0, STASIS_STAGE_PRE_DUMP = 1, STASIS_STAGE_RESTORE = 2 };

typedef struct {
    const char *name;
    int (*init)(int stage);
    void (*exit)(int stage, int ret);
    unsigned int version;
    unsigned int max_hooks;
    void *hooks[STASIS_HOOK_MAX];
} stasis_cr_plugin_desc_t;

#endif
