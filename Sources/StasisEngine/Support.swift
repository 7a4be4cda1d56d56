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
final class ProgressTicker: Sendable {
    private let running = Locked(true)
    private let done = DispatchSemaphore(value: 0)

    init?(interval: Double = 0.5, _ report: (@Sendable () -> Void)?) {
        guard let report else { return nil }
        let thread = Thread { [self] in
            while running.current {
                Thread.sleep(forTimeInterval: interval)
                if running.current { report() }
            }
            done.signal()
        }
        thread.start()
    }

    func stop() {
        running.withLock { $0 = false }
        done.wait()
    }
}
