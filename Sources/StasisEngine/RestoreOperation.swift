import Foundation
import Glibc
import StasisCRIU
import StasisCore
import StasisGPU
import StasisImage
import StasisOS
import StasisStore

/// `stasis restore`: bring a checkpointed tree back, with the same PIDs, detached from stasis.
///
/// Everything that can refuse the restore runs before CRIU starts anything: the manifest, the integrity of
/// every file, the host's CPU, the device check and free PIDs. The chunked memory images are rebuilt for
/// CRIU (on tmpfs by default) in parallel, each chunk checked as it is read, so a damaged chunk refuses the
/// restore before any process exists. After CRIU, a failing device step kills the restored tree, so no
/// half-restored process is left behind.
public struct RestoreOperation {
    public struct Options: Sendable {
        public var directory: String
        /// Where CRIU's restore log and statistics go (default: a new directory under /var/lib/stasis/restore).
        public var workDirectory: String?
        /// The chunk store (default: the one the manifest names).
        public var store: String?
        /// Where CRIU's images are rebuilt from the store; a private directory is made and removed inside it.
        public var rebuildRoot = RestoreOperation.defaultRebuildRoot
        public var skipCPUCheck = false
        /// How long to wait for a checkpointed PID that is still exiting (a zombie, or reaped slowly by init).
        public var pidWaitSeconds = 5.0
        public var logLevel: Int32 = 4
        public var progress: ProgressHandler?
        public init(directory: String) { self.directory = directory }
    }

    public struct Report: Codable, Sendable {
        public var directory: String
        public var rootPID: Int32
        public var processes: Int
        public var logFile: String
        public var timings: Timings
    }

    public struct Timings: Codable, Sendable {
        /// Checking the whole files, and rebuilding (reading, decoding and checking every chunk of) the chunked ones.
        public var verify: Double
        public var rebuild: Double
        public var criu: Double
        public var forking: Double
        public var restore: Double
        public var devices: Double
        public var total: Double
    }

    public static let defaultWorkRoot = "/var/lib/stasis/restore"
    public static let defaultRebuildRoot = "/dev/shm"

    let options: Options
    let device: DeviceStep

    public init(_ options: Options, device: DeviceStep = NoDeviceStep()) {
        self.options = options
        self.device = device
    }

    public func run() throws -> Report {
        let total = Stopwatch()
        let directory = URL(fileURLWithPath: options.directory).standardizedFileURL.path
        let manifest = try Checkpoint.readManifest(directory)
        let criu = try CRIUBinary.locate()
        if !options.skipCPUCheck { try Self.checkCPU(manifest.host) }
        try device.checkRestorable(section: manifest.gpu)

        let store = try Checkpoint.store(for: manifest, explicit: options.store)
        let verifyWatch = Stopwatch()
        let imageBytes = manifest.files.reduce(0) { $0 + $1.size }
        let counter = ByteCounter()
        let progress = options.progress
        let ticker = ProgressTicker(progress.map { report in
            { @Sendable in report(Progress(phase: "verifying", bytes: counter.value, totalBytes: imageBytes)) }
        })
        var rebuilt: String?
        defer { if let rebuilt { FileSystem.removeTree(rebuilt) } }
        var rebuildSeconds = 0.0
        do {
            _ = try Checkpoint.verify(directory, manifest: manifest, store: store, chunks: false) { counter.add($0) }
            if let store, let info = manifest.store {
                let rebuildWatch = Stopwatch()
                rebuilt = try Self.makeRebuildDirectory(in: options.rebuildRoot, bytes: manifest.files.filter { $0.chunks != nil }.reduce(0) { $0 + $1.size })
                for entry in manifest.files where entry.chunks == nil {
                    try FileManager.default.copyItem(atPath: directory + "/" + entry.path, toPath: rebuilt! + "/" + entry.path)
                }
                try ChunkedFiles.read(Checkpoint.chunkedItems(manifest), from: store, checkpoint: directory, chunkSize: info.chunkSize,
                                      into: rebuilt) { counter.add($0) }
                rebuildSeconds = rebuildWatch.seconds
            }
            ticker?.stop()
        } catch {
            ticker?.stop()
            throw (error as? StasisError ?? StasisError(.io, "\(error)")).prefixed("restore refused")
        }
        let verifySeconds = verifyWatch.seconds - rebuildSeconds
        try waitForFreePIDs(manifest.processTree)

        let workDirectory = try options.workDirectory ?? Self.makeWorkDirectory()
        try FileSystem.makePrivateDirectory(workDirectory)
        let imagesFD = try FileSystem.openDirectory(rebuilt ?? directory)
        defer { close(imagesFD) }
        let workFD = try FileSystem.openDirectory(workDirectory)
        defer { close(workFD) }
        let logPath = workDirectory + "/" + CRIUService.restoreLogName

        let criuWatch = Stopwatch()
        let processOptions = CRIUService.ProcessOptions(tcpEstablished: manifest.options.tcpEstablished,
                                                        shellJob: manifest.options.shellJob, logLevel: options.logLevel)
        let response = try CRIUService(binary: criu).restore(imagesDirectory: imagesFD, workDirectory: workFD,
                                                             options: processOptions) { _ in }
        let criuSeconds = criuWatch.seconds
        guard response.success else {
            throw DumpOperation.criuFailure("CRIU could not restore \(directory)", response: response, log: logPath)
                .prefixed("restore failed")
        }
        let rootPID = response.restore.pid
        let deviceWatch = Stopwatch()
        do {
            try FaultInjection.check("after-restore")
            try device.afterRestore(section: manifest.gpu)
        } catch {
            // Never leave a half-restored tree: the restored processes are ours to stop.
            for process in manifest.processTree.processes.reversed() { kill(process.pid, SIGKILL) }
            let failure = (error as? StasisError) ?? StasisError(.gpu, "\(error)")
            throw failure.prefixed("restore of \(directory) failed after CRIU restored PID \(rootPID); the restored tree was stopped")
        }
        let stats = CRIUStats.read(workDirectory + "/stats-restore")?.restore
        _ = try? FileSystem.makePrivate(tree: workDirectory)
        return Report(directory: directory, rootPID: rootPID, processes: manifest.processTree.processes.count, logFile: logPath,
                      timings: Timings(verify: verifySeconds, rebuild: rebuildSeconds, criu: criuSeconds,
                                       forking: Double(stats?.forkingTime ?? 0) / 1e6, restore: Double(stats?.restoreTime ?? 0) / 1e6,
                                       devices: deviceWatch.seconds, total: total.seconds))
    }

