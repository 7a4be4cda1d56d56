import Foundation
import Glibc
import StasisOS

extension Harness {
    /// What a measured run used: its exit status and output, its peak resident memory (the kernel's
    /// ru_maxrss for the child, read by wait4) and its wall time.
    public struct Measured {
        public var status: Int32
        public var stdout: String
        public var stderr: String
        public var peakBytes: UInt64
        public var seconds: Double
        public var succeeded: Bool { status == 0 }
        public var peakMiB: Double { Double(peakBytes) / Double(1 << 20) }
    }

    /// Runs the built stasis with `arguments` to its end (killed after `timeout` seconds) and measures it:
    /// how bounded a reader is shows in the peak memory of the process that read, not in this one's.
    ///
    /// The kernel's ru_maxrss of a child counts the memory of the process it was spawned from (posix_spawn
    /// shares this process's memory until the exec, whose high-water mark the child inherits). So this
    /// process's high-water mark is reset first (/proc/self/clear_refs, 5) and read after: a child's
    /// ru_maxrss above it is the child's own peak. Otherwise the child's peak is at most that, and the
    /// highest VmHWM sampled from its /proc/PID/status while it ran is given (its own, and a lower bound).
    public static func measuredStasis(_ arguments: [String], timeout: Double = 60) throws -> Measured {
        let root = scratch("measured")
        let null = try FileDescriptor.open("/dev/null", .readOnly)
        let out = try FileDescriptor.open(root + "/out", .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        let err = try FileDescriptor.open(root + "/err", .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        var environment = ProcessInfo.processInfo.environment
        environment["STASIS_STORE"] = environment["STASIS_STORE"] ?? store
        try? "5".write(toFile: "/proc/self/clear_refs", atomically: false, encoding: .utf8)
        let started = Date()
        let pid = try Spawn.start(stasis, arguments, descriptors: [null: 0, out: 1, err: 2], environment: environment)
        [null, out, err].forEach { $0.closeQuietly() }
        let deadline = started.addingTimeInterval(timeout)
        var status: Int32 = 0
        var usage = rusage()
        var sampled: UInt64 = 0
        while true {
            sampled = max(sampled, highWaterMark(of: "/proc/\(pid)/status") ?? 0)
            let reaped = wait4(pid, &status, WNOHANG, &usage)
            if reaped == pid || (reaped < 0 && errno != EINTR) { break }
            if Date() > deadline { kill(pid, SIGKILL) }
            usleep(1_000)
        }
        let seconds = Date().timeIntervalSince(started)
        let ours = highWaterMark(of: "/proc/self/status") ?? UInt64.max
        let reported = UInt64(usage.ru_maxrss) * 1024
        let code = status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return Measured(status: code, stdout: (try? String(contentsOfFile: root + "/out", encoding: .utf8)) ?? "",
                        stderr: (try? String(contentsOfFile: root + "/err", encoding: .utf8)) ?? "",
                        peakBytes: reported > ours || sampled == 0 ? reported : min(reported, sampled), seconds: seconds)
    }

    /// VmHWM of a /proc/PID/status, in bytes; nil once the process is gone (or its memory released).
    static func highWaterMark(of status: String) -> UInt64? {
        guard let text = try? String(contentsOfFile: status, encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }) else { return nil }
        return line.split(separator: " ").dropFirst().first.flatMap { UInt64($0) }.map { $0 * 1024 }
    }
}
