import Foundation
import Glibc
import StasisCRIU
import StasisContainer
import StasisCore
import StasisGPU
import StasisImage
import StasisOS
import StasisStore

/// `stasis dump`: checkpoint a process tree into a directory.
///
/// The tree must never be lost: CRIU kills it (without --leave-running) only after its post-dump step, and
/// that step is ours. In it, while the tree is still frozen, the images are completed in the chunk store,
/// synced and the checkpoint published. If anything fails before that point CRIU thaws the tree and it runs
/// on as it was.
///
/// CRIU's memory images (pages-*.img, and any image of at least a chunk) are cut into chunks and put in the
/// store while CRIU still writes them (`ChunkIngester`); they leave the checkpoint directory, which keeps the
/// manifest and the small images. The store lock is held shared from the first chunk until the manifest is
/// in the store's catalog, so gc never takes a chunk this dump is about to reference.
///
/// A container (`Options.container`) is checkpointed by its runtime, runc, which knows how it was made and
/// drives CRIU for it. runc offers no step inside the freeze, so stasis freezes the container itself (`runc
/// pause`), has runc checkpoint it leaving it there, publishes the checkpoint, and only then removes the
/// container (or resumes it, with --leave-running). If anything fails, the container is resumed as it was;
/// should stasis itself die in between, the container waits, paused (`runc resume` lets it go on).
public struct DumpOperation {
    public struct Options: Sendable {
        public var pid: Int32
        public var directory: String
        public var leaveRunning = false
        public var process = CRIUService.ProcessOptions()
        /// The chunk store (default: STASIS_STORE, else ChunkStore.defaultPath) and how new chunks are compressed.
        public var store: String?
        public var codec = Codec.standard
        public var progress: ProgressHandler?
        /// A runc container's ID: checkpoint it through runc (`pid` is then its init's, found by runc).
        public var container: String?
        /// Runs once the checkpoint is published, while the tree is still frozen (not for containers): a
        /// migration sends it and waits for the receiver's restore here. If it throws, the dump fails and the
        /// tree runs on; the published checkpoint stays.
        public var whilePublished: (@Sendable (Manifest, String) throws -> Void)?
        /// Told of every new chunk as the dump writes it (ChunkStore.observe): a migration sends them at once.
        public var chunkObserver: ChunkStore.ChunkObserver?
        public init(pid: Int32, directory: String) { self.pid = pid; self.directory = directory }
    }

    public struct Report: Codable, Sendable {
        public var directory: String
        public var rootPID: Int32
        public var processes: Int
        public var threads: Int
        public var leaveRunning: Bool
        public var memory: Manifest.Memory
        public var timings: Manifest.Timings
        public var gpu: Manifest.GPUSection
        public var store: Manifest.StoreInfo?
        public var criuVersion: String
        /// The container checkpointed, when it was one.
        public var container: String?
    }

    let options: Options
    let device: DeviceStep

    public init(_ options: Options, device: DeviceStep = NoDeviceStep()) {
        self.options = options
        self.device = device
    }

