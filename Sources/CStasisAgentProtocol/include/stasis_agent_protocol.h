// The control channel between stasis and the agent preloaded into a GPU process (libstasis-agent.so).
//
// The agent listens on the abstract unix socket "@stasis-agent-<pid>" (<pid> as the process sees itself) and
// serves one connection at a time, from root or the process's own user only (SO_PEERCRED). Every message is
// one fixed-size `stasis_agent_message`, both ways.
//
// A checkpoint, as stasis drives it:
//   HELLO -> HELLO (the agent's state and ring)
//   QUIESCE -> TABLE_ENTRY... TABLE_END    new CUDA calls are held at the interposer, running ones drained,
//                                          contexts synchronised; the entries list the device memory it holds
//   DIGESTS -> OK                          load the GPU's chunk-digest kernel (OK's length: 1 if it can be
//                                          used, else 0 and text says why; stasis then hashes on its CPUs)
//   EVACUATE -> FILLED... EVACUATED        device memory copied out through the pinned ring, a slot a message;
//              (stasis answers each FILLED with FREE once it has read the slot; with EVACUATE's length 1,
//              every FILLED carries the chunk's SHA-256 from the GPU, and a chunk of zeros comes as a
//              FILLED with slot -1 and nothing copied; EVACUATE's text may name the reserve directory of the
//              store: an agent whose arena lives there copies into its pieces instead, FILLED with
//              CHUNK_ARENA, and stasis takes each piece's file as the chunk's)
//   RELEASE -> OK                          physical memory given back, address ranges kept
//   (connection closed; the driver checkpoint and CRIU run; the agent waits in accept())
//   REBACK -> OK                           new physical memory mapped at the same addresses
//   WRITE... -> WRITTEN..., ZERO...        contents streamed back through the ring (zeros: a device memset)
//   FLUSH -> (WRITTEN...) OK               every copy into the device finished
//   VERIFY -> DIGEST... OK                 the SHA-256 of every chunk now in the device (after DIGESTS)
//   RESUME -> OK                           held CUDA calls proceed
//
// Device memory shared between processes (cuMemExportToShareableHandle / cuMemImportFromShareableHandle with
// POSIX file descriptors, as NCCL does inside a node): every agent keeps a duplicate of each descriptor it
// exported or imported, and TABLE_ENTRY names them (chunk_flags SHARE_EXPORTED or SHARE_IMPORTED; `slot`:
// the first such descriptor, `share_count`: how many, `digest`: up to 8 of them as int32s), so that stasis can
// tell which export every import came from (kcmp(2) on the two processes' descriptors). An imported
// allocation has no bytes of its own (length 0): its owner's agent moves its memory once. Then:
//   ADOPT (id) -> OK                       an imported allocation whose exporter is gone becomes this
//                                          process's own: moved, re-created and exported by this agent
//   (RELEASE closes the duplicates; memory imported from others is unmapped and released too)
//   REBACK -> OK                           re-creates and maps the process's own memory; imported memory
//                                          stays unmapped until IMPORT
//   EXPORT (id) -> OK + descriptor         a POSIX descriptor for the allocation, passed with SCM_RIGHTS
//   IMPORT (id) + descriptor -> OK         imports the descriptor in place of allocation `id` and maps it
//                                          where it was, with the access it had
// RESUME is refused while any mapping is still missing.
//
// Legacy CUDA IPC (cuIpcGetMemHandle / cuIpcOpenMemHandle) of memory the agent backs is served by the agents
// themselves: the exporter's handle names its PID and allocation (ipc.c), and the importer's agent asks the
// exporter's for the descriptor (IPC_FD, on this same socket, in any state), imports it and maps it; from
// then on it is shared memory as above.
// A connection that ends while memory is held but still backed resumes the process (stasis went away before
// anything was released); one that ends after RELEASE waits for the next connection to REBACK.
//
// A stasis that dies after RELEASE (orphan.c): the agent remembers who sent RELEASE (SO_PEERCRED), and where
// the rescue entry is (RESCUE_STORE, sent before RELEASE by a stasis whose HELLO answer had
// STASIS_AGENT_CAN_RESUME_ITSELF). Once that stasis is gone for a grace period with the memory still not put
// back, the agent starts `stasis resume <its PID> --store <that store>` itself.
#ifndef STASIS_AGENT_PROTOCOL_H
#define STASIS_AGENT_PROTOCOL_H

#include <stdint.h>

#define STASIS_AGENT_PROTOCOL_VERSION 3
#define STASIS_AGENT_SOCKET_PREFIX "stasis-agent-"
// The staging ring is a memfd of this name, mapped shared: stasis maps the same pages (through
// /proc/PID/map_files) and reads and writes the slots in place. A ring of any other kind (the driver's pinned
// memory, where memfd_create is refused) is reached with process_vm_readv/writev instead.
#define STASIS_AGENT_RING_NAME "stasis-ring"

