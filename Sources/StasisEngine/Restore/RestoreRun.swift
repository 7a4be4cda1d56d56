import Foundation
import StasisCRIU
import StasisContainer
import StasisCore
import StasisGPU
import StasisImage
import StasisOS
import StasisStore

/// One restore's shared state, its steps and its one rollback. Each acquisition records its undo where it is
/// made: the store's lock, the rebuilt images, the read-ahead and, once CRIU (or runc) has restored it, the
/// tree (or container) that runs. A failure runs them all, the last first (`fail`); a restore that worked
/// hands the tree on and lets go of the rest the same way (`finish`). The work directory is not a rollback
/// step: a failure keeps CRIU's log, which the error points at (old ones are pruned, `pruneWorkDirectories`);
/// a restore that worked removes a default one (`finish`), unless told to keep it.
final class RestoreRun {
    /// A container's checkpoint: its runtime, and the work directory its images are rebuilt in.
    struct Container {
        let checkpointed: Manifest.Container
        let runtime: any ContainerRuntime
        let workDirectory: String
    }

    let operation: RestoreOperation
    var options: RestoreOperation.Options { operation.options }
    let rollback = Rollback()
    let total = Stopwatch()
    let directory: String
    let manifest: Manifest
    let criu: CRIUBinary
    let store: ChunkStore?
    /// Device memory an agent moved is the agent's to refill; CRIU reads only its own images.
    let criuItems: [ChunkedFiles.Item]
    private(set) var container: Container?
    /// Where CRIU's images are rebuilt as files, when they are not streamed.
    private var rebuilt: String?
    private var timings = RestoreOperation.Timings()
    private var workDirectory = ""
    private var clearedTimeWait = 0
    private var rootPID: Int32 = 0
    private var containerID: String?
    private var deviceSteps: [String: Double] = [:]
    /// A prepared restore's GPU processes, their device calls held until the activation.
    private var heldDevices: [Int32] = []
    /// What runs once restored, for a failure's message: what restored it, and how the rollback stops it.
    private var running: (what: String, undone: String)?
    /// The rollback's step for what runs (the restored tree or container): forgotten once it is the user's.
    private static let runningStep = "running"

    /// Checks that hold nothing yet: the manifest, CRIU, the CPU, the GPUs, and the store the manifest names.
    init(_ operation: RestoreOperation) throws {
        self.operation = operation
        let options = operation.options
        directory = URL(fileURLWithPath: options.directory).standardizedFileURL.path
        manifest = try Checkpoint.readManifest(directory)
        criu = try CRIUBinary.locate()
        try criu.checkRestores(imagesOf: manifest.criu.version)
        if !options.skipCPUCheck { try RestoreOperation.checkCPU(manifest.host) }
        try operation.device.checkRestorable(section: manifest.gpu)
        if options.prepare, let refusal = PreparedRestore.refusal(manifest, device: operation.device) { throw StasisError(.invalidArgument, "restore --prepare refused: \(refusal)") }
        store = manifest.store == nil ? nil : try options.chunkStore ?? Checkpoint.store(for: manifest, explicit: options.store)
        criuItems = Checkpoint.criuItems(manifest)
    }

    private var images: RestoreOperation.Images {
        store == nil ? .files : (options.rebuildRoot ?? container?.workDirectory) == nil ? .streamed : .rebuilt
    }

    // MARK: the steps, in order

    /// The store's lock, shared, until the end: CRIU's images and the agents' memory come from the store all
    /// along, so gc and rm wait. A store that cannot be locked (read-only) is read all the same.
    func holdStore() {
        guard let lock = store?.readerLock() else { return }
        rollback.onFailure(of: "store lock") { lock.release(); return nil }
    }

    /// A container's checkpoint needs runc, and a work directory (made now: runc reads files, so its images are
    /// always rebuilt, by default there).
    func prepareContainer() throws {
        guard let checkpointed = manifest.container else { return }
        let runtime = try options.backends.containerRuntime()
        container = Container(checkpointed: checkpointed, runtime: runtime, workDirectory: try options.workDirectory ?? RestoreOperation.makeWorkDirectory())
    }