    /// A private directory for CRIU's images under `root`, after checking that `bytes` fit there.
    static func makeRebuildDirectory(in root: String, bytes: UInt64) throws -> String {
        var fs = statvfs()
        if statvfs(root, &fs) == 0 {
            let free = UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
            guard free >= bytes else {
                throw StasisError(.noSpace, "\(root) has \(Format.bytes(free)) free; rebuilding the memory images for CRIU needs \(Format.bytes(bytes))",
                                  hint: "free memory or space there, or rebuild elsewhere with --rebuild-dir")
            }
        }
        var template = Array("\(root)/stasis-rebuild-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw systemError("cannot create a directory in", root) }
        return String(cString: made)
    }

    /// The checkpoint's PIDs must be free. A PID whose process is exiting (a zombie, or one the init of a
    /// VM reaps slowly) is waited for briefly; a live one is refused with its command line.
    func waitForFreePIDs(_ tree: Manifest.ProcessTree) throws {
        for process in tree.processes where ProcFS.exists(process.pid) {
            let deadline = Stopwatch()
            while let stat = ProcFS.stat(process.pid), deadline.seconds < options.pidWaitSeconds {
                guard stat.state == "Z" || stat.state == "X" else { break }
                usleep(20_000)
            }
            if let stat = ProcFS.stat(process.pid) {
                let state = stat.state == "Z" ? "a zombie not yet reaped" : "'\(ProcFS.arguments(process.pid).joined(separator: " ").prefix(120))'"
                throw StasisError(.pidInUse, "restore refused: PID \(process.pid) (\(process.command) in the checkpoint) is in use by \(state)",
                                  hint: "restored processes keep their PIDs; stop PID \(process.pid) first (if it is the original, it may still be running: use --leave-running dumps only after it exits)")
            }
        }
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

    static func makeWorkDirectory() throws -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        formatter.locale = Locale(identifier: "en_US_POSIX")
        let path = "\(defaultWorkRoot)/\(formatter.string(from: Date()))-\(getpid())"
        try FileSystem.makePrivateDirectory(path)
        return path
    }
}

/// A byte count shared between hashing threads and a progress ticker.
final class ByteCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var total: UInt64 = 0
    func add(_ bytes: UInt64) { lock.withLock { total += bytes } }
    var value: UInt64 { lock.withLock { total } }
}
