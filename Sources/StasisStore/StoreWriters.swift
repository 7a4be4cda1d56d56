import Foundation
import StasisCore
import StasisOS

/// The store's record of what running writers (dumps, imports, exports, received migrations) are building
/// outside it: STORE/writers/PID.START.RANDOM (START: when PID started, so that a reused PID is not taken for
/// the writer) lists one writer's hidden partials, one absolute path per line. A line may end in
/// `.partial-PID-*`: every sibling whose name starts so, for a file or directory whose random suffix is picked
/// only as it is created. The record is written (atomically, durably) before anything it lists exists, so a
/// writer killed at any instant leaves nothing gc cannot find. A writer that publishes or discards its work
/// removes its record; one that was killed leaves it, and `stasis gc` removes what it lists once the writer
/// is gone: the partials of a dead dump or export can be as big as a whole image, and nothing else knows
/// where they are.
public final class StoreWriter: Sendable {
    let record: String

    /// Records `partials` (absolute paths, or `.../.NAME.partial-PID-*` patterns) for this process; durable
    /// before it returns.
    public init(store: ChunkStore, partials: [String]) throws {
        let directory = store.path + "/writers"
        try FileSystem.makePrivateDirectory(directory)
        record = "\(directory)/\(Self.recordPrefix(.current))\(UInt32.random(in: 0...UInt32.max))"
        // A kill inside this write leaves RECORD.tmp-PID, which gc removes too (its PID is in its name).
        try FileSystem.writeAtomically(Data(partials.map { $0 + "\n" }.joined().utf8), to: record)
        try FileSystem.fsync(path: directory)
    }

    /// Records every hidden `.NAME.partial-PID-*` sibling this process makes of `destination` (a checkpoint
    /// directory or a file), before it makes any.
    public convenience init(store: ChunkStore, partialsOf destination: String) throws {
        try self.init(store: store, partials: [Self.partialPattern(of: destination, owner: ThisProcess.pid)])
    }

    /// The work is published or discarded: nothing is left to collect.
    public func release() { FileSystem.remove(record) }

    /// `PARENT/.NAME.partial-OWNER-*` for `destination`, made absolute as AtomicFile and staging directories
    /// name their partials.
    public static func partialPattern(of destination: String, owner: Int32) -> String {
        let url = URL(fileURLWithPath: destination).standardizedFileURL
        return "\(url.deletingLastPathComponent().path)/.\(url.lastPathComponent).partial-\(owner)-*"
    }

    static func recordPrefix(_ writer: ProcessIdentity) -> String {
        writer.startTime.map { "\(writer.pid).\($0)." } ?? "\(writer.pid)."
    }

    // MARK: gc

    /// What `collectDead` removed (or, in a dry run, would remove).
    public struct Collected: Sendable, Equatable {
        public var directories = 0
        public var files = 0
        public var records = 0
    }

    /// Removes the partials that dead writers recorded, and their records (leftovers of writing a record
    /// included). Only a path whose last component is `.NAME.partial-PID-…` for the record's own PID is
    /// removed, whatever else a record says; nothing of a writer that still runs is touched.
    static func collectDead(in store: ChunkStore, dryRun: Bool) -> Collected {
        let directory = store.path + "/writers"
        var collected = Collected()
        // Cleanup is best effort: a store whose writers/ cannot be listed keeps its leftovers until a later gc,
        // which is no reason to fail the gc (or dump) that tidies up on the way.
        for name in (try? FileSystem.namesOrNone(in: directory)) ?? [] {
            guard let writer = writer(ofRecordNamed: name), !writer.isLive else { continue }
            let path = directory + "/" + name
            if !name.contains(".tmp-") {
                // A record that cannot be read names nothing to remove; it is dropped all the same (best effort, above).
                let text = (try? FileSystem.readFile(path)).map { String(decoding: $0, as: UTF8.self) } ?? ""
                for line in text.split(separator: "\n").map(String.init) {
                    removePartials(named: line, of: writer.pid, dryRun: dryRun, into: &collected)
                }
            }
            collected.records += 1
            if !dryRun { FileSystem.remove(path) }
        }
        return collected
    }

    /// The writer a record's name gives: `PID.START.RANDOM`, `PID.RANDOM` (records written before start times
    /// were), either followed by `.tmp-PID` (a record whose writing was cut short). nil for any other name.
    static func writer(ofRecordNamed name: String) -> ProcessIdentity? {
        var base = Substring(name)
        if let range = name.range(of: ".tmp-") {
            guard let writer = Int32(name[range.upperBound...]), writer > 0 else { return nil }
            base = name[..<range.lowerBound]
        }
        let parts = base.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2 || parts.count == 3, let pid = Int32(parts[0]), pid > 0, UInt32(parts[parts.count - 1]) != nil else { return nil }
        guard parts.count == 3 else { return ProcessIdentity(pid: pid, startTime: nil) }
        guard let start = UInt64(parts[1]) else { return nil }
        return ProcessIdentity(pid: pid, startTime: start)
    }

    /// Removes what one line of a dead writer's record names: the path itself, or every sibling a pattern matches.
    private static func removePartials(named line: String, of owner: Int32, dryRun: Bool, into collected: inout Collected) {
        guard isPartial(line, of: owner) else { return }
        var paths = [line]
        if line.hasSuffix("*") {
            let parent = String(line[..<line.lastIndex(of: "/")!])
            let prefix = String(line[line.index(after: line.lastIndex(of: "/")!)...].dropLast())
            // The partial's directory may be gone or unreadable by now: then there is nothing to remove there.
            let names = (try? FileSystem.namesOrNone(in: parent.isEmpty ? "/" : parent)) ?? []
            paths = names.filter { $0.hasPrefix(prefix) }.map { parent + "/" + $0 }
        }
        for path in paths {
            // What cannot be examined is not removed.
            guard let status = try? FileSystem.status(path, followingLinks: false) else { continue }
            if status.kind == .directory {
                collected.directories += 1
                if !dryRun { FileSystem.removeTree(path) }
            } else {
                collected.files += 1
                if !dryRun { FileSystem.remove(path) }
            }
        }
    }

    /// Whether a record's line names a partial of `owner`: an absolute path without `..` whose last component
    /// is `.NAME.partial-OWNER-…` (a pattern: exactly `.NAME.partial-OWNER-*`).
    static func isPartial(_ path: String, of owner: Int32) -> Bool {
        guard path.hasPrefix("/"), !path.split(separator: "/").contains(".."), let last = path.split(separator: "/").last,
              last.hasPrefix("."), last.count > 1 else { return false }
        if last.contains("*") { return last.hasSuffix(".partial-\(owner)-*") && last.filter { $0 == "*" }.count == 1 }
        return last.contains(".partial-\(owner)-")
    }
}