    /// Every whole file against its digest, and every chunk present in the store or, with a rebuild directory,
    /// every chunk read, checked and written there. Nothing has started: a failure refuses the restore.
    func verifyImages() throws {
        let watch = Stopwatch()
        let imageBytes = manifest.files.reduce(0) { $0 + $1.size }
        let counter = Locked<UInt64>(0)
        let ticker = ProgressTicker(options.progress.map { report in
            { @Sendable in report(Progress(phase: "verifying", bytes: counter.current, totalBytes: imageBytes)) }
        })
        defer { ticker?.stop() }
        do {
            _ = try Checkpoint.verify(directory, manifest: manifest, store: store, chunks: false) { counter.add($0) }
            if let store, let info = manifest.store {
                if let rebuildRoot = options.rebuildRoot ?? container?.workDirectory {
                    let rebuildWatch = Stopwatch()
                    try rebuildImages(in: rebuildRoot, from: store, chunkSize: info.chunkSize) { counter.add($0) }
                    timings.rebuild = rebuildWatch.seconds
                } else {
                    try ChunkedFiles.requirePresent(Checkpoint.chunkedItems(manifest), in: store, checkpoint: directory, chunkSize: info.chunkSize)
                }
            }
        } catch {
            throw StasisError.wrapping(error, as: .io).prefixed("restore refused")
        }
        timings.verify = watch.seconds - timings.rebuild
    }

    /// CRIU's images as files in a private directory under `root` (removed at the end): the whole ones copied,
    /// the chunked ones read from the store and checked. The agents' device memory is only checked present.
    private func rebuildImages(in root: String, from store: ChunkStore, chunkSize: Int, progress: @escaping @Sendable (UInt64) -> Void) throws {
        try FileSystem.makePrivateDirectory(root)
        let rebuilt = try RestoreOperation.makeRebuildDirectory(in: root, bytes: criuItems.reduce(0) { $0 + $1.size })
        self.rebuilt = rebuilt
        rollback.onFailure(of: "rebuilt images") { FileSystem.removeTree(rebuilt); return nil }
        for entry in manifest.files where entry.chunks == nil && Checkpoint.isForCRIU(entry.path) {
            // Scratch, removed when the restore ends: no fsync on the downtime path (FileManager's copy had none).
            try FileSystem.copyFile(directory + "/" + entry.path, to: rebuilt + "/" + entry.path, durable: false)
        }
        try ChunkedFiles.read(criuItems, from: store, checkpoint: directory, chunkSize: chunkSize, into: rebuilt, progress: progress)
        try ChunkedFiles.requirePresent(Checkpoint.chunkedItems(manifest).filter { Checkpoint.isDeviceMemory($0.path) }, in: store,
                                        checkpoint: directory, chunkSize: chunkSize)
    }

    /// From a cold disk, the chunks are read ahead (CRIU's first, then the agents' device memory) while CRIU
    /// and the driver do their part; the refill then finds them in memory.
    func readAhead() {
        guard options.prefetch, let store else { return }
        let prefetcher = ChunkPrefetcher(store: store, items: criuItems
            + Checkpoint.chunkedItems(manifest).filter { Checkpoint.isDeviceMemory($0.path) })
        prefetcher.start()
        rollback.onFailure(of: "read-ahead") { prefetcher.stop(); return nil }
    }

    /// The checkpoint's PIDs free (restored processes keep theirs), TIME_WAIT sockets on its listeners cleared.
    func freeTheTreesPIDs() throws {
        try RestoreOperation.waitForFreePIDs(manifest.processTree, seconds: options.pidWaitSeconds)
        clearedTimeWait = RestoreOperation.clearListeningPorts(manifest.processTree)
    }

    /// CRIU restores the tree, streamed from the store or from files. A failure here is CRIU's to undo (it
    /// removes what it created); once it reports the tree restored, the tree is the rollback's to stop.
    func restoreTree() throws {
        workDirectory = try options.workDirectory ?? RestoreOperation.makeWorkDirectory()
        try FileSystem.makeSecretDirectory(workDirectory, mustBeEmpty: false)
        let logPath = workDirectory + "/" + CRIUService.restoreLogName
        var processOptions = CRIUService.ProcessOptions(tcpEstablished: manifest.options.tcpEstablished,
                                                        shellJob: manifest.options.shellJob, logLevel: options.logLevel)
        processOptions.leaveStopped = options.prepare
        let watch = Stopwatch()
        let streamed = Locked<UInt64>(0)
        let ticker = images == .streamed
            ? ProgressTicker.reporting(options.progress, phase: "restoring memory", total: criuItems.reduce(0) { $0 + $1.size }) { streamed.current }
            : nil
        let outcome = Result { try criuRestores(processOptions) { bytes in streamed.withLock { $0 += UInt64(bytes) } } }
        ticker?.stop()
        let (response, streamFailures) = try outcome.get()
        timings.criu = watch.seconds
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
        self.rootPID = rootPID
        // Never leave a half-restored tree: the restored processes are ours to stop until the restore is done.
        rollback.onFailure(of: Self.runningStep) { RestoreOperation.stopRestoredTree(root: rootPID); return nil }
        if let problem = streamProblem {
            // CRIU finished although an image failed its check on the way (it read less than all of it):
            // what it restored cannot be trusted, so the tree is stopped.
            running = ("CRIU restored it", "the restored tree was stopped")
            throw problem
        }
        running = ("CRIU restored PID \(rootPID)", "the restored tree was stopped")
    }

