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

/// The watch for a stasis that died after RELEASE (orphan.c), driven by the control thread; exported so that
/// the agent stand-in's tests drive the same code without a GPU.
/// Replaces the settings read from the environment at load (STASIS_AGENT_STASIS, STASIS_AGENT_ORPHAN_GRACE;
/// a negative grace: never) and where messages go (standard error).
void stasis_agent_orphan_configure(const char *stasis_binary, double grace_seconds, int messages_fd);
/// A RESCUE_STORE message (a stasis_agent_message): a piece of the rescue entry's store path.
void stasis_agent_orphan_store_piece(const void *message);
/// RELEASE succeeded on `controller_fd`: its peer is the stasis to watch.
void stasis_agent_orphan_released(int controller_fd);
/// The memory is back and the calls go on: nothing to watch.
void stasis_agent_orphan_resumed(void);
void stasis_agent_orphan_after_fork_child(void);
/// Called between connections while the control thread waits; `contents_lost`: the memory is released and
/// not refilled yet. Starts `stasis resume` when the controller has been gone for the grace period, reaps
/// it and says how it went. Returns how many milliseconds to wait at most before the next call (-1: none
/// needed until the next connection).
int stasis_agent_orphan_step(int contents_lost);

#ifdef __cplusplus
}
#endif
#endif
