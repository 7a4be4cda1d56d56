import Foundation
import StasisCRIU
import StasisContainer
import StasisCore
import StasisGPU
import StasisImage
import StasisOS
import StasisStore

/// `stasis restore`: bring a checkpointed tree back, with the same PIDs, detached from stasis.
///
/// Everything that can refuse the restore runs before CRIU starts anything: the manifest, the integrity of
/// every whole file, that every chunk is in the store, the host's CPU, the device check and free PIDs.
/// The chunked memory images then reach CRIU in one of two ways:
/// - streamed (the default): CRIU restores with `--stream` and reads each image from a pipe that stasis
///   fills while decoding and checking chunks on all cores (`CRIUImageServer`). No copy of the images is
///   made, and decoding overlaps CRIU's work. A damaged chunk ends the pipe early: CRIU fails while it is
///   still restoring memory, before any restored process has run an instruction of its own, and removes the
///   tasks it created; stasis names the chunk.
/// - rebuilt (`rebuildRoot` set): rebuilt as files there first, every chunk checked, then CRIU reads them.
/// After CRIU, a failing device step kills the restored tree, so no half-restored process is left behind.
///
/// A container's checkpoint (`manifest.container`) is restored by its runtime, runc, from images rebuilt from
/// the store, as the container it was (or under `Options.containerID`, from `Options.bundle`).
public struct RestoreOperation {
    public struct Options: Sendable {
        public var directory: String
        /// Where CRIU's restore log and statistics go (default: a new directory under /var/lib/stasis/restore).
        public var workDirectory: String?
        /// The chunk store (default: the one the manifest names).
        public var store: String?
        /// Where CRIU's images are rebuilt from the store (a private directory is made and removed inside
        /// it); nil streams them to CRIU instead.
        public var rebuildRoot: String?
        public var skipCPUCheck = false
        /// Read the chunks ahead into the page cache while CRIU and the driver work (`ChunkPrefetcher`).
        public var prefetch = true
        /// How long to wait for a checkpointed PID that is still exiting (a zombie, or reaped slowly by init).
        public var pidWaitSeconds = 5.0
        public var logLevel: Int32 = 4
        public var progress: ProgressHandler?
        /// A container checkpoint: the ID and OCI bundle to restore it as (default: the checkpoint's).
        public var containerID: String?
        public var bundle: String?
        public init(directory: String) { self.directory = directory }
    }

    public struct Report: Codable, Sendable {
        public var directory: String
        public var rootPID: Int32
        public var processes: Int
        public var logFile: String
        public var images: Images
        public var timings: Timings
        /// The device step's phases in seconds: "driver" (its restore and unlock), "refill" (agents).
        public var deviceSteps: [String: Double]
        /// The container restored, for a container's checkpoint.
        public var container: String?
        /// TIME_WAIT sockets destroyed so that the checkpoint's listeners could bind their ports again.
        public var clearedTimeWaitSockets = 0
    }

    /// How CRIU got the memory images.
    public enum Images: String, Codable, Sendable {
        /// Through the image server, decoded from the store while CRIU read them.
        case streamed
        /// Rebuilt as files in `--rebuild-dir` before CRIU started.
        case rebuilt
        /// Read by CRIU from the checkpoint directory (a checkpoint without a store, format 1).
        case files
    }

    public struct Timings: Codable, Sendable {
        /// Checking the whole files (and that every chunk is in the store); rebuilding (reading, decoding and
        /// checking every chunk of) the chunked ones, 0 when they are streamed: then that work is inside `criu`.
        public var verify: Double
        public var rebuild: Double
        public var criu: Double
        public var forking: Double
        public var restore: Double
        public var devices: Double
        public var total: Double
    }

    public static let defaultWorkRoot = "/var/lib/stasis/restore"

    let options: Options
    let device: DeviceStep

    public init(_ options: Options, device: DeviceStep = NoDeviceStep()) {
        self.options = options
        self.device = device
    }

