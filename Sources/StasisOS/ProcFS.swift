import Foundation
import Glibc
import StasisCore

/// What /proc tells about processes. Reads are racy by nature (a process may exit between two reads), so
/// every reader returns nil for a process that vanished instead of throwing.
public enum ProcFS {
    public struct Stat: Sendable {
        public var pid: Int32
        public var command: String
        /// R, S, D, Z, T, ...
        public var state: Character
        public var ppid: Int32
        /// Its process group and session (fields 5 and 6).
        public var pgrp: Int32 = 0
        public var session: Int32 = 0
        /// The kernel's PF_* flags.
        public var flags: UInt32
        /// When it started, in clock ticks since boot (field 22): with the PID, what names this very process.
        public var startTime: UInt64?
        /// A kernel thread (PF_KTHREAD): no user memory, nothing CRIU can dump.
        public var isKernelThread: Bool { flags & 0x0020_0000 != 0 }
    }

    /// Parses /proc/PID/stat. The command sits in parentheses and may itself contain ") ", so the fields
    /// after it are taken from the last ')'.
    public static func stat(_ pid: Int32) -> Stat? {
        guard let text = text("/proc/\(pid)/stat"),
              let open = text.firstIndex(of: "("), let close = text.lastIndex(of: ")") else { return nil }
        let command = String(text[text.index(after: open)..<close])
        let rest = text[text.index(close, offsetBy: 2)...].split(separator: " ")
        guard rest.count > 6, let state = rest[0].first, let ppid = Int32(rest[1]) else { return nil }
        return Stat(pid: pid, command: command, state: state, ppid: ppid, pgrp: Int32(rest[2]) ?? 0, session: Int32(rest[3]) ?? 0,
                    flags: UInt32(rest[6]) ?? 0, startTime: rest.count > 19 ? UInt64(rest[19]) : nil)
    }

    /// The state letter of each thread of `pid` (/proc/PID/task/TID/stat); empty when it is gone.
    public static func threadStates(_ pid: Int32) -> [Character] {
        // Unreadable: the process is gone, which the empty answer says.
        let tids = ((try? FileSystem.namesOrNone(in: "/proc/\(pid)/task")) ?? []).compactMap { Int32($0) }
        return tids.compactMap { tid in
            guard let text = text("/proc/\(pid)/task/\(tid)/stat"), let close = text.lastIndex(of: ")") else { return nil }
            return text[text.index(close, offsetBy: 2)...].first
        }
    }

    /// A /proc file's text. Decoded leniently: file names in maps and commands in stat may hold bytes that
    /// are not UTF-8 (a PyTorch rank's maps did), which must not make the whole file unreadable. nil when it
    /// cannot be read: the process ended (or is another user's), which callers take as "no such process".
    public static func text(_ path: String) -> String? {
        guard let data = try? FileSystem.readFile(path) else { return nil }  // gone or not ours: nil (above)
        return String(decoding: data, as: UTF8.self)
    }

    /// True while /proc/PID exists, zombies included.
    public static func exists(_ pid: Int32) -> Bool {
        access("/proc/\(pid)", F_OK) == 0
    }

    /// True for a process that runs (or sleeps): not missing and not a zombie.
    public static func isLive(_ pid: Int32) -> Bool {
        guard let stat = stat(pid) else { return false }
        return stat.state != "Z" && stat.state != "X"
    }

    /// The process's open descriptors, in order (empty when they cannot be read: the process ended, or it is
    /// another user's, which is how every caller means it).
    public static func descriptors(_ pid: Int32) -> [Int32] {
        ((try? FileSystem.namesOrNone(in: "/proc/\(pid)/fd")) ?? []).compactMap { Int32($0) }.sorted()  // unreadable: none (above)
    }

    /// What each of the process's descriptors points at ("/dev/nvidia0", "socket:[4242]", "pipe:[17]", ...).
    public static func descriptorTargets(_ pid: Int32) -> [String] {
        // A descriptor closed since it was listed has no target, and is no longer the process's.
        descriptors(pid).compactMap { try? FileSystem.symlinkTarget("/proc/\(pid)/fd/\($0)") }
    }

