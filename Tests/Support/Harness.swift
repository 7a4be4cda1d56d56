import Foundation
import Glibc
import StasisOS

/// Runs the built `stasis` and `stasis-workload` binaries as real processes, the way a user would.
public enum Harness {
    /// The build products directory: the test bundle lives in it.
    public static let productsDirectory: String = {
        if let explicit = ProcessInfo.processInfo.environment["STASIS_PRODUCTS"] { return explicit }
        var path = URL(fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? "")
        while path.path != "/" {
            path.deleteLastPathComponent()
            if FileManager.default.isExecutableFile(atPath: path.path + "/stasis") { return path.path }
        }
        return FileManager.default.currentDirectoryPath + "/.build/debug"
    }()

    public static var stasis: String { productsDirectory + "/stasis" }
    public static var workload: String { productsDirectory + "/stasis-workload" }
    /// The agent scripts/build-agent.sh builds (scripts/test.sh runs it).
    public static var agent: String {
        ProcessInfo.processInfo.environment["STASIS_AGENT_LIBRARY"] ?? FileManager.default.currentDirectoryPath + "/.build/agent/libstasis-agent.so"
    }

    public struct Result {
        public var status: Int32
        public var stdout: String
        public var stderr: String
        public var succeeded: Bool { status == 0 }
    }

