import Foundation
import StasisCore
import StasisOS

/// The store's record of what running writers (dumps, imports, received migrations) are building outside it:
/// STORE/writers/PID.RANDOM lists the hidden `.NAME.partial-PID-*` directories of one writer, one per line. A
/// writer that publishes or discards its work removes its record; one that was killed leaves it, and
/// `stasis gc` removes what it lists once PID is gone: the partial directories of a dead dump can hold a
/// whole image, and nothing else knows where they are.
public final class StoreWriter: Sendable {
    let record: String

    /// Records `partials` (absolute paths) for this process; durable before it returns.
    public init(store: ChunkStore, partials: [String]) throws {
        let directory = store.path + "/writers"
        try FileSystem.makePrivateDirectory(directory)
        record = "\(directory)/\(ProcessInfo.processInfo.processIdentifier).\(UInt32.random(in: 0...UInt32.max))"
        try FileSystem.writeAtomically(Data(partials.map { $0 + "\n" }.joined().utf8), to: record)
    }

    /// The work is published or discarded: nothing is left to collect.
    public func release() { FileSystem.remove(record) }

    /// Removes the partial directories that dead writers recorded, and their records; returns how many
    /// directories went. Only a path whose last component is `.NAME.partial-PID-…` for the record's own dead
    /// PID is removed, whatever else a record says.
    static func collectDead(in store: ChunkStore, dryRun: Bool) -> Int {
        let directory = store.path + "/writers"
        var removed = 0
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] {
            let parts = name.split(separator: ".")
            guard parts.count == 2, let owner = Int32(parts[0]), owner > 0, !ProcFS.isLive(owner) else { continue }
            let text = (try? FileSystem.readFile(directory + "/" + name)).map { String(decoding: $0, as: UTF8.self) } ?? ""
            for path in text.split(separator: "\n").map(String.init) where isPartial(path, of: owner) && FileSystem.exists(path) {
                removed += 1
                if !dryRun { FileSystem.removeTree(path) }
            }
            if !dryRun { FileSystem.remove(directory + "/" + name) }
        }
        return removed
    }

    static func isPartial(_ path: String, of owner: Int32) -> Bool {
        guard path.hasPrefix("/"), !path.split(separator: "/").contains(".."), let last = path.split(separator: "/").last else { return false }
        return last.hasPrefix(".") && last.contains(".partial-\(owner)-")
    }
}
