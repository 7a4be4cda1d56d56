import StasisCore

/// What stasis needs of an OCI container runtime to checkpoint and restore a container: its state and
/// processes, freezing and thawing it, and having the runtime drive CRIU for it (it knows how the container
/// was made: its mounts, namespaces, cgroups and console). Today there is one, `Runc`; the engine receives
/// it from `Backends` (StasisEngine), where a runtime is chosen.
public protocol ContainerRuntime: Sendable {
    /// The runtime's name, as a manifest records it (`Manifest.Container.runtime`).
    var name: String { get }
    /// The runtime's executable.
    var path: String { get }
    /// The container's state as the runtime knows it; refused (`processNotFound`) when it knows no such container.
    func state(_ id: String) throws -> ContainerState
    /// Every process of the container, those started beside its init (`exec`) too.
    func processes(_ id: String) throws -> [Int32]
    /// Freezes every process of the container.
    func pause(_ id: String) throws
    /// Thaws a paused container.
    func resume(_ id: String) throws
    /// Checkpoints the container into `images` (CRIU's log in `work`). Without `leaveRunning`, the runtime
    /// removes the container once its images are complete.
    func checkpoint(_ id: String, images: String, work: String, leaveRunning: Bool, tcpEstablished: Bool, shellJob: Bool) throws
    /// Restores container `id` from `images` with the bundle `bundle`, detached.
    func restore(_ id: String, bundle: String, images: String, work: String, tcpEstablished: Bool, shellJob: Bool) throws
    /// Kills the container and removes it from the runtime's list.
    func remove(_ id: String) throws
}

/// A container as its runtime reports it.
public struct ContainerState: Sendable {
    public var id: String
    public var pid: Int32
    /// "running", "paused", "stopped", ... as the runtime says.
    public var status: String
    /// The OCI bundle it runs from.
    public var bundle: String
    public init(id: String, pid: Int32, status: String, bundle: String) {
        self.id = id
        self.pid = pid
        self.status = status
        self.bundle = bundle
    }
}