    public func run() throws -> Report {
        let total = Stopwatch()
        let checked = try check()
        defer { checked.release() }
        // From a cold disk, the chunks are read ahead (CRIU's first, then the agents' device memory) while CRIU
        // and the driver do their part; the refill then finds them in memory.
        let prefetcher = checked.store.flatMap { store in options.prefetch ? store : nil }.map { store in
            ChunkPrefetcher(store: store, items: Checkpoint.criuItems(checked.manifest)
                + Checkpoint.chunkedItems(checked.manifest).filter { Checkpoint.isDeviceMemory($0.path) })
        }
        prefetcher?.start()
        defer { prefetcher?.stop() }
        if let runc = checked.runc, let container = checked.manifest.container, let workDirectory = checked.containerWork {
            return try restoreContainer(container, runc: runc, images: checked.rebuilt ?? checked.directory, workDirectory: workDirectory,
                                        manifest: checked.manifest, store: checked.store, directory: checked.directory,
                                        timings: Timings(verify: checked.verifySeconds, rebuild: checked.rebuildSeconds, criu: 0, forking: 0,
                                                         restore: 0, devices: 0, total: 0), started: total)
        }
        return try restoreTree(checked, started: total)
    }

    /// What the checks found and made, for the steps after them; `release` ends the store's lock and removes
    /// the rebuilt images.
    final class Checked {
        let directory: String
        let manifest: Manifest
        let criu: CRIUBinary
        let store: ChunkStore?
        let storeLock: ChunkStore.Lock?
        let runc: Runc?
        let containerWork: String?
        let rebuilt: String?
        let images: Images
        let criuItems: [ChunkedFiles.Item]
        let verifySeconds: Double
        let rebuildSeconds: Double

        init(directory: String, manifest: Manifest, criu: CRIUBinary, store: ChunkStore?, storeLock: ChunkStore.Lock?, runc: Runc?,
             containerWork: String?, rebuilt: String?, images: Images, criuItems: [ChunkedFiles.Item], verifySeconds: Double, rebuildSeconds: Double) {
            (self.directory, self.manifest, self.criu, self.store, self.storeLock, self.runc) = (directory, manifest, criu, store, storeLock, runc)
            (self.containerWork, self.rebuilt, self.images, self.criuItems) = (containerWork, rebuilt, images, criuItems)
            (self.verifySeconds, self.rebuildSeconds) = (verifySeconds, rebuildSeconds)
        }

        func release() {
            storeLock?.release()
            if let rebuilt { FileSystem.removeTree(rebuilt) }
        }
    }

