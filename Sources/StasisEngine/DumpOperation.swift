import Foundation
import Glibc
import StasisCRIU
import StasisCore
import StasisGPU
import StasisImage
import StasisOS

/// `stasis dump`: checkpoint a process tree into a directory.
///
/// The tree must never be lost: CRIU kills it (without --leave-running) only after its post-dump step, and
/// that step is ours. In it, while the tree is still frozen, the images are hashed, synced and the checkpoint
/// published. If anything fails before that point CRIU thaws the tree and it runs on as it was.
public struct DumpOperation {
    public struct Options: Sendable {
        public var pid: Int32
        public var directory: String
        public var leaveRunning = false
        public var process = CRIUService.ProcessOptions()
        public var progress: ProgressHandler?
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
        public var criuVersion: String
    }

    let options: Options
    let device: DeviceStep

    public init(_ options: Options, device: DeviceStep = NoDeviceStep()) {
        self.options = options
        self.device = device
    }

    public func run() throws -> Report {
        let total = Stopwatch()
        let pid = options.pid
        guard pid > 0, ProcFS.isLive(pid) else {
            throw StasisError(.processNotFound, "no running process with PID \(pid)", hint: "check the PID with `ps -p \(pid)`")
        }
        let criu = try CRIUBinary.locate()
        let staging = try StagingDirectory(destination: options.directory)
        let destination = staging.destination

        let tree = ProcFS.tree(root: pid)
        let processes = tree.map { entry -> Manifest.Process in
            let status = ProcFS.status(entry.pid)
            return Manifest.Process(pid: entry.pid, ppid: entry.ppid, command: entry.command, arguments: ProcFS.arguments(entry.pid),
                                    threads: Int(status["Threads"] ?? "") ?? 1, residentBytes: ProcFS.kilobytes(status["VmRSS"]))
        }
        var timings = Manifest.Timings()
        var gpu = Manifest.GPUSection()
        var published: Manifest?
        var follower: GrowingFilesHasher?
        let imagesFD: Int32
        do {
            imagesFD = try FileSystem.openDirectory(staging.path)
        } catch {
            staging.discard()
            throw error
        }
        defer { close(imagesFD) }

        do {
            let deviceWatch = Stopwatch()
            gpu = try device.beforeFreeze(pids: processes.map(\.pid))
            timings.devices = deviceWatch.seconds

            let hasher = GrowingFilesHasher(directory: staging.path) { $0.hasPrefix("pages-") && $0.hasSuffix(".img") }
            follower = hasher
            let progress = options.progress
            let stagingPath = staging.path
            let resident = processes.reduce(0) { $0 + $1.residentBytes }
            let ticker = ProgressTicker(progress.map { report in
                { @Sendable in report(Progress(phase: "dumping memory", bytes: Self.pageBytes(in: stagingPath), totalBytes: resident)) }
            })
            defer { ticker?.stop() }

            let criuWatch = Stopwatch()
            let service = CRIUService(binary: criu)
            let response = try service.dump(pid: pid, imagesDirectory: imagesFD, options: options.process,
                                             leaveRunning: options.leaveRunning) { note in
                guard note.script == "post-dump" else { return }
                try FaultInjection.check("post-dump")
                // The tree is frozen here: make the checkpoint complete and durable before CRIU may kill it.
                let manifest = try finish(staging: staging, partial: follower?.stop() ?? [:], criu: criu, processes: processes,
                                          gpu: gpu, timings: timings)
                try staging.publish()
                published = manifest
            }
            timings.criu = criuWatch.seconds
            guard response.success else {
                throw Self.criuFailure("CRIU could not dump PID \(pid)", response: response,
                                       log: (published == nil ? staging.path : destination) + "/" + CRIUService.dumpLogName)
            }
            if published == nil {
                // CRIU never sent post-dump (it always does in 4.x): publish now rather than lose the images.
                published = try finish(staging: staging, partial: follower?.stop() ?? [:], criu: criu, processes: processes,
                                       gpu: gpu, timings: timings)
                try staging.publish()
            }
        } catch {
            _ = follower?.stop()
            let leftBehind = device.rollback(section: gpu)
            let keptLog = staging.discard(keeping: CRIUService.dumpLogName)
            var failure = (error as? StasisError) ?? StasisError(.io, "\(error)")
            // The staging directory is gone: point at the copy of CRIU's log kept beside it, if CRIU ran.
            failure.logPath = keptLog
            if !leftBehind.isEmpty {
                failure.message += "; giving the GPU back also failed: \(leftBehind.joined(separator: "; "))"
            } else if ProcFS.isLive(pid) {
                failure.message += " (PID \(pid) is still running, as it was before the dump)"
            }
            throw failure.prefixed("dump of PID \(pid) failed")
        }

        // CRIU has exited: its statistics and its complete log can now join the manifest.
        var manifest = published!
        if let stats = CRIUStats.read(destination + "/stats-dump")?.dump {
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
        try Self.addLateFiles(to: &manifest, in: destination)
        return Report(directory: destination, rootPID: pid, processes: processes.count, threads: processes.reduce(0) { $0 + $1.threads },
                      leaveRunning: options.leaveRunning, memory: manifest.memory, timings: timings, gpu: gpu, criuVersion: criu.version)
    }

    /// Hashes every image (completing the hashes begun while CRIU wrote), syncs them to disk and writes the
    /// manifest into the staging directory. Runs while the tree is frozen.
    private func finish(staging: StagingDirectory, partial: [String: IncrementalFileHash], criu: CRIUBinary,
                        processes: [Manifest.Process], gpu: Manifest.GPUSection, timings: Manifest.Timings) throws -> Manifest {
        let watch = Stopwatch()
        let names = try FileSystem.regularFiles(under: staging.path).filter { $0 != CRIUService.dumpLogName }
        let hashed = try ParallelHasher.hash(names, under: staging.path, started: partial)
        var timings = timings
        timings.hash = watch.seconds
        let syncWatch = Stopwatch()
        for name in names { try FileSystem.fsync(path: staging.path + "/" + name) }
        timings.sync = syncWatch.seconds
        let files = hashed.map { Manifest.FileEntry(path: $0.path, size: $0.size, sha256: $0.sha256, segments: $0.segments) }
        let manifest = Manifest(
            id: UUID().uuidString.lowercased(), createdAt: Date(),
            tool: .init(name: "stasis", version: StasisVersion.current), host: HostFacts.current(),
            criu: .init(version: criu.version, logFile: CRIUService.dumpLogName),
            options: .init(leaveRunning: options.leaveRunning, tcpEstablished: options.process.tcpEstablished, shellJob: options.process.shellJob),
            processTree: .init(rootPID: options.pid, processes: processes),
            memory: .init(residentBytes: processes.reduce(0) { $0 + $1.residentBytes }, dumpedBytes: Self.pageBytes(in: staging.path),
                          imageBytes: files.reduce(0) { $0 + $1.size }),
            timings: timings, gpu: gpu, files: files)
        try FaultInjection.check("publish")
        try FileSystem.writeAtomically(try Manifest.encoder().encode(manifest), to: staging.path + "/" + Manifest.fileName)
        try FileSystem.fsync(path: staging.path)
        return manifest
    }

    /// CRIU writes its statistics and the end of its log after post-dump; hash them in and rewrite the
    /// manifest. Should that fail, the files are removed again so the published checkpoint stays consistent.
    static func addLateFiles(to manifest: inout Manifest, in directory: String) throws {
        let listed = Set(manifest.files.map(\.path))
        let late = try FileSystem.regularFiles(under: directory).filter { $0 != Manifest.fileName && !listed.contains($0) }
        do {
            try FileSystem.makePrivate(tree: directory)
            let hashed = try ParallelHasher.hash(late, under: directory)
            manifest.files = (manifest.files + hashed.map { Manifest.FileEntry(path: $0.path, size: $0.size, sha256: $0.sha256, segments: $0.segments) })
                .sorted { $0.path < $1.path }
            manifest.memory.imageBytes = manifest.files.reduce(0) { $0 + $1.size }
            try FileSystem.writeAtomically(try Manifest.encoder().encode(manifest), to: directory + "/" + Manifest.fileName)
        } catch {
            for name in late { unlink(directory + "/" + name) }
        }
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
