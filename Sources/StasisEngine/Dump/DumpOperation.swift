import Foundation
import StasisCRIU
import StasisContainer
import StasisCore
import StasisGPU
import StasisImage
import StasisOS
import StasisStore

/// `stasis dump`: checkpoint a process tree into a directory. `run` is the list of steps; `DumpRun` holds
/// what they share and their one rollback; `DumpTarget` is what differs between a process tree and a container.
/// The sequence, what is frozen when and what rolls back: docs/ARCHITECTURE.md.
///
/// The tree must never be lost: CRIU kills it (without --leave-running) only after its post-dump step, and
/// that step is ours. In it, while the tree is still frozen, the images are completed in the chunk store,
/// synced and the checkpoint published. If anything fails before that point CRIU thaws the tree and it runs
/// on as it was. With --leave-running nothing is lost by letting the job run first: CRIU thaws it, the GPU
/// is given back, and only then are the images completed, synced and published, so that the job's stall
/// does not include writing its memory to disk (a migration, which must hand over the checkpoint while the
/// tree is frozen, still publishes inside the freeze).
///
/// CRIU's memory reaches the store with one copy while the tree is frozen: CRIU sends the pages it drains
/// through its page-server protocol to stasis (`CRIUPageServer`), which cuts them into chunks as they arrive
/// (`ChunkIngester`); no pages-*.img is written and read back. With --leave-running, CRIU writes pages-*.img
/// (the job waits only for that) and the ingester follows it while it grows and after the thaw
/// (`pagesThroughPageServer` says why). Any other image of at least a chunk is chunked at the publish. The
/// checkpoint directory keeps the manifest and the small images. The store lock is held shared from the
/// first chunk until the manifest is in the store's catalog, so gc never takes a chunk this dump is about
/// to reference.
///
/// A container (`Options.container`) is checkpointed by its runtime, runc, which knows how it was made and
/// drives CRIU for it. runc offers no step inside the freeze, so stasis freezes the container itself (`runc
/// pause`), has runc checkpoint it leaving it there, publishes the checkpoint, and only then removes the
/// container (or resumes it, with --leave-running). runc has CRIU write pages-*.img (it can name a page
/// server only by address), which the ingester follows while they grow. If anything fails, the container is resumed as it was;
/// should stasis itself die in between, the container waits, paused (`runc resume` lets it go on).
public struct DumpOperation {
    public struct Options: Sendable {
        public var pid: Int32
        public var directory: String
        public var leaveRunning = false
        public var process = CRIUService.ProcessOptions()
        /// The chunk store (default: STASIS_STORE, else StoreLocation.defaultPath) and how new chunks are compressed.
        public var store: String?
        public var codec = Codec.standard
        /// Where CRIU's memory images are cut into chunks: by their content (the default: memory that moved
        /// between two checkpoints still shares chunks), or nil for fixed `ChunkFormat.chunkSize` pieces.
        public var contentDefinedChunks: ContentDefinedChunking? = .standard
        public var progress: ProgressHandler?
        /// A runc container's ID: checkpoint it through runc (`pid` is then its init's, found by runc).
        public var container: String?
        /// Runs once the checkpoint is published, while the tree is still frozen (not for containers): a
        /// migration sends it and waits for the receiver's restore here. If it throws, the dump fails and the
        /// tree runs on; the published checkpoint stays.
        public var whilePublished: (@Sendable (Manifest, String) throws -> Void)?
        /// How long a GPU job's tree may take to hold still (no compiler running, the same processes) before the
        /// dump touches it (`TreeSettling`); the CLI passes --lock-timeout.
        public var settleSeconds: Double = 10
        /// Told of every new chunk as the dump writes it (`ChunkStore.observe`): a migration sends them at once.
        public var chunkObserver: ChunkObserver?
        /// Where the container runtime and the chunk store come from (the CLI's; the defaults otherwise).
        public var backends = Backends()
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
        // Checks: nothing is touched until they pass.
        let target = try DumpTarget(options)
        let criu = try CRIUBinary.locate()
        try StagingDirectory.check(destination: options.directory)
        let store = try options.backends.openStore(options.store, create: true)
        store.observe(options.chunkObserver)
        defer { store.observe(nil) }
        let storeLock = try store.lock(exclusive: false)
        defer { storeLock.release() }
        if case .process(let pid) = target, ProcFS.tree(root: pid).contains(where: { device.usesDevice($0.pid) }) {
            try TreeSettling.await(root: pid, seconds: options.settleSeconds)
        }

