import Foundation
import Glibc
import StasisCore

public enum StasisVersion {
    public static let current = "0.1.0"
}

/// Progress of a long phase, for a terminal display. Byte counts only; JSON output never sees these.
public struct Progress: Sendable {
    public var phase: String
    public var bytes: UInt64
    public var totalBytes: UInt64?
}

public typealias ProgressHandler = @Sendable (Progress) -> Void

/// Calls `report` every `interval` seconds on its own thread until stopped.
final class ProgressTicker: @unchecked Sendable {
    private let lock = NSLock()
    private var running = true
    private let done = DispatchSemaphore(value: 0)

    init?(interval: Double = 0.5, _ report: (@Sendable () -> Void)?) {
        guard let report else { return nil }
        let thread = Thread { [self] in
            while lock.withLock({ running }) {
                usleep(useconds_t(interval * 1_000_000))
                if lock.withLock({ running }) { report() }
            }
            done.signal()
        }
        thread.start()
    }

    func stop() {
        lock.withLock { running = false }
        done.wait()
    }
}

/// Switches for reaching failure paths in tests: STASIS_FAULT=point[,point...]. Each named point throws
/// where `FaultInjection.check` is called with it. Points: "post-dump" (inside CRIU's post-dump step, while
/// the tree is frozen), "publish" (the same step, after the images were hashed and synced, before the
/// manifest is written), "after-restore" (after CRIU restored the tree, before it is handed over).
/// `point`-kill kills stasis there instead (`die`): "post-dump" (the tree frozen, nothing published),
/// "published" (inside post-dump, just after the rename), "criu-exited", "manifest-rewritten" and "log-moved"
/// (the steps after CRIU's exit, in that order).
public enum FaultInjection {
    static func check(_ point: String) throws {
        let points = (ProcessInfo.processInfo.environment["STASIS_FAULT"] ?? "").split(separator: ",")
        if points.contains(Substring(point)) {
            throw StasisError(.interrupted, "fault injected at \(point) (STASIS_FAULT)")
        }
    }

    /// Kills this process (SIGKILL, nothing runs after it) when STASIS_FAULT names `point`-kill: how tests
    /// reach "stasis died right here" at a step no outside timing could hit reliably.
    static func die(_ point: String) {
        let points = (ProcessInfo.processInfo.environment["STASIS_FAULT"] ?? "").split(separator: ",")
        guard points.contains(Substring(point + "-kill")) else { return }
        kill(getpid(), SIGKILL)
    }

    /// Stops here for good when STASIS_FAULT names `point`-stall, saying so first: how tests kill a
    /// process at a known step (a receiver in the middle of a migration).
    static func stall(_ point: String, say: (String) -> Void) {
        let points = (ProcessInfo.processInfo.environment["STASIS_FAULT"] ?? "").split(separator: ",")
        guard points.contains(Substring(point + "-stall")) else { return }
        say("stalled at \(point) (STASIS_FAULT)")
        while true { sleep(60) }
    }
}
