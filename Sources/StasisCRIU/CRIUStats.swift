import Foundation
import StasisCore
import StasisOS
import SwiftProtobuf

/// CRIU's own statistics files (stats-dump, stats-restore): a service magic, the stats magic, then one
/// length-prefixed stats_entry message.
public enum CRIUStats {
    static let serviceMagic: UInt32 = 0x5510_5940
    static let statsMagic: UInt32 = 0x5709_3306

    /// The statistics in `path`; nil when it is missing, unreadable or not a stats file: they only add
    /// timings to a manifest, and their absence (an older CRIU, a failed run) is no failure of stasis's.
    public static func read(_ path: String) -> stats_entry? {
        // Unreadable counts as absent (see above).
        guard let data = try? FileSystem.readFileIfPresent(path), data.count >= 12 else { return nil }
        func word(_ at: Int) -> UInt32 {
            data.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }
        }
        guard word(0) == serviceMagic, word(4) == statsMagic else { return nil }
        let length = Int(word(8))
        guard data.count >= 12 + length else { return nil }
        // A message CRIU did not write whole counts as absent, as above.
        return try? stats_entry(serializedBytes: data.subdata(in: 12..<(12 + length)))
    }
}