    public func run() throws -> Report {
        let total = Stopwatch()
        // A container: runc, and the container as runc sees it now.
        let container = try options.container.map { id -> (runc: Runc, state: Runc.State) in
            let runc = try Runc.locate()
            return (runc, try runc.state(id))
        }
        if let containerState = container?.state {
            guard containerState.status == "running" else {
                throw StasisError(.processNotFound, "container \(containerState.id) is \(containerState.status), not running")
            }
            try Self.refuseTerminal(containerState)
        }
        let containerPIDs = try container.map { try $0.runc.processes($0.state.id) } ?? []
        let pid = container?.state.pid ?? options.pid
        try Self.refuseUndumpable(pid)
        let criu = try CRIUBinary.locate()
        try StagingDirectory.check(destination: options.directory)
        let store = try ChunkStore(path: ChunkStore.resolve(options.store, recorded: nil), create: true)
        store.observe(options.chunkObserver)
        defer { store.observe(nil) }
        let storeLock = try store.lock(exclusive: false)
        defer { storeLock.release() }
        let catalog = StoreCatalog(store: store)
        let staging = try StagingDirectory(destination: options.directory, store: store)
        let destination = staging.destination

        // A container's processes are its init's tree and any that `runc exec` started beside it.
        var tree = ProcFS.tree(root: pid)
        for other in containerPIDs where !tree.contains(where: { $0.pid == other }) {
            tree += ProcFS.tree(root: other).filter { entry in !tree.contains { $0.pid == entry.pid } }
        }
        let processes = tree.map { entry -> Manifest.Process in
            let status = ProcFS.status(entry.pid)
            var process = Manifest.Process(pid: entry.pid, ppid: entry.ppid, command: entry.command, arguments: ProcFS.arguments(entry.pid),
                                           threads: Int(status["Threads"] ?? "") ?? 1, residentBytes: ProcFS.kilobytes(status["VmRSS"]))
            if let inner = ProcFS.namespacePID(entry.pid), inner != entry.pid { process.namespacePID = inner }
            let listeners = TCPListeners.endpoints(of: entry.pid)
            if !listeners.isEmpty { process.listeners = listeners.map(\.description) }
            return process
        }
        var timings = Manifest.Timings()
        var gpu = Manifest.GPUSection()
        var deviceFiles: [Manifest.FileEntry] = []
        var deviceStatistics = ChunkIngester.Statistics()
        var published: Manifest?
        var ingester: ChunkIngester?
        var containerPaused = false
        let imagesFD: Int32, workFD: Int32
        do {
            imagesFD = try FileSystem.openDirectory(staging.path)
            do { workFD = try FileSystem.openDirectory(staging.workPath) } catch { close(imagesFD); throw error }
        } catch {
            staging.discard()
            throw error
        }
        defer { close(imagesFD); close(workFD) }

        do {
            let deviceWatch = Stopwatch()
            let frozen = try device.beforeFreeze(pids: processes.map(\.pid),
                                                 store: DeviceStore(store: store, codec: options.codec, checkpoint: destination))
            gpu = frozen.section
            deviceFiles = frozen.files
            deviceStatistics = frozen.statistics
            timings.devices = deviceWatch.seconds

            let chunker = ChunkIngester(directory: staging.path, store: store, codec: options.codec,
                                        releaseIngested: true, follows: Self.isMemoryImage)
            ingester = chunker
            let progress = options.progress
            let stagingPath = staging.path
            let resident = processes.reduce(0) { $0 + $1.residentBytes }
            let ticker = ProgressTicker(progress.map { report in
                { @Sendable in report(Progress(phase: "dumping memory", bytes: Self.pageBytes(in: stagingPath), totalBytes: resident)) }
            })
            defer { ticker?.stop() }

            let criuWatch = Stopwatch()
            if let (runc, containerState) = container {
                let kept = try Self.keepSpec(of: containerState, in: staging.path)
                // Frozen from here until the checkpoint is published, as CRIU keeps a process tree frozen.
                try runc.pause(containerState.id)
                containerPaused = true
                try runc.checkpoint(containerState.id, images: staging.path, work: staging.path, leaveRunning: true,
                                    tcpEstablished: options.process.tcpEstablished, shellJob: options.process.shellJob)
                timings.criu = criuWatch.seconds
                try FaultInjection.check("post-dump")
                let manifest = try finish(staging: staging, ingester: chunker, store: store, criu: criu, processes: processes,
                                          gpu: gpu, deviceFiles: deviceFiles, deviceStatistics: deviceStatistics, timings: timings,
                                          container: kept, rootPID: pid)
                try staging.publish()
                published = manifest
                if options.leaveRunning {
                    try runc.resume(containerState.id)
                } else {
                    do { try runc.remove(containerState.id) } catch {
                        // Paused still: the catch below resumes it, and the checkpoint stays.
                        throw StasisError(.runtime, "the checkpoint is complete in \(destination), but the container could not be removed (\(error)); it was resumed instead")
                    }
                }
                containerPaused = false
            } else {
                let service = CRIUService(binary: criu)
                let response = try service.dump(pid: pid, imagesDirectory: imagesFD, workDirectory: workFD, options: options.process,
                                                 leaveRunning: options.leaveRunning) { note in
                    guard note.script == "post-dump" else { return }
                    FaultInjection.die("post-dump")
                    try FaultInjection.check("post-dump")
                    // The tree is frozen here: make the checkpoint complete and durable before CRIU may kill it.
                    let manifest = try finish(staging: staging, ingester: chunker, store: store, criu: criu, processes: processes,
                                              gpu: gpu, deviceFiles: deviceFiles, deviceStatistics: deviceStatistics, timings: timings)
                    try staging.publish()
                    published = manifest
                    FaultInjection.die("published")
                    try options.whilePublished?(manifest, destination)
                }
                timings.criu = criuWatch.seconds
                guard response.success else {
                    throw Self.criuFailure("CRIU could not dump PID \(pid)", response: response,
                                           log: staging.workPath + "/" + CRIUService.dumpLogName)
                }
                if published == nil {
                    // CRIU never sent post-dump (it always does in 4.x): publish now rather than lose the images.
                    published = try finish(staging: staging, ingester: chunker, store: store, criu: criu, processes: processes,
                                           gpu: gpu, deviceFiles: deviceFiles, deviceStatistics: deviceStatistics, timings: timings)
                    try staging.publish()
                }
            }
        } catch {
            ingester?.cancel()
            // A container stasis paused goes on as it was (its GPU state is given back below).
            var resumeFailure: String?
            if containerPaused, let container {
                do { try container.runc.resume(container.state.id) } catch { resumeFailure = "\(error)" }
            }
            // Listed in the catalog but never published: drop it (its chunks go at the next gc).
            if !staging.published, let id = staging.manifestID { catalog.unregister(id: id) }
            let leftBehind = device.rollback(section: gpu)
            let keptLog = staging.discard(keeping: CRIUService.dumpLogName)
            var failure = (error as? StasisError) ?? StasisError(.io, "\(error)")
            // The staging directory is gone: point at the copy of CRIU's log kept beside it, if CRIU ran.
            failure.logPath = keptLog
            if let resumeFailure {
                failure.message += "; resuming the paused container also failed: \(resumeFailure) (`runc resume \(container?.state.id ?? "")`)"
            } else if !leftBehind.isEmpty {
                failure.message += "; giving the GPU back also failed: \(leftBehind.joined(separator: "; "))"
            } else if ProcFS.isLive(pid) {
                failure.message += " (PID \(pid) is still running, as it was before the dump)"
            }
            throw failure.prefixed("dump of PID \(pid) failed")
        }

        // CRIU has exited: its statistics complete the manifest's timings, and its log joins the checkpoint.
        // Each step replaces one file by a rename, so a stasis killed anywhere here leaves a checkpoint that
        // restores (CRIU's log, listed nowhere, is no file of the checkpoint's: `Checkpoint.unlistedLogs`).
        FaultInjection.die("criu-exited")
        var manifest = published!
        if let stats = CRIUStats.read(staging.workPath + "/stats-dump")?.dump {
            timings.freeze = Double(stats.freezingTime) / 1e6
            timings.frozen = Double(stats.frozenTime) / 1e6
            timings.memoryDump = Double(stats.memdumpTime) / 1e6
            timings.memoryWrite = Double(stats.memwriteTime) / 1e6
            manifest.memory.dumpedBytes = stats.pagesWritten * UInt64(manifest.host.pageSize)
        }
        let deviceWatch = Stopwatch()
        try device.afterDump(section: gpu, leaveRunning: options.leaveRunning)
        timings.devices += deviceWatch.seconds
        timings.hash = manifest.timings.hash
        timings.sync = manifest.timings.sync
        timings.total = total.seconds
        manifest.timings = timings
        try? FileSystem.writeAtomically(try Manifest.encoder().encode(manifest), to: destination + "/" + Manifest.fileName,
                                        temporaryDirectory: staging.workPath)
        FaultInjection.die("manifest-rewritten")
        staging.finishWork(keeping: CRIUService.dumpLogName)
        FaultInjection.die("log-moved")
        // The catalog's copy gets the final timings; the published one already guards the chunks.
        try? catalog.register(manifest, directory: destination)
        return Report(directory: destination, rootPID: pid, processes: processes.count, threads: processes.reduce(0) { $0 + $1.threads },
                      leaveRunning: options.leaveRunning, memory: manifest.memory, timings: timings, gpu: gpu, store: manifest.store,
                      criuVersion: criu.version, container: options.container)
    }