    /// Runs a command to completion, with an optional environment change, and a timeout that kills it.
    @discardableResult
    public static func run(_ executable: String, _ arguments: [String], environment: [String: String?] = [:], timeout: Double = 120) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        var env = ProcessInfo.processInfo.environment
        for (key, value) in environment { env[key] = value }
        process.environment = env
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let outData = ReadAll(out.fileHandleForReading), errData = ReadAll(err.fileHandleForReading)
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning {
            if Date() > deadline { process.terminate(); kill(process.processIdentifier, SIGKILL) }
            usleep(10_000)
        }
        return Result(status: process.terminationStatus, stdout: outData.wait(), stderr: errData.wait())
    }

    /// Runs a command that leaves a daemon behind (podman's conmon): Foundation's Process learns that its
    /// child ended only when every copy of a socket it gives the child is closed, which the daemon keeps open;
    /// this starts it with Spawn (nothing but stdin, stdout and stderr inherited), output in files.
    public static func runLeavingDaemons(_ executable: String, _ arguments: [String], timeout: Double = 120) throws -> Result {
        let root = scratch("output")
        let null = try FileDescriptor.open("/dev/null", .readOnly)
        let out = try FileDescriptor.open(root + "/out", .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        let err = try FileDescriptor.open(root + "/err", .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        let pid = try Spawn.start(executable, arguments, descriptors: [null: 0, out: 1, err: 2])
        [null, out, err].forEach { $0.closeQuietly() }
        return collect(pid, timeout: timeout, outputIn: root)
    }

    /// Waits for child `pid` (killed once `timeout` has passed) whose stdout and stderr went to the files
    /// `out` and `err` in `root`; its exit status (128+signal when killed) and what it wrote.
    public static func collect(_ pid: pid_t, timeout: Double, outputIn root: String) -> Result {
        let deadline = Date().addingTimeInterval(timeout)
        var status: Int32 = 0
        while waitpid(pid, &status, WNOHANG) == 0 {
            if Date() > deadline { kill(pid, SIGKILL) }
            usleep(10_000)
        }
        let code = status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return Result(status: code, stdout: (try? String(contentsOfFile: root + "/out", encoding: .utf8)) ?? "",
                      stderr: (try? String(contentsOfFile: root + "/err", encoding: .utf8)) ?? "")
    }

    public static func stasis(_ arguments: String..., environment: [String: String?] = [:]) throws -> Result {
        try stasis(arguments, environment: environment)
    }

    /// Runs stasis with this run's chunk store (unless the test names another), never the machine's.
    public static func stasis(_ arguments: [String], environment: [String: String?] = [:]) throws -> Result {
        var environment = environment
        if environment["STASIS_STORE"] == nil { environment["STASIS_STORE"] = store }
        return try run(stasis, arguments, environment: environment)
    }

    /// The chunk store the tests' checkpoints go to.
    public static var store: String { scratchRoot + "/store" }

    /// This run's scratch root, /tmp/stasis-test-PID. Roots left by earlier runs (their PID gone) are removed
    /// first, so leftovers never outlive the next run.
    public static let scratchRoot: String = {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/tmp")) ?? []
        for name in names where name.hasPrefix("stasis-test-") {
            if let owner = Int32(name.dropFirst("stasis-test-".count)), !ProcFS.isLive(owner) {
                try? FileManager.default.removeItem(atPath: "/tmp/" + name)
            }
        }
        let root = "/tmp/stasis-test-\(getpid())"
        try? FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        return root
    }()

    /// A fresh scratch directory under this run's root.
    public static func scratch(_ name: String) -> String {
        let path = "\(scratchRoot)/\(name)-\(UInt32.random(in: 0...UInt32.max))"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    public static func waitGone(_ pid: Int32, timeout: Double = 10) -> Bool { ProcFS.waitGone(pid, timeout: timeout) }
}

/// Reads a pipe to its end on a background thread, so a chatty child cannot block on a full pipe.
// @unchecked Sendable: `data` is written by its thread before `done` is signalled and read only after.
public final class ReadAll: @unchecked Sendable {
    private var data = Data()
    private let done = DispatchSemaphore(value: 0)
    public init(_ handle: FileHandle) {
        Thread { [self] in
            data = handle.readDataToEndOfFile()
            // Closed here, not when the handle is released: Foundation keeps a finished Thread (and so what its
            // block holds) alive, and a suite of a few hundred runs then leaked past 1024 descriptors, where a
            // child's inherited descriptors are no longer all closed and a daemon kept a test's pipe open.
            try? handle.close()
            done.signal()
        }.start()
    }
    public func wait() -> String {
        done.wait()
        return String(decoding: data, as: UTF8.self)
    }
}

/// A running test workload: started detached, it verifies its own state when asked.
public final class Workload {
    public let mode: String
    public let directory: String
    public let pid: Int32

    /// With `underAgent`, started through `stasis run`, with the agent preloaded.
    public init(_ mode: String, _ extra: [String] = [], underAgent: Bool = false) throws {
        self.mode = mode
        directory = Harness.scratch("workload-\(mode)")
        let arguments = [mode, "--dir", directory, "--daemon"] + extra
        let result = underAgent
            ? try Harness.run(Harness.stasis, ["run", "--agent", Harness.agent, "--", Harness.workload] + arguments, timeout: 60)
            : try Harness.run(Harness.workload, arguments, timeout: 60)
        guard result.succeeded, let pid = Int32(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw WorkloadError(text: "stasis-workload \(mode) did not start: \(result.stderr)")
        }
        self.pid = pid
    }

    public struct WorkloadError: Error, CustomStringConvertible {
        public var text: String
        public init(text: String) { self.text = text }
        public var description: String { text }
    }

    public var isLive: Bool { ProcFS.isLive(pid) }

    /// Asks the workload to check itself and returns its verdict ("PASS ..." or "FAIL ...").
    public func verify(timeout: Double = 20) -> String {
        let result = directory + "/result"
        unlink(result)
        guard kill(pid, SIGUSR1) == 0 else { return "FAIL PID \(pid) is not running" }
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let text = try? String(contentsOfFile: result, encoding: .utf8) { return text.trimmingCharacters(in: .whitespacesAndNewlines) }
            usleep(20_000)
        }
        return "FAIL no result within \(timeout) s"
    }

    /// The tree's PIDs, root first.
    public var treePIDs: [Int32] { ProcFS.tree(root: pid).map(\.pid) }

    /// What the outside sees of the root's descriptors: fd number and kind ("pipe", "socket", or the path).
    /// Inode numbers are left out, as a restore creates new pipes and sockets.
    public var descriptorSignature: [String] {
        let fdDirectory = "/proc/\(pid)/fd"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: fdDirectory)) ?? []
        return names.compactMap { name -> String? in
            guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: fdDirectory + "/" + name) else { return nil }
            let kind = target.split(separator: ":").first.map(String.init) ?? target
            return "\(name)->\(target.hasPrefix("/") ? target : kind)"
        }.sorted()
    }

    public func stop() {
        for member in treePIDs.reversed() { kill(member, SIGKILL) }
        _ = Harness.waitGone(pid, timeout: 5)
        try? FileManager.default.removeItem(atPath: directory)
    }
}
