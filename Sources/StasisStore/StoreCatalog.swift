import Foundation
import StasisCore
import StasisOS

/// The store's list of checkpoints (STORE/checkpoints/ID.json, each a copy of the checkpoint's manifest and
/// where it was written) and the operations over it: ls, rm, gc.
///
/// gc keeps every chunk that a listed manifest names, unless the entry is stale: its checkpoint directory is
/// gone (a dump killed between its listing and its publish, a directory deleted by hand instead of with
/// `stasis rm`); gc then drops the entry, saying so, and its chunks go like any unused ones. gc holds the
/// store's lock exclusively, so it waits for running dumps and imports (which hold it shared until their
/// manifest is listed, and their checkpoint published), and it spares chunks younger than its grace period.
public struct StoreCatalog {
    public struct Entry: Codable, Sendable {
        public var directory: String
        public var manifest: Manifest
    }

    public let store: ChunkStore

    public init(store: ChunkStore) { self.store = store }

    func entryPath(_ id: String) -> String { "\(store.path)/checkpoints/\(id).json" }

    /// Lists a checkpoint; durable (fsync) before it returns.
    public func register(_ manifest: Manifest, directory: String) throws {
        let data = try Manifest.encoder().encode(Entry(directory: directory, manifest: manifest))
        try FileSystem.writeAtomically(data, to: entryPath(manifest.id))
        try FileSystem.fsync(path: store.path + "/checkpoints")
    }

    public func unregister(id: String) { FileSystem.remove(entryPath(id)) }

    /// The listed checkpoint with this id, if any (an entry that does not parse counts as none).
    public func entry(id: String) -> Entry? {
        // Counts as none, as said above; `entries()` is the reader that reports a damaged list.
        guard let data = try? FileSystem.readFile(entryPath(id)), let entry = try? Manifest.decoder().decode(Entry.self, from: data),
              entry.manifest.problem() == nil else { return nil }
        return entry
    }

    /// Every listed checkpoint, oldest first. An entry that does not parse is reported as an error: gc must
    /// not run on a list it cannot read.
    public func entries() throws -> [Entry] {
        let directory = store.path + "/checkpoints"
        let names = try FileSystem.namesOrNone(in: directory)  // a store with no checkpoints yet has none
        var entries: [Entry] = []
        for name in names where name.hasSuffix(".json") {
            let path = directory + "/" + name
            do {
                let entry = try Manifest.decoder().decode(Entry.self, from: try FileSystem.readFile(path))
                try entry.manifest.validate(name: path)
                entries.append(entry)
            } catch {
                throw StasisError(.manifestInvalid, "\(path) in the store's checkpoint list does not parse",
                                  hint: "remove it by hand if that checkpoint is gone; gc will not run until then")
            }
        }
        return entries.sorted { $0.manifest.createdAt < $1.manifest.createdAt }
    }

    /// Whether `entry` names a checkpoint that is gone: its directory is an absolute path (not a rescue
    /// entry's description) where no manifest is, or where the manifest of another checkpoint is. A manifest
    /// that cannot be read or parsed is not taken for a missing one: that checkpoint stays listed.
    public static func isStale(_ entry: Entry) -> Bool {
        guard entry.directory.hasPrefix("/") else { return false }
        let manifestPath = entry.directory + "/" + Manifest.fileName
        let found: FileStatus?
        do {
            found = try FileSystem.status(manifestPath, followingLinks: false)
        } catch {
            return false  // it could not be looked at (permissions): not known to be gone
        }
        guard let status = found else { return true }
        // Unreadable or unparsable: not known to be gone (above), so false.
        guard status.kind == .regular, let data = try? FileSystem.readFile(manifestPath),
              let manifest = try? Manifest.decode(data, path: manifestPath) else { return false }  // as above
        return manifest.id != entry.manifest.id
    }

    // MARK: rm

    /// Removes the checkpoint in `directory` (or with that manifest id) from the list and deletes its directory.
    /// Its chunks go at the next gc.
    /// Holds the store's lock exclusively meanwhile: a restore, verify or export reading the checkpoint (they
    /// hold it shared) finishes first.
    public func remove(_ directoryOrID: String) throws -> Entry {
        let lock = try store.lock(exclusive: true)
        defer { lock.release() }
        let absolute = URL(fileURLWithPath: directoryOrID).standardizedFileURL.path
        guard let entry = try entries().first(where: { $0.directory == absolute || $0.manifest.id == directoryOrID }) else {
            throw StasisError(.notACheckpoint, "no checkpoint \(directoryOrID) in the store \(store.path)", hint: "`stasis ls` lists them")
        }
        if FileSystem.isDirectory(entry.directory) {
            // Only a directory holding this very checkpoint is deleted.
            let manifestPath = entry.directory + "/" + Manifest.fileName
            // A manifest that cannot be read does not prove it is this checkpoint's: the directory is kept.
            if let data = try? FileSystem.readFile(manifestPath), let found = try? Manifest.decode(data, path: manifestPath), found.id == entry.manifest.id {
                FileSystem.removeTree(entry.directory)
            }
        }
        unregister(id: entry.manifest.id)
        return entry
    }