    /// CRIU's restore proper: through the image server (which returns the images that failed on the way), or
    /// from the rebuilt files (or the checkpoint's own, without a store).
    private func criuRestores(_ processOptions: CRIUService.ProcessOptions,
                              streamed: @escaping @Sendable (Int) -> Void) throws -> (CRIUOutcome, [Error]) {
        if images == .streamed, let store, let info = manifest.store {
            // CRIU finds the server's socket in the directory it is given as its images directory.
            let server = try CRIUImageServer(directory: workDirectory + "/images",
                                             provider: Self.imageProvider(manifest, items: criuItems, directory: directory, store: store,
                                                                          chunkSize: info.chunkSize, streamed: streamed))
            let restored = Result {
                try CRIUService(binary: criu).restoreStreaming(imagesDirectory: server.directory, workDirectory: workDirectory,
                                                               options: processOptions, pids: manifest.processTree.processes.map(\.pid))
            }
            let streamFailures = server.finish()
            return (try restored.get(), streamFailures)
        }
        let imagesFD = try FileSystem.openDirectory(rebuilt ?? directory)
        defer { imagesFD.closeQuietly() }
        let workFD = try FileSystem.openDirectory(workDirectory)
        defer { workFD.closeQuietly() }
        return (try CRIUService(binary: criu).restore(imagesDirectory: imagesFD, workDirectory: workFD, options: processOptions) { _ in }, [])
    }

    /// runc restores the container from the rebuilt images; its processes get new PIDs (the container has its
    /// own PID namespace), so the root PID is runc's answer. Once restored, the container is the rollback's to
    /// remove.
    func restoreContainer(_ container: Container) throws {
        let id = options.containerID ?? container.checkpointed.id
        let bundle = options.bundle ?? container.checkpointed.bundle
        guard !bundle.isEmpty else {
            throw StasisError(.invalidArgument, "restore refused: the checkpoint does not say where container \(id)'s bundle is (it came from a checkpoint archive)",
                              hint: "give the container's OCI bundle with --bundle")
        }
        guard FileSystem.exists(bundle + "/config.json") else {
            throw StasisError(.invalidArgument, "restore refused: the bundle \(bundle) of container \(id) has no config.json",
                              hint: "give the container's OCI bundle with --bundle")
        }
        workDirectory = container.workDirectory
        try FileSystem.makeSecretDirectory(workDirectory, mustBeEmpty: false)
        let watch = Stopwatch()
        do {
            try container.runtime.restore(id, bundle: bundle, images: rebuilt ?? directory, work: workDirectory,
                                       tcpEstablished: manifest.options.tcpEstablished, shellJob: manifest.options.shellJob)
        } catch var error as StasisError {
            // runc says only "criu failed"; CRIU's own log says why (images of a version it does not read, say).
            if error.logExcerpt.isEmpty, let log = error.logPath {
                let (excerpt, advice) = CRIULog.explain(path: log, limit: 4)
                error.logExcerpt = excerpt
                if error.hint == nil { error.hint = advice }
            }
            throw error
        }
        timings.criu = watch.seconds
        containerID = id
        rollback.onFailure(of: Self.runningStep) {
            do { try container.runtime.remove(id) } catch { return "removing it also failed (\(error)): `runc delete --force \(id)`" }
            return nil
        }
        running = ("runc restored container \(id)", "the container was removed")
        do {
            rootPID = try container.runtime.state(id).pid
        } catch {
            throw StasisError.wrapping(error, as: .runtime)
        }
    }

    /// The driver restores and unlocks each CUDA process, agents refill their memory, shared memory is
    /// reconnected. A container's processes are found by their new PIDs (`ContainerPIDs`); a container without
    /// GPU processes has nothing here.
    func restoreDevices(holdCalls: Bool = false) throws {
        if container != nil && manifest.gpu.processes.isEmpty { return }
        let watch = Stopwatch()
        do {
            try FaultInjection.check("after-restore")
            var section = manifest.gpu
            if let container, let id = containerID {
                section = try ContainerPIDs.remap(manifest.gpu, processes: manifest.processTree.processes, restored: try container.runtime.processes(id))
            }
            deviceSteps = try operation.device.afterRestore(section: section, store: store.map { DeviceStore(store: $0, checkpoint: directory) },
                                                            files: manifest.files, holdCalls: holdCalls)
        } catch {
            throw StasisError.wrapping(error, as: .gpu)
        }
        timings.devices = watch.seconds
    }