    /// The process's environment as it was at exec ("NAME=value" each).
    public static func environment(_ pid: Int32) -> [String] {
        // A process that ended, or one not ours to read, has none to give (as `arguments`).
        ((try? FileSystem.readFile("/proc/\(pid)/environ")) ?? Data()).split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
    }

    public static func arguments(_ pid: Int32) -> [String] {
        // A process that ended (or a kernel thread) has no arguments to give.
        guard let data = try? FileSystem.readFile("/proc/\(pid)/cmdline") else { return [] }
        return data.split(separator: 0, omittingEmptySubsequences: true).map { String(decoding: $0, as: UTF8.self) }
    }

    /// Fields of /proc/PID/status as raw strings ("VmRSS" -> "1234 kB").
    public static func status(_ pid: Int32) -> [String: String] {
        guard let text = text("/proc/\(pid)/status") else { return [:] }
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return fields
    }

    /// A "1234 kB" status value in bytes.
    /// The PID `pid` has in its own PID namespace (the last NSpid entry: inside a container, not the PID
    /// here), or nil when /proc does not say.
    public static func namespacePID(_ pid: Int32) -> Int32? {
        (text("/proc/\(pid)/status"))?
            .split(separator: "\n").first { $0.hasPrefix("NSpid:") }?
            .split(whereSeparator: { $0 == " " || $0 == "\t" }).last.flatMap { Int32($0) }
    }

    public static func kilobytes(_ value: String?) -> UInt64 {
        guard let value, let number = UInt64(value.split(separator: " ").first ?? "") else { return 0 }
        return number * 1024
    }

    /// One line of /proc/PID/maps: the range and the mapped file's path ("" for anonymous memory).
    public struct Mapping: Sendable, Equatable {
        public var start: UInt64
        public var end: UInt64
        public var path: String
        /// Mapped MAP_SHARED (the permissions' "s").
        public var shared = false
        /// Where in the file the mapping starts.
        public var fileOffset: UInt64 = 0
        public var bytes: UInt64 { end - start }
        public init(start: UInt64, end: UInt64, path: String, shared: Bool = false, fileOffset: UInt64 = 0) {
            self.start = start
            self.end = end
            self.path = path
            self.shared = shared
            self.fileOffset = fileOffset
        }
    }

    public static func mappings(_ pid: Int32) -> [Mapping] {
        guard let text = text("/proc/\(pid)/maps") else { return [] }
        return parseMappings(text)
    }

    public static func parseMappings(_ text: String) -> [Mapping] {
        text.split(separator: "\n").compactMap { line in
            // start-end perms offset dev inode [path]; the path may hold spaces.
            let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
            guard fields.count >= 5 else { return nil }
            let range = fields[0].split(separator: "-")
            guard range.count == 2, let start = UInt64(range[0], radix: 16), let end = UInt64(range[1], radix: 16) else { return nil }
            let path = fields.count == 6 ? fields[5].trimmingCharacters(in: .whitespaces) : ""
            return Mapping(start: start, end: end, path: path, shared: fields[1].hasSuffix("s"), fileOffset: UInt64(fields[2], radix: 16) ?? 0)
        }
    }

    public static func allPIDs() -> [Int32] {
        // /proc is always there on Linux; without it there are no processes stasis could find anyway.
        guard let names = try? FileSystem.names(in: "/proc") else { return [] }
        return names.compactMap { Int32($0) }
    }

    /// The tree rooted at `root`, root first then breadth-first, from one scan of every process's parent.
    public static func tree(root: Int32) -> [Stat] {
        guard let rootStat = stat(root) else { return [] }
        var children: [Int32: [Stat]] = [:]
        for pid in allPIDs() where pid != root {
            // Threads do not appear in /proc's listing, so each entry is a process.
            if let entry = stat(pid) { children[entry.ppid, default: []].append(entry) }
        }
        var ordered = [rootStat]
        var index = 0
        while index < ordered.count {
            ordered += (children[ordered[index].pid] ?? []).sorted { $0.pid < $1.pid }
            index += 1
        }
        return ordered
    }

    /// Waits until /proc/PID is gone (the process exited and was reaped), up to `timeout` seconds.
    public static func waitGone(_ pid: Int32, timeout: Double) -> Bool {
        let watch = Stopwatch()
        while exists(pid) {
            if watch.seconds > timeout { return false }
            usleep(20_000)
        }
        return true
    }
}