    /// Step 1, nothing started: the manifest, the CPU, the GPUs, every whole file, every chunk present (or, with
    /// a rebuild directory, every chunk read, checked and written there). The store's lock is held shared from
    /// here to the end: CRIU's images and the agents' memory come from the store all along.
    func check() throws -> Checked {
        let directory = URL(fileURLWithPath: options.directory).standardizedFileURL.path
        let manifest = try Checkpoint.readManifest(directory)
        let criu = try CRIUBinary.locate()
        try criu.checkRestores(imagesOf: manifest.criu.version)
        if !options.skipCPUCheck { try Self.checkCPU(manifest.host) }
        try device.checkRestorable(section: manifest.gpu)

        let store = try Checkpoint.store(for: manifest, explicit: options.store)
        // Until the restore is over (CRIU's images and the agents' memory come from the store all along).
        let storeLock = store?.readerLock()
        let verifyWatch = Stopwatch()
        let imageBytes = manifest.files.reduce(0) { $0 + $1.size }
        let counter = Locked<UInt64>(0)
        let progress = options.progress
        let ticker = ProgressTicker(progress.map { report in
            { @Sendable in report(Progress(phase: "verifying", bytes: counter.current, totalBytes: imageBytes)) }
        })
        var rebuilt: String?
        var rebuildSeconds = 0.0
        let chunkedItems = Checkpoint.chunkedItems(manifest)
        // Device memory an agent moved is the agent's to refill; CRIU reads only its own images.
        let criuItems = Checkpoint.criuItems(manifest)
        let runc = try manifest.container.map { _ in try Runc.locate() }
        // runc reads files: a container's images are always rebuilt, by default in the work directory (made
        // now for a container, else only once the checkpoint has passed its checks).
        let containerWork = runc == nil ? nil : try options.workDirectory ?? Self.makeWorkDirectory()
        let rebuildRoot = options.rebuildRoot ?? containerWork
        let images: Images = store == nil ? .files : rebuildRoot == nil ? .streamed : .rebuilt
        do {
            _ = try Checkpoint.verify(directory, manifest: manifest, store: store, chunks: false) { counter.add($0) }
            if let store, let info = manifest.store {
                if let rebuildRoot {
                    let rebuildWatch = Stopwatch()
                    try FileSystem.makePrivateDirectory(rebuildRoot)
                    rebuilt = try Self.makeRebuildDirectory(in: rebuildRoot, bytes: criuItems.reduce(0) { $0 + $1.size })
                    for entry in manifest.files where entry.chunks == nil && Checkpoint.isForCRIU(entry.path) {
                        try FileManager.default.copyItem(atPath: directory + "/" + entry.path, toPath: rebuilt! + "/" + entry.path)
                    }
                    try ChunkedFiles.read(criuItems, from: store, checkpoint: directory, chunkSize: info.chunkSize, into: rebuilt) { counter.add($0) }
                    try ChunkedFiles.requirePresent(chunkedItems.filter { Checkpoint.isDeviceMemory($0.path) }, in: store, checkpoint: directory,
                                                    chunkSize: info.chunkSize)
                    rebuildSeconds = rebuildWatch.seconds
                } else {
                    try ChunkedFiles.requirePresent(chunkedItems, in: store, checkpoint: directory, chunkSize: info.chunkSize)
                }
            }
            ticker?.stop()
        } catch {
            ticker?.stop()
            storeLock?.release()
            if let rebuilt { FileSystem.removeTree(rebuilt) }
            throw StasisError.wrapping(error, as: .io).prefixed("restore refused")
        }
        return Checked(directory: directory, manifest: manifest, criu: criu, store: store, storeLock: storeLock, runc: runc,
                       containerWork: containerWork, rebuilt: rebuilt, images: images, criuItems: criuItems,
                       verifySeconds: verifyWatch.seconds - rebuildSeconds, rebuildSeconds: rebuildSeconds)
    }