    /// Refuses, saying what it is, a PID that CRIU cannot dump: one that does not run, the system's init, or
    /// a kernel thread (kthreadd is PID 2).
    static func refuseUndumpable(_ pid: Int32) throws {
        guard pid > 0, ProcFS.isLive(pid), let stat = ProcFS.stat(pid) else {
            throw StasisError(.processNotFound, "no running process with PID \(pid)", hint: "check the PID with `ps -p \(pid)`")
        }
        if stat.isKernelThread || pid == 2 {
            throw StasisError(.invalidArgument, "PID \(pid) (\(stat.command)) is a kernel thread: it has no user memory and cannot be checkpointed",
                              hint: "give the PID of a user process (`ps -o pid,comm --ppid 1`)")
        }
        if pid == 1 {
            throw StasisError(.invalidArgument, "PID 1 (\(stat.command)) is this system's init: CRIU checkpoints process trees below it, not init itself",
                              hint: "give the PID of the job's own root process")
        }
    }

    /// CRIU's memory images: followed while CRIU writes them, and always chunked.
    static func isMemoryImage(_ name: String) -> Bool { name.hasPrefix("pages-") && name.hasSuffix(".img") }

    /// The file that keeps a container's config.json in its checkpoint.
    static let containerSpecName = "container-config.json"