    /// A prepared restore's GPU processes: CRIU left them stopped, and the driver and the agents work only in
    /// a process that runs, so each runs while its devices come back (its CUDA calls held at its agent's gate;
    /// the tree's other processes stay stopped), then is stopped again.
    func restoreDevicesHeld() throws {
        let pids = manifest.gpu.processes.map(\.pid)
        guard !pids.isEmpty else { return }
        for pid in pids { Signals.resume(pid) }
        try restoreDevices(holdCalls: true)
        try PreparedRestore.stopAgain(pids)
        heldDevices = pids
    }

    /// A prepared restore: the stopped tree is recorded for `stasis activate` (if that fails, the rollback
    /// stops the tree, as for any failure once CRIU restored it).
    func recordPrepared() throws {
        try PreparedRestore.record(root: rootPID, checkpoint: options.checkpointName ?? directory, manifestID: manifest.id,
                                   logFile: workDirectory + "/" + CRIUService.restoreLogName,
                                   removeLogAtActivation: options.workDirectory == nil && !options.keepLog, heldDevices: heldDevices)
    }

    /// The restore worked: what runs is the user's now (no rollback stops it), CRIU's statistics complete the
    /// timings, and what the restore held (the read-ahead, the rebuilt images, the store's lock) is let go, the
    /// last taken first, as a failure would.
    func finish() -> RestoreOperation.Report {
        rollback.forget(Self.runningStep)
        let stats = CRIUStats.read(workDirectory + "/stats-restore")?.restore
        timings.forking = Double(stats?.forkingTime ?? 0) / 1e6
        timings.restore = Double(stats?.restoreTime ?? 0) / 1e6
        timings.total = total.seconds
        // The work directory is 0700 already (makeSecretDirectory): its files are private whatever their modes,
        // and the job runs: a mode left as CRIU set it is no reason to stop it.
        _ = try? FileSystem.makePrivate(tree: workDirectory)
        // A work directory of stasis's own choosing goes once the restore worked: what it holds (CRIU's log
        // and statistics, read above) explains failures, and failed restores keep theirs. A prepared tree's
        // goes at its activation (its record names the log).
        let removeWork = options.workDirectory == nil && !options.keepLog && !options.prepare
        if removeWork { FileSystem.removeTree(workDirectory) }
        let report = RestoreOperation.Report(
            directory: options.checkpointName ?? directory, rootPID: rootPID, processes: manifest.processTree.processes.count,
            logFile: removeWork ? nil : workDirectory + "/" + CRIUService.restoreLogName, images: container == nil ? images : .rebuilt, timings: timings,
            deviceSteps: deviceSteps, container: containerID, clearedTimeWaitSockets: clearedTimeWait, prepared: options.prepare)
        // What is left holds nothing the user sees, and none of its undos can fail.
        _ = rollback.undo()
        return report
    }

    // MARK: the rollback

    /// Undoes every step done, the last first. Before anything runs, the step's own error says what failed;
    /// once the tree (or container) ran, the error says what restored it and that it was stopped, or what could
    /// not be undone.
    func fail(_ error: Error) -> Error {
        let leftBehind = rollback.undo()
        guard let running else {
            guard !leftBehind.isEmpty else { return error }
            return StasisError.wrapping(error).appending("; " + leftBehind.joined(separator: "; "))
        }
        let outcome = leftBehind.isEmpty ? running.undone : leftBehind.joined(separator: "; ")
        return StasisError.wrapping(error).prefixed("restore of \(options.checkpointName ?? directory) failed after \(running.what); \(outcome)")
    }

    /// What the image server gives CRIU for each name: a chunked image decoded from the store, a whole one
    /// copied from the checkpoint directory; nil for names the checkpoint does not have.
    static func imageProvider(_ manifest: Manifest, items: [ChunkedFiles.Item], directory: String, store: ChunkStore,
                              chunkSize: Int, streamed: (@Sendable (Int) -> Void)? = nil) -> CRIUImageServer.Provider {
        let chunked = Dictionary(uniqueKeysWithValues: items.map { ($0.path, $0) })
        let whole = Set(manifest.files.filter { $0.chunks == nil }.map(\.path))
        return { name in
            if let item = chunked[name] {
                return { pipe in try ChunkedFiles.stream(item, from: store, checkpoint: directory, chunkSize: chunkSize, to: pipe, written: streamed) }
            }
            guard whole.contains(name) else { return nil }
            return { pipe in try FileSystem.copy(directory + "/" + name, to: pipe) }
        }
    }
}