    /// Steps 2 and 3 for a process tree: CRIU restores it (its PIDs free, TIME_WAIT sockets on its listeners
    /// cleared), then the devices (the driver's restore, the agents' refill). A failure after CRIU stops the tree
    /// CRIU restored: no half-restored process is left.
    private func restoreTree(_ checked: Checked, started total: Stopwatch) throws -> Report {
        let (directory, manifest, criu, store) = (checked.directory, checked.manifest, checked.criu, checked.store)
        let (images, rebuilt, criuItems) = (checked.images, checked.rebuilt, checked.criuItems)
        let (verifySeconds, rebuildSeconds) = (checked.verifySeconds, checked.rebuildSeconds)
        try waitForFreePIDs(manifest.processTree)
        let clearedTimeWait = Self.clearListeningPorts(manifest.processTree)

        let workDirectory = try options.workDirectory ?? Self.makeWorkDirectory()
        try FileSystem.makeSecretDirectory(workDirectory, mustBeEmpty: false)
        let logPath = workDirectory + "/" + CRIUService.restoreLogName
        let processOptions = CRIUService.ProcessOptions(tcpEstablished: manifest.options.tcpEstablished,
                                                        shellJob: manifest.options.shellJob, logLevel: options.logLevel)
        let criuWatch = Stopwatch()
        let response: CRIUOutcome
        var streamFailures: [Error] = []
        if images == .streamed, let store, let info = manifest.store {
            // CRIU finds the server's socket in the directory it is given as its images directory.
            let server = try CRIUImageServer(directory: workDirectory + "/images",
                                             provider: Self.imageProvider(manifest, items: criuItems, directory: directory, store: store,
                                                                          chunkSize: info.chunkSize))
            let restored = Result {
                try CRIUService(binary: criu).restoreStreaming(imagesDirectory: server.directory, workDirectory: workDirectory,
                                                               options: processOptions, pids: manifest.processTree.processes.map(\.pid))
            }
            streamFailures = server.finish()
            response = try restored.get()
        } else {
            let imagesFD = try FileSystem.openDirectory(rebuilt ?? directory)
            defer { imagesFD.closeQuietly() }
            let workFD = try FileSystem.openDirectory(workDirectory)
            defer { workFD.closeQuietly() }
            response = try CRIUService(binary: criu).restore(imagesDirectory: imagesFD, workDirectory: workFD, options: processOptions) { _ in }
        }
        let criuSeconds = criuWatch.seconds
        // An image that failed on the way (a damaged chunk, an unreadable file) is why CRIU stopped: name it,
        // not CRIU's EOF.
        let streamProblem = streamFailures.first.map { StasisError.wrapping($0) }
        guard response.succeeded, let rootPID = response.rootPID else {
            if var error = streamProblem?.prefixed("restore refused") {
                error.message += "; CRIU stopped while restoring memory, before any restored process ran, and removed what it had created"
                throw error
            }
            throw response.failure("CRIU could not restore \(directory)", log: logPath).prefixed("restore failed")
        }
        if let problem = streamProblem {
            // CRIU finished although an image failed its check on the way (it read less than all of it):
            // what it restored cannot be trusted, so the tree is stopped.
            Self.stopRestoredTree(root: rootPID)
            throw problem.prefixed("restore of \(directory) failed after CRIU restored it; the restored tree was stopped")
        }
        let deviceWatch = Stopwatch()
        var deviceSteps: [String: Double] = [:]
        do {
            try FaultInjection.check("after-restore")
            deviceSteps = try device.afterRestore(section: manifest.gpu, store: store.map { DeviceStore(store: $0, checkpoint: directory) },
                                    files: manifest.files)
        } catch {
            // Never leave a half-restored tree: the restored processes are ours to stop.
            Self.stopRestoredTree(root: rootPID)
            let failure = StasisError.wrapping(error, as: .gpu)
            throw failure.prefixed("restore of \(directory) failed after CRIU restored PID \(rootPID); the restored tree was stopped")
        }
        let stats = CRIUStats.read(workDirectory + "/stats-restore")?.restore
        _ = try? FileSystem.makePrivate(tree: workDirectory)
        return Report(directory: directory, rootPID: rootPID, processes: manifest.processTree.processes.count, logFile: logPath,
                      images: images,
                      timings: Timings(verify: verifySeconds, rebuild: rebuildSeconds, criu: criuSeconds,
                                       forking: Double(stats?.forkingTime ?? 0) / 1e6, restore: Double(stats?.restoreTime ?? 0) / 1e6,
                                       devices: deviceWatch.seconds, total: total.seconds),
                      deviceSteps: deviceSteps, container: nil, clearedTimeWaitSockets: clearedTimeWait)
    }

