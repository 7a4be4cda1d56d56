// The agent gate's cost per call: a four-argument function called through one of the gate's trampolines
// against the same call made directly, by 1 and 2 threads at once. No GPU needed.
//   scripts/build-agent.sh && cc -O2 -o /tmp/gate-cost bench/gate-cost.c -ldl && /tmp/gate-cost .build/agent/libstasis-agent.so
#include <dlfcn.h>
#include <stdio.h>

int main(int argc, char **argv) {
    const char *library = argc > 1 ? argv[1] : ".build/agent/libstasis-agent.so";
    void *agent = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    if (!agent) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    double (*cost)(long, int, double *) = (double (*)(long, int, double *))dlsym(agent, "stasis_agent_gate_cost");
    if (!cost) { fprintf(stderr, "no stasis_agent_gate_cost in %s\n", library); return 1; }
    for (int threads = 1; threads <= 2; threads++) {
        double direct, gated = cost(20000000, threads, &direct);
        printf("%d thread(s): %.1f ns a call through the gate, %.1f ns direct: %.1f ns added\n", threads, gated, direct, gated - direct);
    }
    return 0;
}
