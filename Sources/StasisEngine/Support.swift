import Foundation
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

extension ProgressTicker {
    /// Reports `phase` with the bytes `count` says so far, against `total`, until stopped; nil without `progress`.
    static func reporting(_ progress: ProgressHandler?, phase: String, total: UInt64? = nil,
                          _ count: @escaping @Sendable () -> UInt64) -> ProgressTicker? {
        ProgressTicker(progress.map { report in
            { @Sendable in report(Progress(phase: phase, bytes: count(), totalBytes: total)) }
        })
    }
}

/// Calls `report` every `interval` seconds on its own thread until stopped.
// @unchecked Sendable: `running` is reached only under its lock; the rest is set once.
final class ProgressTicker: @unchecked Sendable {
    private let lock = NSLock()
    private var running = true
    private let done = DispatchSemaphore(value: 0)

    init?(interval: Double = 0.5, _ report: (@Sendable () -> Void)?) {
        guard let report else { return nil }
        let thread = Thread { [self] in
            while lock.withLock({ running }) {
                Thread.sleep(forTimeInterval: interval)
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
