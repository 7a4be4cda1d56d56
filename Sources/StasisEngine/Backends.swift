import StasisContainer
import StasisCore
import StasisGPU
import StasisStore

/// Where stasis's backends are chosen: the device step (the CUDA driver and the agents), the container
/// runtime (runc) and the chunk store (a directory). The command line builds one from its options and hands
/// the engine what it returns; nothing else names a concrete backend, so another GPU vendor, runtime or kind
/// of store is added here (and in its own module), not across the tree.
public struct Backends: Sendable {
    /// How long the driver may take to lock a GPU process, and a GPU job's tree to hold still (--lock-timeout).
    public var lockTimeoutSeconds: Double
    /// Checkpointed GPU UUID to this machine's (--gpu-map).
    public var gpuMap: [String: String]

    public init(lockTimeoutSeconds: Double = 10, gpuMap: [String: String] = [:]) {
        self.lockTimeoutSeconds = lockTimeoutSeconds
        self.gpuMap = gpuMap
    }

    /// The device step for dumps and restores: CUDA, which stands aside for trees that use no GPU.
    public func deviceStep() -> any DeviceStep {
        CUDADeviceStep(lockTimeoutMilliseconds: UInt32(lockTimeoutSeconds * 1000), gpuMap: gpuMap)
    }

    /// The container runtime, found now: refused (`runtime`) when it is not installed.
    public func containerRuntime() throws -> any ContainerRuntime { try Runc.locate() }

    /// The chunk store named by `explicit` (--store), else STASIS_STORE, else the default; `create` makes it
    /// when missing (writers), else a missing store is an error.
    public func openStore(_ explicit: String?, create: Bool) throws -> any ChunkStore {
        try ChunkStores.open(path: StoreLocation.resolve(explicit, recorded: nil), create: create)
    }
}