enum stasis_agent_op {
    STASIS_AGENT_OK = 0,
    STASIS_AGENT_ERROR = 1,
    STASIS_AGENT_HELLO = 2,
    STASIS_AGENT_QUIESCE = 3,      // length: the drain timeout in ms
    STASIS_AGENT_TABLE_ENTRY = 4,  // id, length: bytes, device: ordinal
    STASIS_AGENT_TABLE_END = 5,    // id: entries, length: bytes
    STASIS_AGENT_EVACUATE = 6,
    STASIS_AGENT_FILLED = 7,       // slot holds bytes [offset, offset + length) of allocation id
    STASIS_AGENT_FREE = 8,         // slot may be reused
    STASIS_AGENT_EVACUATED = 9,    // length: bytes copied
    STASIS_AGENT_RELEASE = 10,
    STASIS_AGENT_REBACK = 11,
    STASIS_AGENT_WRITE = 12,       // slot holds bytes [offset, offset + length) of allocation id: copy them in
    STASIS_AGENT_ZERO = 13,        // bytes [offset, offset + length) of allocation id are zero
    STASIS_AGENT_WRITTEN = 14,     // slot's copy into the device is done (ZERO has no answer; FLUSH waits for it)
    STASIS_AGENT_FLUSH = 15,       // wait for every WRITE and ZERO, then OK
    STASIS_AGENT_RESUME = 16,
    STASIS_AGENT_DIGESTS = 17,     // prepare the GPU's digest kernel
    STASIS_AGENT_VERIFY = 18,      // hash every chunk in the device
    STASIS_AGENT_DIGEST = 19,      // bytes [offset, offset + length) of allocation id have `digest` (flags say)
    STASIS_AGENT_EXPORT = 20,      // id: a shared allocation; OK carries a descriptor for it (SCM_RIGHTS)
    STASIS_AGENT_IMPORT = 21,      // id: an imported allocation, the descriptor passed with the message
    STASIS_AGENT_ADOPT = 22,       // id: an imported allocation this process now owns
    STASIS_AGENT_IPC_FD = 23,      // id: asked by another process's agent (legacy CUDA IPC): OK carries
                                   // the allocation's POSIX descriptor (SCM_RIGHTS)
    STASIS_AGENT_RESCUE_STORE = 24,  // a piece of the path of the store holding this process's rescue entry:
                                     // bytes [offset, offset + length) of a path of id bytes, in text; no
                                     // answer. Sent only to agents that can resume by themselves (below)
};

// HELLO's answer, chunk_flags: what this agent can do beyond its protocol version (older agents send 0).
enum stasis_agent_features {
    STASIS_AGENT_CAN_RESUME_ITSELF = 1,  // takes RESCUE_STORE, and runs `stasis resume` when its stasis died
};

// FILLED's, DIGEST's and TABLE_ENTRY's chunk_flags.
enum stasis_agent_chunk_flags {
    STASIS_AGENT_CHUNK_DIGEST = 1,  // digest holds the chunk's SHA-256, computed on the GPU
    STASIS_AGENT_CHUNK_ZERO = 2,    // every byte of the chunk is zero (FILLED: nothing copied, slot -1)
    STASIS_AGENT_SHARE_EXPORTED = 4,  // TABLE_ENTRY: exported to other processes (its descriptors follow)
    STASIS_AGENT_SHARE_IMPORTED = 8,  // TABLE_ENTRY: imported from another process (length 0)
    STASIS_AGENT_CHUNK_ARENA = 16,    // FILLED: copied into an arena piece (`slot`), the file named in text, in
                                      // the reserve directory EVACUATE named: stasis writes the chunk header and
                                      // takes the file, or leaves it; no FREE
};

/// The most descriptors a TABLE_ENTRY names (in `digest`, as int32s).
#define STASIS_AGENT_MAX_SHARE_FDS 8

enum stasis_agent_state {
    STASIS_AGENT_RUNNING = 0,   // CUDA calls pass
    STASIS_AGENT_HELD = 1,      // CUDA calls held, device memory backed
    STASIS_AGENT_RELEASED = 2,  // CUDA calls held, physical memory given back
};

typedef struct {
    uint32_t op;
    int32_t slot;
    uint64_t id;
    uint64_t offset;
    uint64_t length;
    int32_t device;
    int32_t status;  // a CUresult, or 0
    // HELLO's answer: the agent's facts.
    uint64_t ring_address;   // the pinned staging ring, in the agent's address space (0: not yet allocated)
    uint32_t slot_bytes;
    uint32_t slot_count;
    uint32_t state;          // stasis_agent_state
    uint32_t version;        // STASIS_AGENT_PROTOCOL_VERSION
    uint64_t tracked_bytes;  // device memory the agent can evacuate
    uint64_t driver_bytes;   // bytes of cuMemAlloc it left to the driver so far (small ones; a diagnostic)
    uint64_t gated_functions;    // driver entry points handed out behind the gate
    uint64_t ungated_functions;  // ... and without it (the trampoline table was full): calls it cannot hold
    char text[120];          // ERROR: why; HELLO: the agent's build
    uint8_t digest[32];      // FILLED, DIGEST: the chunk's SHA-256 (with STASIS_AGENT_CHUNK_DIGEST)
    uint32_t chunk_flags;    // FILLED, DIGEST, TABLE_ENTRY: stasis_agent_chunk_flags
    uint32_t share_count;    // TABLE_ENTRY: descriptors named in `digest`
} stasis_agent_message;

#endif
