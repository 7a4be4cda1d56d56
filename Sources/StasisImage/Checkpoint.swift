import Foundation
import StasisCore
import StasisOS
import StasisStore

/// Reading a published checkpoint directory: its manifest and the integrity of its files.
public enum Checkpoint {
    /// Reads and validates DIR/manifest.json with an error for each way it can be wrong. The directory must
    /// be this user's and not writable by others: its files are about to be trusted once they match.
    public static func readManifest(_ directory: String) throws -> Manifest {
        switch try FileSystem.type(of: directory) {
        case nil: throw StasisError(.notACheckpoint, "\(directory) does not exist")
        case .directory?: break
        default: throw StasisError(.notACheckpoint, "\(directory) is not a directory")
        }
        let path = directory + "/" + Manifest.fileName
        let notACheckpoint = StasisError(.notACheckpoint, "\(directory) has no \(Manifest.fileName): it is not a stasis checkpoint, or one that never finished")
        // A directory without a manifest is no checkpoint, whatever its modes (`stasis inspect /tmp`); one
        // that cannot be looked into says so (the stat throws), and a manifest is read only from a directory
        // no one else controls.
        guard try FileSystem.type(of: path) != nil else { throw notACheckpoint }
        try FileSystem.requireOwnedAndPrivate(directory, what: "checkpoint directory")
        guard let data = try FileSystem.readFileIfPresent(path) else { throw notACheckpoint }
        return try Manifest.decode(data, path: path)
    }

    /// Files a checkpoint may hold that its manifest does not list: CRIU's dump log, which arrives after the
    /// checkpoint was published (DumpOperation moves it in once CRIU exits). A log restores nothing; it is
    /// for reading. One that a manifest does list is checked like any file (checkpoints of stasis 0.1 list it).
    public static let unlistedLogs: Set<String> = ["criu-dump.log"]

    public struct VerifyReport: Codable, Sendable {
        public var directory: String
        public var files: Int
        public var bytes: UInt64
        public var seconds: Double
    }

    /// The store a checkpoint's chunks are in: `explicit` (--store), else the one its manifest names.
    public static func store(for manifest: Manifest, explicit: String?) throws -> ChunkStore? {
        guard let info = manifest.store else { return nil }
        return try ChunkStores.open(for: info, explicit: explicit)
    }

    /// The chunked files of a manifest, as the store reads them.
    public static func chunkedItems(_ manifest: Manifest) -> [ChunkedFiles.Item] {
        manifest.files.compactMap(ChunkedFiles.Item.init)
    }

    /// The chunked files in the order a restore reads them: CRIU's images, then the agents' device memory, then
    /// the rest (what a pull fetches first, and a push packs first).
    public static func chunkedItemsInReadOrder(_ manifest: Manifest) -> [ChunkedFiles.Item] {
        let items = chunkedItems(manifest)
        return items.filter { isForCRIU($0.path) } + items.filter { isDeviceMemory($0.path) }
            + items.filter { !isForCRIU($0.path) && !isDeviceMemory($0.path) }
    }

    /// Files under gpu/ hold device memory that an agent moved (see Manifest.AgentMemory); CRIU never reads them.
    public static func isDeviceMemory(_ path: String) -> Bool { path.hasPrefix("gpu/") }

    /// The chunked files CRIU reads: its memory images.
    public static func criuItems(_ manifest: Manifest) -> [ChunkedFiles.Item] {
        chunkedItems(manifest).filter { isForCRIU($0.path) }
    }

    /// Files under archive/ are a container engine's own (an imported checkpoint archive's rootfs-diff.tar and
    /// the like), kept for export; CRIU never reads them either.
    public static func isForCRIU(_ path: String) -> Bool { !isDeviceMemory(path) && !path.hasPrefix("archive/") }

    /// Checks every file against the manifest: the set of whole files first (missing, unexpected), then sizes,
    /// then SHA-256 in parallel; then, with a store, every chunk of the chunked files (decoded and hashed).
    /// The first problem found is thrown, naming the file (and for a chunk, the byte range).
    public static func verify(_ directory: String, manifest: Manifest, store: ChunkStore?, chunks: Bool = true,
                              progress: (@Sendable (UInt64) -> Void)? = nil) throws -> VerifyReport {
        let watch = Stopwatch()
        let wholeFiles = manifest.files.filter { $0.chunks == nil }
        for entry in manifest.files {
            if let problem = ChunkedFiles.problem(with: entry) {
                throw StasisError(.integrity, "\(directory)/\(Manifest.fileName): \(problem)", hint: "the manifest was edited or damaged")
            }
        }
        // The whole files first: their checks are cheap and find a damaged or incomplete checkpoint early.
        let whole = try verifyWholeFiles(directory, wholeFiles, progress: progress)
        let chunkedBytes: UInt64
        if chunks, let info = manifest.store {
            guard let store else { throw StasisError(.invalidArgument, "\(directory) keeps its memory in a chunk store; name it with --store") }
            chunkedBytes = try ChunkedFiles.read(chunkedItems(manifest), from: store, checkpoint: directory, chunkSize: info.chunkSize, progress: progress)
        } else {
            chunkedBytes = 0
        }
        return VerifyReport(directory: directory, files: whole.files + (chunks ? chunkedItems(manifest).count : 0),
                            bytes: whole.bytes + chunkedBytes, seconds: watch.seconds)
    }

    static func verifyWholeFiles(_ directory: String, _ files: [Manifest.FileEntry],
                                 progress: (@Sendable (UInt64) -> Void)?) throws -> (files: Int, bytes: UInt64) {
        let expected = Dictionary(files.map { ($0.path, $0) }, uniquingKeysWith: { first, _ in first })
        let present = Set(try FileSystem.regularFiles(under: directory)).subtracting([Manifest.fileName])
            .subtracting(unlistedLogs.subtracting(expected.keys))
        for entry in files where !present.contains(entry.path) {
            throw StasisError(.integrity, "\(directory)/\(entry.path) is missing (the manifest lists it, \(entry.size) bytes)",
                              hint: "the checkpoint is incomplete; restore from another copy")
        }
        if let extra = present.subtracting(expected.keys).sorted().first {
            throw StasisError(.integrity, "\(directory)/\(extra) is not in the manifest",
                              hint: "a file was added to the checkpoint after it was taken; remove it or take a new checkpoint")
        }
        for entry in files {
            let size = FileSystem.size(directory + "/" + entry.path) ?? 0
            if size != entry.size {
                throw StasisError(.integrity, "\(directory)/\(entry.path) has \(size) bytes; the manifest says \(entry.size) (truncated or overwritten)",
                                  hint: "the checkpoint is damaged; restore from another copy")
            }
        }
        let results = try ParallelHasher.hash(files.map(\.path), under: directory, progress: progress)
        for result in results {
            guard let entry = expected[result.path], result.sha256 != entry.sha256 else { continue }
            // Place the damage: the first 64 MiB segment whose digest differs.
            var place = ""
            if let want = entry.segments, let got = result.segments,
               let bad = zip(want, got).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset {
                let start = UInt64(bad) * SegmentedDigest.segmentSize
                place = " in bytes \(start)..<\(min(entry.size, start + SegmentedDigest.segmentSize))"
            }
            throw StasisError(.integrity, "\(directory)/\(result.path) does not match its SHA-256 in the manifest\(place) (content changed or corrupt)",
                              hint: "the checkpoint is damaged; restore from another copy")
        }
        return (results.count, results.reduce(0) { $0 + $1.size })
    }
}