    // MARK: gc

    public struct CollectReport: Codable, Sendable {
        public var checkpoints: Int
        public var keptChunks: Int
        public var removedChunks: Int
        public var removedBytes: UInt64
        /// Of the removed chunks, those given to the store's reserve as blanks (`ChunkReserve`) instead of deleted.
        public var reservedChunks: Int = 0
        /// Pieces of arenas whose program died (`ArenaPieces`), given back to the reserve as blanks.
        public var reclaimedArenaPieces: Int = 0
        public var removedTemporaryFiles: Int
        /// Hidden `.NAME.partial-PID-*` directories of dumps and imports that died before they finished.
        public var removedPartialDirectories: Int
        /// Hidden `.NAME.partial-PID-*` files of exports that died before they finished.
        public var removedPartialFiles: Int
        /// Records in writers/ of writers that are gone (leftovers of writing one included).
        public var removedWriterRecords: Int
        /// Stale entries dropped from the list (their directory is gone): their chunks went with the others.
        public var droppedCheckpoints: [DroppedCheckpoint]
        public var dryRun: Bool
    }

    public struct DroppedCheckpoint: Codable, Sendable, Equatable {
        public var id: String
        public var directory: String
    }

    /// Removes chunks no listed manifest names, leftovers in tmp/ of dead writers and the partials they
    /// recorded (`StoreWriter`), sparing chunks modified in the last `graceSeconds`; drops stale entries
    /// (`isStale`) first, so their chunks count as unused.
    public func collect(dryRun: Bool = false, graceSeconds: Double = 60) throws -> CollectReport {
        guard graceSeconds.isFinite, graceSeconds >= 0 else {
            throw StasisError(.invalidArgument, "the grace period \(graceSeconds) is not a number of seconds (0 or more)",
                              hint: "give --grace a number such as 60")
        }
        let lock = try store.lock(exclusive: true)
        defer { lock.release() }
        let listed = try entries()
        let stale = listed.filter(Self.isStale)
        let staleIDs = Set(stale.map(\.manifest.id))
        let kept = listed.filter { !staleIDs.contains($0.manifest.id) }
        var referenced = Set<String>()
        for entry in kept {
            for file in entry.manifest.files { for chunk in file.chunks ?? [] where !chunk.isEmpty { referenced.insert(chunk) } }
        }
        if !dryRun { for entry in stale { unregister(id: entry.manifest.id) } }
        var report = CollectReport(checkpoints: kept.count, keptChunks: 0, removedChunks: 0, removedBytes: 0, removedTemporaryFiles: 0,
                                   removedPartialDirectories: 0, removedPartialFiles: 0, removedWriterRecords: 0,
                                   droppedCheckpoints: stale.map { DroppedCheckpoint(id: $0.manifest.id, directory: $0.directory) },
                                   dryRun: dryRun)
        // A store in memory with a reserve takes removed chunk files as blanks, up to its target.
        let reserve = (store as? DirectoryChunkStore)?.reserve
        let reserveTarget = reserve?.targetBytes ?? 0
        // A reserve that cannot be listed counts as full: nothing is added to it.
        var reserveHeld = reserveTarget == 0 ? 0 : (try? reserve?.status().bytes ?? 0) ?? reserveTarget
        for name in store.allChunks() {
            if referenced.contains(name) {
                report.keptChunks += 1
                continue
            }
            let path = store.chunkFileName(name)  // gc is the directory store's: its chunk files
            guard let file = FileSystem.sizeAndAge(path), file.seconds >= graceSeconds else { report.keptChunks += 1; continue }
            report.removedChunks += 1
            report.removedBytes += file.size
            if dryRun { continue }
            if let reserve, reserve.recycle(path, target: reserveTarget, held: &reserveHeld) {
                report.reservedChunks += 1
            } else {
                FileSystem.remove(path)
            }
        }
        // tmp/NAME.PID.RANDOM: a writer that died left it; one still running keeps its own.
        let temporary = store.path + "/tmp"
        // Best effort, as the partials below: a leftover not seen now is removed by a later gc, and the
        // chunks gc exists for are already collected.
        for name in (try? FileSystem.namesOrNone(in: temporary)) ?? [] {
            let parts = name.split(separator: ".")
            guard parts.count == 3, let owner = Int32(parts[1]), !ProcFS.isLive(owner) else { continue }
            report.removedTemporaryFiles += 1
            if !dryRun { FileSystem.remove(temporary + "/" + name) }
        }
        if !dryRun, let reserve { report.reclaimedArenaPieces = reserve.reclaimDeadArenas() }
        let partials = StoreWriter.collectDead(in: store, dryRun: dryRun)
        report.removedPartialDirectories = partials.directories
        report.removedPartialFiles = partials.files
        report.removedWriterRecords = partials.records
        return report
    }

    /// Bytes of chunk files in the store, and how many.
    public func usage() -> (chunks: Int, bytes: UInt64) {
        let names = store.allChunks()
        return (names.count, names.reduce(0) { $0 + (store.storedSize($1) ?? 0) })
    }
}