        let dump = try DumpRun(self, target: target, criu: criu, store: store)
        do {
            try dump.freezeDevices()
            try dump.startChunking()
            switch target {
            case .process(let pid): try dump.dumpTree(pid)
            case .container(let runtime, let state, _): try dump.checkpointContainer(runtime, state)
            }
        } catch {
            throw dump.fail(error)
        }
        return try dump.complete(started: total)
    }
}

/// One dump's shared state, its steps and its rollback (each step that succeeds records its undo).
private final class DumpRun {
    let operation: DumpOperation
    var options: DumpOperation.Options { operation.options }
    let target: DumpTarget
    let criu: CRIUBinary
    let store: ChunkStore
    let processes: [Manifest.Process]
    let staging: StagingDirectory
    let rollback = Rollback()
    var timings = Manifest.Timings()
    var gpu = Manifest.GPUSection()
    var deviceFiles: [Manifest.FileEntry] = []
    var deviceStatistics = ChunkIngester.Statistics()
    var ingester: ChunkIngester?
    var published: Manifest?
    /// Moving device memory staged in memory into the store (--leave-running into a disk store).
    var settleSeconds = 0.0
    /// From the hold of the job's devices (or CRIU's freeze) until it runs again, with --leave-running.
    let stall = Stopwatch()
    /// Publish after the job runs again (--leave-running of a process tree, no migration waiting on the freeze).
    var publishesAfterThaw: Bool {
        guard options.leaveRunning, options.whilePublished == nil, case .process = target else { return false }
        return true
    }
    /// Where the rollback kept CRIU's log of a failed dump.
    var keptLog: String?

    init(_ operation: DumpOperation, target: DumpTarget, criu: CRIUBinary, store: ChunkStore) throws {
        (self.operation, self.target, self.criu, self.store) = (operation, target, criu, store)
        processes = target.processes()
        staging = try StagingDirectory(destination: operation.options.directory, store: store)
        // Last to go: the staging directory, keeping CRIU's log beside the destination (the error points to it).
        rollback.onFailure(of: "stage") { [unowned self] in
            keptLog = staging.discard(keeping: CRIUService.dumpLogName)
            return nil
        }
    }

    var destination: String { staging.destination }

    // MARK: the steps, in order

    /// Agents move their device memory out and the driver locks and checkpoints every CUDA process, before
    /// the freeze. Undone by giving the GPU back as it was.
    func freezeDevices() throws {
        let watch = Stopwatch()
        let frozen = try operation.device.beforeFreeze(pids: processes.map(\.pid),
                                                       store: DeviceStore(store: store, codec: options.codec, checkpoint: destination,
                                                                          stageInMemory: publishesAfterThaw))
        (gpu, deviceFiles, deviceStatistics) = (frozen.section, frozen.files, frozen.statistics)
        timings.devices = watch.seconds
        rollback.onFailure(of: "devices") { [unowned self] in
            let leftBehind = operation.device.rollback(section: gpu)
            return leftBehind.isEmpty ? nil : "giving the GPU back also failed: \(leftBehind.joined(separator: "; "))"
        }
        // CRIU must find the tree the driver checkpointed: a process that came or went in between (a
        // compiler the job started) would fail CRIU's seize half-way. Give the GPU back and stop instead.
        if !gpu.processes.isEmpty, case .process(let root) = target,
           let change = TreeSettling.change(root: root, expected: processes.map(\.pid)) {
            throw StasisError(.busy, "the tree of PID \(root) changed while its GPU state was checkpointed (\(change)); nothing was dumped and every process runs on",
                              hint: "try again; a job that keeps starting processes is best checkpointed between its steps")
        }
        // A process that opened the GPU after the device step looked (a job still starting CUDA, seen with JAX
        // on the H100) would reach CRIU with a device mapping no one handles: stop here, clearly, instead.
        if case .process = target {
            let handled = Set(gpu.processes.map(\.pid))
            if let newcomer = processes.map(\.pid).first(where: { !handled.contains($0) && operation.device.usesDevice($0) }) {
                throw StasisError(.busy, "PID \(newcomer) started using the GPU while the dump began; nothing was dumped and every process runs on",
                                  hint: "try again once the job has set up CUDA (after its first step)")
            }
        }
    }