    /// runc restores the container from `images`; its processes get new PIDs (the container has its own PID
    /// namespace), so the root PID is runc's answer, and the GPU steps get the new PIDs (`ContainerPIDs`).
    /// A failing GPU step removes the restored container: no half-restored container is left.
    private func restoreContainer(_ container: Manifest.Container, runc: Runc, images: String, workDirectory: String, manifest: Manifest,
                                  store: ChunkStore?, directory: String, timings: Timings, started: Stopwatch) throws -> Report {
        let id = options.containerID ?? container.id
        let bundle = options.bundle ?? container.bundle
        guard !bundle.isEmpty else {
            throw StasisError(.invalidArgument, "restore refused: the checkpoint does not say where container \(id)'s bundle is (it came from a checkpoint archive)",
                              hint: "give the container's OCI bundle with --bundle")
        }
        guard FileSystem.exists(bundle + "/config.json") else {
            throw StasisError(.invalidArgument, "restore refused: the bundle \(bundle) of container \(id) has no config.json",
                              hint: "give the container's OCI bundle with --bundle")
        }
        try FileSystem.makeSecretDirectory(workDirectory, mustBeEmpty: false)
        let watch = Stopwatch()
        do {
            try runc.restore(id, bundle: bundle, images: images, work: workDirectory,
                             tcpEstablished: manifest.options.tcpEstablished, shellJob: manifest.options.shellJob)
        } catch var error as StasisError {
            // runc says only "criu failed"; CRIU's own log says why (images of a version it does not read, say).
            if error.logExcerpt.isEmpty, let log = error.logPath { error.logExcerpt = CRIULog.excerpt(path: log, limit: 4) }
            throw error
        }
        var timings = timings
        timings.criu = watch.seconds
        var deviceSteps: [String: Double] = [:]
        let state: Runc.State
        do {
            state = try runc.state(id)
        } catch {
            try? runc.remove(id)
            throw StasisError.wrapping(error, as: .runtime).prefixed("restore of \(directory) failed after runc restored container \(id); the container was removed")
        }
        if !manifest.gpu.processes.isEmpty {
            let deviceWatch = Stopwatch()
            do {
                try FaultInjection.check("after-restore")
                let section = try ContainerPIDs.remap(manifest.gpu, processes: manifest.processTree.processes, restored: try runc.processes(id))
                deviceSteps = try device.afterRestore(section: section, store: store.map { DeviceStore(store: $0, checkpoint: directory) },
                                                      files: manifest.files)
            } catch {
                try? runc.remove(id)
                let failure = StasisError.wrapping(error, as: .gpu)
                throw failure.prefixed("restore of \(directory) failed after runc restored container \(id); the container was removed")
            }
            timings.devices = deviceWatch.seconds
        }
        let stats = CRIUStats.read(workDirectory + "/stats-restore")?.restore
        timings.forking = Double(stats?.forkingTime ?? 0) / 1e6
        timings.restore = Double(stats?.restoreTime ?? 0) / 1e6
        timings.total = started.seconds
        _ = try? FileSystem.makePrivate(tree: workDirectory)
        return Report(directory: directory, rootPID: state.pid, processes: manifest.processTree.processes.count,
                      logFile: workDirectory + "/" + CRIUService.restoreLogName, images: .rebuilt, timings: timings, deviceSteps: deviceSteps,
                      container: id)
    }

    /// What the image server gives CRIU for each name: a chunked image decoded from the store, a whole one
    /// copied from the checkpoint directory; nil for names the checkpoint does not have.
    static func imageProvider(_ manifest: Manifest, items: [ChunkedFiles.Item], directory: String, store: ChunkStore,
                              chunkSize: Int) -> CRIUImageServer.Provider {
        let chunked = Dictionary(uniqueKeysWithValues: items.map { ($0.path, $0) })
        let whole = Set(manifest.files.filter { $0.chunks == nil }.map(\.path))
        return { name in
            if let item = chunked[name] {
                return { pipe in try ChunkedFiles.stream(item, from: store, checkpoint: directory, chunkSize: chunkSize, to: pipe) }
            }
            guard whole.contains(name) else { return nil }
            return { pipe in try FileSystem.copy(directory + "/" + name, to: pipe) }
        }
    }

    /// Stops a tree CRIU restored: the root CRIU reported and its descendants, nothing else (never a PID
    /// taken from the manifest, which could name any process, or with -1, all of them).
    public static func stopRestoredTree(root: Int32) {
        guard root > 1 else { return }
        for process in ProcFS.tree(root: root).reversed() where process.pid > 1 { Signals.kill(process.pid) }
    }

    /// A private directory for CRIU's images under `root`, after checking that `bytes` fit there.
    static func makeRebuildDirectory(in root: String, bytes: UInt64) throws -> String {
        if let free = FileSystem.availableBytes(at: root) {
            guard free >= bytes else {
                throw StasisError(.noSpace, "\(root) has \(Format.bytes(free)) free; rebuilding the memory images for CRIU needs \(Format.bytes(bytes))",
                                  hint: "free memory or space there, or rebuild elsewhere with --rebuild-dir")
            }
        }
        return try FileSystem.makeTemporaryDirectory(in: root, prefix: "stasis-rebuild")
    }

