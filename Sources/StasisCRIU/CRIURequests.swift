import Foundation
import StasisCore
import StasisOS

/// The requests stasis sends, built in one place so dump and restore agree on the options they share.
extension CRIUService {
    public struct ProcessOptions: Sendable {
        public var tcpEstablished = false
        public var shellJob = false
        public var logLevel: Int32 = 4
        /// The largest deleted file that is still open or mapped (a "ghost": NCCL's and PyTorch's shared
        /// memory segments in /dev/shm are unlinked at once) that the dump carries. CRIU's own default,
        /// 1 MiB, refuses NCCL's 32 MiB segments.
        public var ghostLimitBytes: UInt32 = Self.defaultGhostLimitBytes
        public static let defaultGhostLimitBytes: UInt32 = 1 << 30
        /// A restore leaves the tree stopped (SIGSTOP, CRIU's --leave-stopped): a prepared restore.
        public var leaveStopped = false
        public init(tcpEstablished: Bool = false, shellJob: Bool = false, logLevel: Int32 = 4, ghostLimitBytes: UInt32 = Self.defaultGhostLimitBytes) {
            self.tcpEstablished = tcpEstablished
            self.shellJob = shellJob
            self.logLevel = logLevel
            self.ghostLimitBytes = ghostLimitBytes
        }
    }

    public static let dumpLogName = "criu-dump.log"
    public static let restoreLogName = "criu-restore.log"

    /// How CRIU locks the network around established TCP connections: iptables when the binary exists,
    /// else nftables through CRIU's built-in libnftables (no binary needed).
    static func networkLock() -> criu_network_lock_method {
        Spawn.which("iptables") != nil || Spawn.which("iptables-legacy") != nil ? .iptables : .nftables
    }

    static func baseOptions(_ options: ProcessOptions, imagesDirectoryFD: FileDescriptor, logFile: String) -> criu_opts {
        var opts = criu_opts()
        opts.imagesDirFd = imagesDirectoryFD.rawValue
        opts.logFile = logFile
        opts.logLevel = options.logLevel
        opts.shellJob = options.shellJob
        opts.notifyScripts = true
        opts.ghostLimit = options.ghostLimitBytes
        if options.tcpEstablished {
            opts.tcpEstablished = true
            opts.networkLock = networkLock()
        }
        return opts
    }

    /// Dumps the tree rooted at `pid` into the directory open as `imagesDirectory`; CRIU's log and statistics
    /// go to `workDirectory` (it writes them after its post-dump step, when the images may be published).
    /// With `pageServer` (the CRIU end of a `CRIUPageServer`, closed here), CRIU sends the memory pages there
    /// instead of writing pages-*.img and pagemap-*.img.
    public func dump(pid: Int32, imagesDirectory: FileDescriptor, workDirectory: FileDescriptor, options: ProcessOptions, leaveRunning: Bool,
                     pageServer: FileDescriptor? = nil, onNotify: (Notification) throws -> Void) throws -> CRIUOutcome {
        var request = criu_req()
        request.type = .dump
        request.opts = Self.baseOptions(options, imagesDirectoryFD: imagesDirectory, logFile: Self.dumpLogName)
        request.opts.workDirFd = workDirectory.rawValue
        request.opts.pid = pid
        // Files deleted but still linked under another name, as glibc's sem_open leaves its temporary name
        // mapped (Python multiprocessing's locks and queues, PyTorch's DataLoader, vLLM): CRIU dumps them only
        // through a hard link it makes beside them ("link_remap.N"), which the restore (or, with
        // --leave-running, the dump itself) removes again.
        request.opts.linkRemap = true
        request.opts.leaveRunning = leaveRunning
        var handing: [FileDescriptor: Int32] = [:]
        if let pageServer {
            request.opts.ps.fd = Self.pageServerDescriptor
            handing[pageServer] = Self.pageServerDescriptor
        }
        return CRIUOutcome(try call(request, handing: handing, onNotify: onNotify))
    }

    /// The number CRIU's end of the page server's socket has in `criu swrk` (after its RPC socket, 3).
    static let pageServerDescriptor: Int32 = 4

    /// Restores from `imagesDirectory`; CRIU's log and statistics go to `workDirectory`.
    public func restore(imagesDirectory: FileDescriptor, workDirectory: FileDescriptor, options: ProcessOptions,
                        onNotify: (Notification) throws -> Void) throws -> CRIUOutcome {
        var request = criu_req()
        request.type = .restore
        request.opts = Self.baseOptions(options, imagesDirectoryFD: imagesDirectory, logFile: Self.restoreLogName)
        request.opts.workDirFd = workDirectory.rawValue
        if options.leaveStopped { request.opts.leaveStopped = true }
        return CRIUOutcome(try call(request, onNotify: onNotify))
    }