    /// A container with a terminal cannot be restored detached by runc without a console socket: refused
    /// before anything is touched.
    static func refuseTerminal(_ state: Runc.State) throws {
        let spec = try? JSONSerialization.jsonObject(with: FileSystem.readFile(state.bundle + "/config.json")) as? [String: Any]
        if (spec?["process"] as? [String: Any])?["terminal"] as? Bool == true {
            throw StasisError(.invalidArgument, "container \(state.id) has a terminal (process.terminal in its config.json); stasis restores containers detached, without one",
                              hint: "run it with pipes or /dev/null as its stdio (podman and CRI-O give containers pipes)")
        }
    }

    /// Copies the container's config.json into the checkpoint and says what the container is.
    static func keepSpec(of state: Runc.State, in directory: String) throws -> Manifest.Container {
        let spec = try FileSystem.readFile(state.bundle + "/config.json")
        try FileSystem.writeAtomically(spec, to: directory + "/" + containerSpecName)
        return Manifest.Container(runtime: "runc", id: state.id, bundle: state.bundle, spec: containerSpecName)
    }


    /// Completes the chunking of the memory images (and of any other image of a chunk or more) and removes
    /// them from the staging directory, hashes and syncs the small images, lists the checkpoint in the
    /// store's catalog and writes the manifest. Runs while the tree is frozen.
    private func finish(staging: StagingDirectory, ingester: ChunkIngester, store: ChunkStore, criu: CRIUBinary,
                        processes: [Manifest.Process], gpu: Manifest.GPUSection, deviceFiles: [Manifest.FileEntry],
                        deviceStatistics: ChunkIngester.Statistics, timings: Manifest.Timings,
                        container: Manifest.Container? = nil, rootPID: Int32? = nil) throws -> Manifest {
        let images = try Self.completeImages(in: staging.path, ingester: ingester, except: [CRIUService.dumpLogName])
        let chunked = images.chunked, statistics = images.statistics
        var timings = timings
        timings.hash = images.hashSeconds
        timings.sync = images.syncSeconds
        let files = (images.files + deviceFiles).sorted { $0.path < $1.path }
        var manifest = Manifest(
            id: UUID().uuidString.lowercased(), createdAt: Date(),
            tool: .init(name: "stasis", version: StasisVersion.current), host: HostFacts.current(),
            criu: .init(version: criu.version, logFile: CRIUService.dumpLogName),
            options: .init(leaveRunning: options.leaveRunning, tcpEstablished: options.process.tcpEstablished, shellJob: options.process.shellJob),
            processTree: .init(rootPID: rootPID ?? options.pid, processes: processes),
            memory: .init(residentBytes: processes.reduce(0) { $0 + $1.residentBytes },
                          dumpedBytes: chunked.filter { Self.isMemoryImage($0.key) }.reduce(0) { $0 + $1.value.size },
                          imageBytes: files.reduce(0) { $0 + $1.size }),
            timings: timings, gpu: gpu, files: files)
        manifest.container = container
        manifest.formatVersion = container != nil ? Manifest.versionWithContainer
            : gpu.processes.contains(where: { $0.agent != nil }) ? Manifest.versionWithAgents : Manifest.versionWithoutAgents
        // What this checkpoint added to the store: CRIU's images and the device memory agents moved.
        let added = statistics + deviceStatistics
        manifest.store = .init(path: store.path, chunkSize: ChunkStore.chunkSize, codec: options.codec.description,
                               plainBytes: added.plainBytes, storedBytes: added.storedBytes, newChunks: added.newChunks,
                               reusedChunks: added.reusedChunks, zeroChunks: added.zeroChunks)
        try FaultInjection.check("publish")
        // Listed before the checkpoint exists, so that from the moment it does, gc keeps its chunks.
        staging.manifestID = manifest.id
        try StoreCatalog(store: store).register(manifest, directory: staging.destination)
        for name in chunked.keys { unlink(staging.path + "/" + name) }
        try FileSystem.writeAtomically(try Manifest.encoder().encode(manifest), to: staging.path + "/" + Manifest.fileName)
        try FileSystem.fsync(path: staging.path)
        return manifest
    }