    /// The checkpoint's PIDs must be free. A PID whose process is exiting (a zombie, or one the init of a
    /// VM reaps slowly) is waited for briefly; a live one is refused with its command line.
    func waitForFreePIDs(_ tree: Manifest.ProcessTree) throws {
        for process in tree.processes where ProcFS.exists(process.pid) {
            let deadline = Stopwatch()
            while let stat = ProcFS.stat(process.pid), deadline.seconds < options.pidWaitSeconds {
                guard stat.state == "Z" || stat.state == "X" else { break }
                Thread.sleep(forTimeInterval: 0.02)
            }
            if let stat = ProcFS.stat(process.pid) {
                let state = stat.state == "Z" ? "a zombie not yet reaped" : "'\(ProcFS.arguments(process.pid).joined(separator: " ").prefix(120))'"
                throw StasisError(.pidInUse, "restore refused: PID \(process.pid) (\(process.command) in the checkpoint) is in use by \(state)",
                                  hint: "restored processes keep their PIDs; stop PID \(process.pid) first (if it is the original, it may still be running: use --leave-running dumps only after it exits)")
            }
        }
    }

    /// CRIU binds the checkpoint's listening sockets again; TIME_WAIT sockets on their addresses (connections
    /// their side closed first, within the last minute, often the original's own) would make that fail with
    /// "Address already in use". Those are destroyed first. Returns how many. A kernel that cannot destroy
    /// them (no CONFIG_INET_DIAG_DESTROY) is no reason to refuse: CRIU may still bind, and says so if not.
    static func clearListeningPorts(_ tree: Manifest.ProcessTree) -> Int {
        var cleared = 0
        for listener in Set(tree.processes.flatMap { $0.listeners ?? [] }) {
            guard let endpoint = TCPListeners.Endpoint(listener) else { continue }
            do {
                cleared += try TCPListeners.clearTimeWait(for: endpoint)
            } catch {
                FileHandle.standardError.write(Data("stasis: warning: cannot clear TIME_WAIT sockets off \(listener) (\(error)); if CRIU cannot bind it, retry within a minute\n".utf8))
            }
        }
        return cleared
    }

    /// Refuses a CPU that lacks instruction-set extensions the checkpoint's host had.
    static func checkCPU(_ recorded: Manifest.Host) throws {
        let here = HostFacts.current()
        guard recorded.machine == here.machine else {
            throw StasisError(.hostMismatch, "the checkpoint was taken on \(recorded.machine); this machine is \(here.machine)")
        }
        let missing = Set(recorded.cpuFlags).subtracting(here.cpuFlags).sorted()
        guard missing.isEmpty else {
            throw StasisError(.hostMismatch, "this CPU lacks \(missing.joined(separator: ", ")), which the checkpoint's host (\(recorded.cpuModel)) had",
                              hint: "the program may use these instructions and crash after restore; pass --skip-cpu-check to restore anyway")
        }
    }

    /// How many restores' work directories (CRIU's restore log and statistics) the default root keeps.
    public static let keptWorkDirectories = 16

    /// A new work directory under `defaultWorkRoot`, named by time and PID; the oldest ones beyond
    /// `keptWorkDirectories` whose restore is over (its PID gone) are removed, so the root does not grow by a
    /// directory per restore forever.
    static func makeWorkDirectory() throws -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        formatter.locale = Locale(identifier: "en_US_POSIX")
        let path = "\(defaultWorkRoot)/\(formatter.string(from: Date()))-\(ThisProcess.pid)"
        try FileSystem.makePrivateDirectory(path)
        pruneWorkDirectories(in: defaultWorkRoot, keeping: keptWorkDirectories)
        return path
    }

    static func pruneWorkDirectories(in root: String, keeping count: Int) {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).filter { name in
            // yyyyMMdd-HHmmss-PID
            let parts = name.split(separator: "-")
            return parts.count == 3 && parts[0].count == 8 && parts.allSatisfy { $0.allSatisfy(\.isNumber) }
        }.sorted()
        for name in names.dropLast(count) {
            guard let owner = Int32(name.split(separator: "-")[2]), !ProcFS.isLive(owner) else { continue }
            FileSystem.removeTree(root + "/" + name)
        }
    }
}
