import CStasisCompress
import Foundation
import StasisCore

/// How chunks are compressed. Chosen per checkpoint (`--compress`); every chunk records its own codec, so a
/// store holds chunks of any mix, and a chunk that does not shrink is stored plain.
public enum Codec: Sendable, Equatable, CustomStringConvertible {
    case none
    case lz4
    case zstd(level: Int32)

    /// The default: lz4, the fastest to ingest (bench/store-throughput.sh, 2 cores: 1.26 GB/s on a Python
    /// process's images against 0.95 for zstd:1), because chunking competes with the job's frozen window.
    /// zstd:1 stores about a quarter less on those images at the same rebuild speed: `--compress zstd:1`
    /// when space matters more than dump time. Rechecked on a BERT-large checkpoint on 16 cores: zstd:1
    /// stores 8.5% less for twice the CPU, and ingest at 5 GB/s is CPU-bound there (docs/BENCHMARKS.md).
    public static let standard = Codec.lz4

    /// Parses `none`, `lz4`, `zstd` (level 3) or `zstd:N` (1...19).
    public init(parsing text: String) throws {
        let parts = text.split(separator: ":", maxSplits: 1).map(String.init)
        switch (parts.first ?? "", parts.count) {
        case ("none", 1): self = .none
        case ("lz4", 1): self = .lz4
        case ("zstd", 1): self = .zstd(level: 3)
        case ("zstd", 2):
            guard let level = Int32(parts[1]), (1...19).contains(level) else {
                throw StasisError(.invalidArgument, "zstd level '\(parts[1])' is not between 1 and 19")
            }
            self = .zstd(level: level)
        default:
            throw StasisError(.invalidArgument, "unknown compression '\(text)'", hint: "use lz4, zstd, zstd:LEVEL (1-19) or none")
        }
    }

    public var description: String {
        switch self {
        case .none: return "none"
        case .lz4: return "lz4"
        case .zstd(let level): return "zstd:\(level)"
        }
    }

    /// The codec's number in a chunk's header.
    var tag: UInt8 {
        switch self {
        case .none: return 0
        case .lz4: return 1
        case .zstd: return 2
        }
    }

    var level: Int32 {
        if case .zstd(let level) = self { return level }
        return 0
    }

    /// The part of a chunk tried first when probing: when it does not shrink by a sixteenth, the chunk is
    /// stored plain without compressing the rest. Device memory (fp32/bf16 weights, optimizer state) barely
    /// compresses, and compressing it whole cost more CPU than hashing it: with the probe the agent's
    /// evacuation of BERT-large went from 7.2 to 10.8 GB/s. CRIU's images are not probed (their first 64 KiB
    /// says little about the rest).
    static let probeBytes = 64 << 10

    /// Compresses `plain` into `output` (which must hold `bound(plain.count)` bytes); nil when the codec
    /// fails, the probe (with `probe`) says it would not pay, or the result would not be smaller: the chunk is
    /// stored plain.
    func compress(_ plain: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer, probe: Bool = false) -> Int? {
        guard tag != 0, !plain.isEmpty else { return nil }
        if probe, plain.count >= 4 * Self.probeBytes {
            let tried = stasis_compress(Int32(tag), level, plain.baseAddress, Self.probeBytes, output.baseAddress, output.count)
            guard tried > 0, tried <= Self.probeBytes - Self.probeBytes / 16 else { return nil }
        }
        let written = stasis_compress(Int32(tag), level, plain.baseAddress, plain.count, output.baseAddress, output.count)
        return written > 0 && written < plain.count ? written : nil
    }

    func bound(_ size: Int) -> Int { tag == 0 ? size : max(size, stasis_compress_bound(Int32(tag), size)) }

    /// Decompresses a payload stored with codec `tag` into exactly `output.count` bytes.
    static func decompress(tag: UInt8, _ payload: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        if tag == 0 {
            guard payload.count == output.count else { return false }
            if let base = payload.baseAddress, let target = output.baseAddress { target.copyMemory(from: base, byteCount: payload.count) }
            return true
        }
        guard tag == 1 || tag == 2 else { return false }
        return stasis_decompress(Int32(tag), payload.baseAddress, payload.count, output.baseAddress, output.count) == 0
    }

    static func name(tag: UInt8) -> String {
        switch tag {
        case 0: return "none"
        case 1: return "lz4"
        case 2: return "zstd"
        default: return "unknown(\(tag))"
        }
    }
}
