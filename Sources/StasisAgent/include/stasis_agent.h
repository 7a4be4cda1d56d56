// libstasis-agent.so: preloaded into a GPU program by `stasis run`, it lets stasis checkpoint the program's
// device memory by copying it out itself, instead of through the driver's checkpoint.
//
// It interposes the CUDA driver API: exported symbols (programs linked with -lcuda), dlsym on libcuda, and
// cuGetProcAddress (how the CUDA runtime and PyTorch reach the driver). Every driver entry point it hands out
// passes a gate, so that during a checkpoint new CUDA calls wait and running ones are counted out. cuMemAlloc
// is backed with the virtual memory API (cuMemCreate + cuMemMap) and the program's own VMM allocations are
// tracked, under handles of the agent's, so that their physical memory can be copied out, given back, and
// later re-created at the same addresses. Stasis drives it over the control channel described in
// stasis_agent_protocol.h.
#ifndef STASIS_AGENT_H
#define STASIS_AGENT_H

#ifdef __cplusplus
extern "C" {
#endif

/// Checks the gate's trampolines without a GPU: a function of sixteen integer arguments (ten on the stack)
/// and a double called through one, and a call held while the gate is closed. Returns 0 when every check
/// passed, else the number of the first that failed; `report` gets a line.
int stasis_agent_selftest(char *report, unsigned long length);

/// Nanoseconds per call of a four-argument function through the gate, each of `threads` threads making
/// `rounds` calls at once; `direct` gets the same without the gate.
double stasis_agent_gate_cost(long rounds, int threads, double *direct);

#ifdef __cplusplus
}
#endif
#endif