    /// CRIU's pages come through the page server when the tree stays frozen until the publish anyway: the
    /// page server makes CRIU wait for the chunking (the socket's back-pressure), and saves the write and the
    /// read back. Not with --leave-running (publishing after the thaw): there CRIU's write of pages-*.img into
    /// the page cache is what the job waits for, and the chunking goes on after it runs again (on a 2-core VM,
    /// 1 GiB: stalled 0.50-0.65 s through files, 0.93-1.11 s through the page server). Not under runc (it can
    /// name a page server only by address), nor with STASIS_DUMP_PAGES=files (benchmarks compare the two;
    /// docs/GUIDE.md).
    var pagesThroughPageServer: Bool {
        guard case .process = target, !publishesAfterThaw else { return false }
        return ProcessInfo.processInfo.environment["STASIS_DUMP_PAGES"] != "files"
    }

    /// Memory is cut into chunks while CRIU sends it (or writes it: `pagesThroughPageServer`). Undone by
    /// stopping the chunking.
    func startChunking() throws {
        let followsFiles = !pagesThroughPageServer
        let follows: @Sendable (String) -> Bool = { followsFiles && CheckpointWriter.isMemoryImage($0) }
        let chunker = ChunkIngester(directory: staging.path, store: store, codec: options.codec, contentDefined: options.contentDefinedChunks,
                                    releaseIngested: true, follows: follows)
        ingester = chunker
        rollback.onFailure(of: "chunking") { chunker.cancel(); return nil }
    }

    /// CRIU freezes and dumps the tree, its pages through the page server into the chunk store; inside its
    /// post-dump notification (the tree still frozen) the checkpoint is completed and published, and a
    /// migration hands it over. CRIU then ends the tree (or thaws it with --leave-running); if anything here
    /// fails, it thaws it: a page server that fails breaks CRIU's session, and CRIU then fails the dump.
    func dumpTree(_ pid: Int32) throws {
        let imagesFD = try FileSystem.openDirectory(staging.path)
        defer { imagesFD.closeQuietly() }
        let workFD = try FileSystem.openDirectory(staging.workPath)
        defer { workFD.closeQuietly() }
        let chunker = ingester!
        let pages = try pagesThroughPageServer ? CRIUPageServer(imagesDirectory: staging.path, sink: .init(
            receive: { name, source, count in try chunker.receive(name, from: source, count: count) },
            end: { name in try chunker.endStream(name) })) : nil
        var pagesFinished = false
        defer { if !pagesFinished { _ = pages?.finish() } }
        let ticker = progressTicker()
        defer { ticker?.stop() }
        let watch = Stopwatch()
        let outcome = try CRIUService(binary: criu).dump(pid: pid, imagesDirectory: imagesFD, workDirectory: workFD, options: options.process,
                                                         leaveRunning: options.leaveRunning, pageServer: pages?.descriptorForCRIU()) { note in
            guard note.script == "post-dump" else { return }
            FaultInjection.die("post-dump")
            try FaultInjection.check("post-dump")
            guard !publishesAfterThaw else { return }
            try publish()
            FaultInjection.die("published")
            try options.whilePublished?(published!, destination)
        }
        timings.criu = watch.seconds
        pagesFinished = true
        // What broke the page server's session (a chunk that could not be stored) is why CRIU failed.
        if let failure = pages?.finish().first { throw failure }
        guard outcome.succeeded else {
            throw outcome.failure("CRIU could not dump PID \(pid)", log: staging.workPath + "/" + CRIUService.dumpLogName)
        }
        // CRIU never sent post-dump (it always does in 4.x): publish now rather than lose the images.
        if published == nil && !publishesAfterThaw { try publish() }
    }

