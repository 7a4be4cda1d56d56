import Foundation
import StasisCore

/// A process named so that a later process given the same PID is not taken for it: the PID and the time the
/// process started (/proc/PID/stat field 22, clock ticks since boot). What records of writers that may die
/// (`STORE/writers/`) name, so that gc removes what a dead writer left even when its PID was reused.
public struct ProcessIdentity: Sendable, Equatable {
    public var pid: Int32
    /// nil where it could not be read: then the PID alone decides (a reused PID counts as the writer).
    public var startTime: UInt64?

    public init(pid: Int32, startTime: UInt64?) {
        self.pid = pid
        self.startTime = startTime
    }

    /// This process.
    public static var current: ProcessIdentity { ProcessIdentity(pid: ThisProcess.pid, startTime: startTime(of: ThisProcess.pid)) }

    /// Whether this very process still runs: its PID is live (not a zombie) and, when known, started when it did.
    public var isLive: Bool {
        guard ProcFS.isLive(pid) else { return false }
        guard let startTime else { return true }
        // A process that ends between the two reads is gone either way.
        return Self.startTime(of: pid) == startTime
    }

    /// When `pid` started, in clock ticks since boot; nil for a process that is gone.
    public static func startTime(of pid: Int32) -> UInt64? { ProcFS.stat(pid)?.startTime }
}