    /// Restores with `--stream`, reading every image from the `CRIUImageServer` listening in
    /// `imagesDirectory`, through CRIU's command line: CRIU 4.2.1 cannot stream under RPC (its service opens
    /// the images directory with no mode, and `--stream` set through `config_file` makes `criu swrk` abort
    /// in `socket_name_for_mode`). Detached, as RPC restores are; the same options as `restore` (the
    /// arguments spell out what `baseOptions` sets). Returns the response the RPC would have given: success,
    /// and the root PID as CRIU reports it (`--pidfile`). CRIU leaves the tasks of a failed restore (the
    /// checkpoint's `pids`) unreaped; stasis adopts and reaps them, so that no zombie holds a PID the next
    /// attempt needs.
    public func restoreStreaming(imagesDirectory: String, workDirectory: String, options: ProcessOptions, pids: [Int32]) throws -> CRIUOutcome {
        let pidFile = workDirectory + "/restored.pid"
        FileSystem.remove(pidFile)
        var arguments = ["restore", "--stream", "-D", imagesDirectory, "-W", workDirectory, "-o", Self.restoreLogName,
                         "-v\(options.logLevel)", "-d", "--pidfile", pidFile]
        if options.shellJob { arguments.append("--shell-job") }
        if options.tcpEstablished {
            arguments += ["--tcp-established", "--network-lock", Self.networkLock() == .iptables ? "iptables" : "nftables"]
        }
        if options.leaveStopped { arguments.append("--leave-stopped") }
        Spawn.adoptOrphans(true)
        defer { Spawn.adoptOrphans(false) }
        let status = Spawn.wait(try start(arguments))
        if status != 0 { Spawn.reap(pids) }
        // No PID file, or an unreadable one, is reported below as no root PID reported.
        let reported = (try? FileSystem.readFile(pidFile)).flatMap { Int32(String(decoding: $0, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)) }
        if status == 0, let reported, reported > 1 { return CRIUOutcome(succeeded: true, rootPID: reported, problem: "") }
        return CRIUOutcome(succeeded: false, rootPID: nil,
                           problem: status == 0 ? "criu restore --stream did not report the restored root PID in \(pidFile)"
                               : "criu restore --stream exited with status \(status)")
    }

    /// CRIU's own "criu check": whether this kernel supports what a dump needs. The log goes to `workDirectory`.
    public func check(workDirectory: FileDescriptor) throws -> CRIUOutcome {
        var request = criu_req()
        request.type = .check
        request.opts = Self.baseOptions(ProcessOptions(), imagesDirectoryFD: workDirectory, logFile: "criu-check.log")
        return CRIUOutcome(try call(request))
    }

    /// Optional kernel features CRIU found.
    public struct Features: Sendable {
        public var memoryTracking: Bool
        public var lazyPages: Bool
        public var pidfdStore: Bool
    }

    public func features() throws -> Features {
        var request = criu_req()
        request.type = .featureCheck
        request.features.memTrack = true
        request.features.lazyPages = true
        request.features.pidfdStore = true
        let features = try call(request).features
        return Features(memoryTracking: features.memTrack, lazyPages: features.lazyPages, pidfdStore: features.pidfdStore)
    }

    /// Describes a failed response: errno and message when CRIU gives them.
    /// CRIU's cr_errmsg is its *first* error, which can be a harmless one; the log excerpt says more.
    static func describe(_ response: criu_resp) -> String {
        var parts: [String] = []
        if response.hasCrErrmsg, !response.crErrmsg.isEmpty, !CRIULog.harmless.contains(where: response.crErrmsg.contains) {
            parts.append(response.crErrmsg.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        if response.hasCrErrno, response.crErrno != 0 { parts.append("errno \(response.crErrno): \(Errno(rawValue: response.crErrno).description)") }
        return parts.isEmpty ? "CRIU reported failure" : parts.joined(separator: "; ")
    }
}

/// What CRIU answered a request, as the engine uses it: the RPC's protobuf types stay inside StasisCRIU.
public struct CRIUOutcome: Sendable {
    public var succeeded: Bool
    /// The restored tree's root as CRIU reports it, after a successful restore.
    public var rootPID: Int32?
    /// CRIU's own words for a failure (its first error message and errno), for messages.
    public var problem: String

    public init(succeeded: Bool, rootPID: Int32?, problem: String) {
        (self.succeeded, self.rootPID, self.problem) = (succeeded, rootPID, problem)
    }

    init(_ response: criu_resp) {
        succeeded = response.success
        rootPID = response.success && response.type == .restore ? response.restore.pid : nil
        problem = response.success ? "" : CRIUService.describe(response)
    }

    /// The failure as an error: `what` failed, with the relevant lines of CRIU's log at `log` quoted and, for
    /// what CRIU explains there, stasis's next step (`CRIULog.advice`); a full filesystem gets its own code
    /// and hint.
    public func failure(_ what: String, log: String) -> StasisError {
        let (excerpt, advice) = CRIULog.explain(path: log)
        if excerpt.contains(where: { $0.contains("No space left on device") }) {
            return StasisError(.noSpace, "\(what): the filesystem ran out of space", hint: "free space there or write the checkpoint elsewhere",
                               logExcerpt: excerpt, logPath: log)
        }
        return StasisError(.criuFailed, "\(what): \(problem)", hint: advice, logExcerpt: excerpt, logPath: log)
    }
}