    /// runc offers no step inside its freeze, so stasis freezes the container itself (`runc pause`), has runc
    /// checkpoint it leaving it there, publishes, and only then removes it (or resumes it, --leave-running).
    /// Undone by resuming the container; should stasis die in between, it waits paused (`runc resume`).
    func checkpointContainer(_ runtime: any ContainerRuntime, _ state: ContainerState) throws {
        let kept = try DumpTarget.keepSpec(of: state, runtime: runtime, in: staging.path)
        let ticker = progressTicker()
        defer { ticker?.stop() }
        let watch = Stopwatch()
        try runtime.pause(state.id)
        rollback.onFailure(of: "pause") {
            do { try runtime.resume(state.id) } catch { return "resuming the paused container also failed: \(error) (`\(runtime.name) resume \(state.id)`)" }
            return nil
        }
        try runtime.checkpoint(state.id, images: staging.path, work: staging.path, leaveRunning: true,
                               tcpEstablished: options.process.tcpEstablished, shellJob: options.process.shellJob)
        timings.criu = watch.seconds
        try FaultInjection.check("post-dump")
        try publish(container: kept)
        if options.leaveRunning {
            try runtime.resume(state.id)
        } else {
            do { try runtime.remove(state.id) } catch {
                // Paused still: the rollback resumes it, and the checkpoint stays.
                throw StasisError(.runtime, "the checkpoint is complete in \(destination), but the container could not be removed (\(error)); it was resumed instead")
            }
        }
        rollback.forget("pause")
    }

    /// Completes the chunks, hashes and syncs the small images, lists the manifest in the store's catalog,
    /// writes it and renames the staging directory into place. Undone (until the rename) by unlisting it.
    private func publish(container: Manifest.Container? = nil) throws {
        let contents = CheckpointWriter.Contents(
            toolVersion: StasisVersion.current, criu: .init(version: criu.version, logFile: CRIUService.dumpLogName),
            options: .init(leaveRunning: options.leaveRunning, tcpEstablished: options.process.tcpEstablished, shellJob: options.process.shellJob),
            processTree: .init(rootPID: target.rootPID, processes: processes), gpu: gpu, deviceFiles: deviceFiles,
            deviceStatistics: deviceStatistics, timings: timings, container: container, codec: options.codec.description)
        rollback.onFailure(of: "list") { [unowned self] in
            // Listed in the catalog but never published: drop it (its chunks go at the next gc).
            if !staging.published, let id = staging.manifestID { StoreCatalog(store: store).unregister(id: id) }
            return nil
        }
        let manifest = try CheckpointWriter.write(contents, staging: staging, ingester: ingester!, store: store,
                                                  skipping: [CRIUService.dumpLogName]) { try FaultInjection.check("publish") }.manifest
        FaultInjection.die("listed")
        try staging.publish()
        published = manifest
    }

