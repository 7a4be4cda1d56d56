import Foundation

/// Human-readable sizes and durations for summaries. JSON output always carries the raw numbers.
public enum Format {
    public static func bytes(_ value: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var amount = Double(value)
        var unit = 0
        while amount >= 1024, unit < units.count - 1 {
            amount /= 1024
            unit += 1
        }
        return unit == 0 ? "\(value) B" : String(format: "%.2f %@", amount, units[unit])
    }

    public static func seconds(_ value: Double) -> String {
        value < 1 ? String(format: "%.0f ms", value * 1000) : String(format: "%.2f s", value)
    }

    /// Bytes per second as GB/s (decimal, as link and disk speeds are quoted).
    public static func throughput(bytes: UInt64, seconds: Double) -> String {
        guard seconds > 0 else { return "-" }
        return String(format: "%.2f GB/s", Double(bytes) / seconds / 1e9)
    }
}

/// A monotonic stopwatch (CLOCK_MONOTONIC through DispatchTime).
public struct Stopwatch: Sendable {
    private let start = DispatchTime.now().uptimeNanoseconds
    public init() {}
    public var seconds: Double { Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9 }
}
