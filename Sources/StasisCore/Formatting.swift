import Foundation

/// Human-readable sizes and durations for summaries. JSON output always carries the raw numbers.
public enum Format {
    /// A size as a person writes it: a whole number of bytes, or one with a binary unit (K, M, G, T, with or
    /// without "iB"/"B": "32G", "512MiB"); nil when it is not one or does not fit.
    public static func parseBytes(_ text: String) -> UInt64? {
        var digits = Substring(text.trimmingCharacters(in: .whitespaces))
        for suffix in ["iB", "B"] where digits.count > suffix.count && digits.uppercased().hasSuffix(suffix.uppercased()) {
            digits = digits.dropLast(suffix.count)
            break
        }
        let shifts: [Character: UInt64] = ["K": 10, "M": 20, "G": 30, "T": 40]
        var shift: UInt64 = 0
        if let last = digits.last?.uppercased().first, let found = shifts[last] {
            shift = found
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let value = UInt64(digits) else { return nil }
        let (result, overflow) = value.multipliedReportingOverflow(by: 1 << shift)
        return overflow ? nil : result
    }

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

    /// `text` with every character a terminal would act on written out instead: C0 controls (newline and
    /// tab included), DEL, C1 controls, and the bidirectional overrides and isolates that reorder what
    /// follows them. Names stasis prints come from manifests, archives, peers and the command line; one
    /// holding an escape sequence or an RTL override must not rewrite the screen or disguise itself.
    /// "\n", "\r" and "\t" as such, the others as "\u{1B}".
    public static func printable(_ text: String) -> String {
        guard text.unicodeScalars.contains(where: isHostile) else { return text }
        var escaped = ""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\n": escaped += "\\n"
            case "\r": escaped += "\\r"
            case "\t": escaped += "\\t"
            case _ where isHostile(scalar): escaped += "\\u{\(String(scalar.value, radix: 16, uppercase: true))}"
            default: escaped.unicodeScalars.append(scalar)
            }
        }
        return escaped
    }

    /// Whether a terminal would act on `scalar` rather than show it: a control character (C0, DEL, C1) or a
    /// bidirectional embedding, override or isolate (U+202A-U+202E, U+2066-U+2069).
    public static func isHostile(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.value {
        case 0x00...0x1F, 0x7F...0x9F, 0x202A...0x202E, 0x2066...0x2069: true
        default: false
        }
    }

    /// The first character of `text` that a terminal would act on, if any (see `printable`).
    public static func firstHostileCharacter(in text: String) -> Unicode.Scalar? {
        text.unicodeScalars.first(where: isHostile)
    }
}

/// A monotonic stopwatch (CLOCK_MONOTONIC through DispatchTime).
public struct Stopwatch: Sendable {
    private let start = DispatchTime.now().uptimeNanoseconds
    public init() {}
    public var seconds: Double { Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9 }
}