    /// After CRIU's exit: its statistics complete the manifest's timings, the devices finish (a
    /// --leave-running dump's agents refill), and CRIU's log joins the checkpoint. Each file step is one
    /// rename, so a stasis killed anywhere here leaves a checkpoint that restores (CRIU's log, listed nowhere,
    /// is no file of the checkpoint's: `Checkpoint.unlistedLogs`).
    func complete(started total: Stopwatch) throws -> DumpOperation.Report {
        FaultInjection.die("criu-exited")
        let stats = CRIUStats.read(staging.workPath + "/stats-dump")?.dump
        if let stats {
            timings.freeze = Double(stats.freezingTime) / 1e6
            timings.frozen = Double(stats.frozenTime) / 1e6
            timings.memoryDump = Double(stats.memdumpTime) / 1e6
            timings.memoryWrite = Double(stats.memwriteTime) / 1e6
        }
        let deviceWatch = Stopwatch()
        var deviceFailure: Error?
        do { try operation.device.afterDump(section: gpu, leaveRunning: options.leaveRunning) } catch { deviceFailure = error }
        timings.devices += deviceWatch.seconds
        if options.leaveRunning { timings.stalled = stall.seconds }
        if published == nil {
            // CRIU has thawed the job (--leave-running) and the GPU is given back: nothing on the GPU to undo,
            // and a failure from here on costs the checkpoint, not the job. Device memory staged in memory goes
            // into the store first. Published even when giving the GPU back failed: it is then the way to the
            // job's state.
            rollback.forget("devices")
            do {
                let settleWatch = Stopwatch()
                if let settled = try operation.device.settle(files: deviceFiles, into: store) {
                    deviceStatistics = settled
                    settleSeconds = settleWatch.seconds
                }
                try publish()
            } catch { throw fail(error) }
        }
        if let deviceFailure { throw deviceFailure }
        var manifest = published!
        if let stats { manifest.memory.dumpedBytes = stats.pagesWritten * UInt64(manifest.host.pageSize) }
        timings.hash = manifest.timings.hash
        // Copying staged device memory into the store counts as making the checkpoint durable.
        timings.sync = manifest.timings.sync + settleSeconds
        timings.total = total.seconds
        manifest.timings = timings
        // The published manifest is complete already; this rewrite only adds the timings, so a failure keeps it.
        try? FileSystem.writeAtomically(try Manifest.encoder().encode(manifest), to: destination + "/" + Manifest.fileName,
                                        temporaryDirectory: staging.workPath)
        FaultInjection.die("manifest-rewritten")
        staging.finishWork(keeping: CRIUService.dumpLogName)
        FaultInjection.die("log-moved")
        // The catalog's copy gets the final timings; the published one already guards the chunks.
        try? StoreCatalog(store: store).register(manifest, directory: destination)
        return .init(directory: destination, rootPID: target.rootPID, processes: processes.count, threads: processes.reduce(0) { $0 + $1.threads },
                     leaveRunning: options.leaveRunning, memory: manifest.memory, timings: timings, gpu: gpu, store: manifest.store,
                     criuVersion: criu.version, container: options.container)
    }

    // MARK: the rollback

    /// Undoes every step done, the last first, and says so in the error: what could not be put back, or that
    /// the job runs on as it was.
    func fail(_ error: Error) -> StasisError {
        let leftBehind = rollback.undo()
        var failure = StasisError.wrapping(error, as: .io)
        // The staging directory is gone: point at the copy of CRIU's log kept beside it, if CRIU ran.
        failure.logPath = keptLog
        let pid = target.rootPID
        if !leftBehind.isEmpty {
            failure.message += "; " + leftBehind.joined(separator: "; ")
        } else if ProcFS.isLive(pid) {
            failure.message += " (PID \(pid) is still running, as it was before the dump)"
        }
        return failure.prefixed("dump of PID \(pid) failed")
    }

    private func progressTicker() -> ProgressTicker? {
        let stagingPath = staging.path, resident = processes.reduce(0) { $0 + $1.residentBytes }, chunker = ingester
        // Never backwards: CRIU's pages files leave the staging directory once chunked.
        let shown = Locked<UInt64>(0)
        return ProgressTicker(options.progress.map { report in
            { @Sendable in
                let now = CheckpointWriter.pageBytes(in: stagingPath) + (chunker?.streamedBytes ?? 0)
                let bytes = shown.withLock { shown in shown = max(shown, now); return shown }
                report(Progress(phase: "dumping memory", bytes: bytes, totalBytes: resident))
            }
        })
    }
}
