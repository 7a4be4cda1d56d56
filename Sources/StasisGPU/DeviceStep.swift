import StasisCore
import StasisStore

/// The per-process device work around a CRIU dump and restore: the seam where GPU support plugs in.
///
/// Order on dump: `beforeFreeze` (before CRIU seizes the tree), CRIU dump, then `afterDump` once CRIU has
/// finished (the tree runs again there only with --leave-running). When anything after `beforeFreeze`
/// fails, `rollback` must put every touched process back as it was. On restore: CRIU restore, then
/// `afterRestore` for the restored PIDs.
public protocol DeviceStep: Sendable {
    var name: String { get }
    /// Whether process `pid` holds this backend's device open: a tree with one must hold still before the dump
    /// touches it, and one that opens it after `beforeFreeze` looked stops the dump.
    func usesDevice(_ pid: Int32) -> Bool
    /// Prepares the tree's devices for the freeze: returns the manifest's GPU section and the chunked files
    /// of device memory moved into `store` on the way (by agents, see `AgentSession`).
    func beforeFreeze(pids: [Int32], store: DeviceStore) throws -> FrozenDevices
    func afterDump(section: Manifest.GPUSection, leaveRunning: Bool) throws
    /// Once a --leave-running dump's tree runs again: moves device memory staged in memory (see
    /// `DeviceStore.stageInMemory`) into `store`, durable there, for the checkpoint's `files`. Returns what it
    /// added to the store, or nil when nothing was staged.
    func settle(files: [Manifest.FileEntry], into store: ChunkStore) throws -> ChunkIngester.Statistics?
    /// Returns what could not be put back (empty when every process runs as before).
    func rollback(section: Manifest.GPUSection) -> [String]
    /// Checked before anything is restored: can this machine take the checkpoint's devices?
    func checkRestorable(section: Manifest.GPUSection) throws
    /// Returns the seconds of its phases by name (for the restore report). `holdCalls` (a prepared restore):
    /// the devices come back and are checked, but the processes' device calls stay held until `letGo`.
    func afterRestore(section: Manifest.GPUSection, store: DeviceStore?, files: [Manifest.FileEntry], holdCalls: Bool) throws -> [String: Double]
    /// Why the devices of `section` cannot come back ahead of demand with their calls held, or nil.
    func refusesHolding(section: Manifest.GPUSection) -> String?
    /// Lets the device calls of processes restored with `holdCalls` go on (`stasis activate`).
    func letGo(pids: [Int32]) throws
}

/// Where device memory goes on dump and comes from on restore: the checkpoint's store.
public struct DeviceStore: Sendable {
    public var store: ChunkStore
    /// How new chunks are compressed (dumps only: reading takes each chunk's codec from its header).
    public var codec: Codec
    /// The checkpoint directory, for error messages.
    public var checkpoint: String
    /// A dump whose tree runs on (--leave-running) and publishes after it does: device memory may go to a
    /// store in memory first (`MemoryStage`), so that the job does not wait for the disk; `settle` moves it.
    public var stageInMemory: Bool
    public init(store: ChunkStore, codec: Codec = .standard, checkpoint: String, stageInMemory: Bool = false) {
        self.store = store
        self.codec = codec
        self.checkpoint = checkpoint
        self.stageInMemory = stageInMemory
    }
}

public struct FrozenDevices: Sendable {
    public var section: Manifest.GPUSection
    /// Chunked files (paths under gpu/) holding device memory, for the manifest, and what they added to the store.
    public var files: [Manifest.FileEntry]
    public var statistics: ChunkIngester.Statistics
    public init(section: Manifest.GPUSection = Manifest.GPUSection(), files: [Manifest.FileEntry] = [],
                statistics: ChunkIngester.Statistics = .init()) {
        self.section = section
        self.files = files
        self.statistics = statistics
    }
}

/// The device step for builds and callers without a device backend. It sees no device in any process, so a
/// dump with it skips what only a device step can judge (a GPU job's tree settling, a process that opened the
/// GPU as the dump began); the command line always uses `Backends.deviceStep()` instead.
public struct NoDeviceStep: DeviceStep {
    public init() {}
    public var name: String { "none" }
    public func usesDevice(_ pid: Int32) -> Bool { false }
    public func beforeFreeze(pids: [Int32], store: DeviceStore) throws -> FrozenDevices { FrozenDevices() }
    public func afterDump(section: Manifest.GPUSection, leaveRunning: Bool) throws {}
    public func settle(files: [Manifest.FileEntry], into store: ChunkStore) throws -> ChunkIngester.Statistics? { nil }
    public func rollback(section: Manifest.GPUSection) -> [String] { [] }
    public func checkRestorable(section: Manifest.GPUSection) throws {
        guard section.processes.isEmpty else {
            throw StasisError(.gpu, "the checkpoint holds GPU state for \(section.processes.count) process(es), which this build cannot restore")
        }
    }
    public func afterRestore(section: Manifest.GPUSection, store: DeviceStore?, files: [Manifest.FileEntry], holdCalls: Bool) throws -> [String: Double] { [:] }
    public func refusesHolding(section: Manifest.GPUSection) -> String? {
        section.processes.isEmpty ? nil : "this build has no device backend"
    }
    public func letGo(pids: [Int32]) throws {}
}