    /// The images of `directory` as the manifest lists them: the memory images, and any other of a chunk or
    /// more, chunked into the store (`ingester` finishes them); the rest hashed and synced as whole files.
    static func completeImages(in directory: String, ingester: ChunkIngester, except skipped: Set<String> = [])
        throws -> (files: [Manifest.FileEntry], chunked: [String: ChunkIngester.File], statistics: ChunkIngester.Statistics,
                   hashSeconds: Double, syncSeconds: Double) {
        let watch = Stopwatch()
        let names = try FileSystem.regularFiles(under: directory).filter { !skipped.contains($0) }
        let large = names.filter { isMemoryImage($0) || (FileSystem.size(directory + "/" + $0) ?? 0) >= UInt64(ChunkStore.chunkSize) }
        let (chunked, statistics) = try ingester.finish(alsoIngest: large)
        let whole = names.filter { chunked[$0] == nil }
        let hashed = try ParallelHasher.hash(whole, under: directory)
        let hashSeconds = watch.seconds
        let syncWatch = Stopwatch()
        for name in whole { try FileSystem.fsync(path: directory + "/" + name) }
        let files = hashed.map { Manifest.FileEntry(path: $0.path, size: $0.size, sha256: $0.sha256, segments: $0.segments) }
            + chunked.map { Manifest.FileEntry(path: $0.key, size: $0.value.size, sha256: ChunkDigest.ofFile(chunks: $0.value.chunks), chunks: $0.value.chunks) }
        return (files, chunked, statistics, hashSeconds, syncWatch.seconds)
    }

    static func pageBytes(in directory: String) -> UInt64 {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.filter { $0.hasPrefix("pages-") }.reduce(0) { $0 + (FileSystem.size(directory + "/" + $1) ?? 0) }
    }

    /// A CRIU failure with the relevant lines of its log quoted; a full filesystem gets its own code and hint.
    static func criuFailure(_ what: String, response: criu_resp, log: String) -> StasisError {
        let excerpt = CRIULog.excerpt(path: log)
        if excerpt.contains(where: { $0.contains("No space left on device") }) {
            return StasisError(.noSpace, "\(what): the filesystem ran out of space", hint: "free space there or write the checkpoint elsewhere",
                               logExcerpt: excerpt, logPath: log)
        }
        return StasisError(.criuFailed, "\(what): \(CRIUService.describe(response))", logExcerpt: excerpt, logPath: log)
    }
}
