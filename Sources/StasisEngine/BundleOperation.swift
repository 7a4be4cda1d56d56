import Foundation
import StasisCore
import StasisImage
import StasisOS
import StasisStore

/// `stasis export` and `stasis import`: one checkpoint as a single file (CheckpointBundle), for moving it to a
/// machine that does not share its chunk store.
public enum BundleOperation {
    /// Writes the checkpoint in `directory` to a new bundle file. The store (`explicit`, else the manifest's)
    /// is held shared meanwhile, so gc cannot remove a chunk while it is being copied.
    public static func export(_ directory: String, to bundle: String, store explicit: String?,
                              progress: ProgressHandler? = nil) throws -> CheckpointBundle.ExportReport {
        let directory = URL(fileURLWithPath: directory).standardizedFileURL.path
        let manifest = try Checkpoint.readManifest(directory)
        let data = try FileSystem.readFile(directory + "/" + Manifest.fileName)
        let store = try Checkpoint.store(for: manifest, explicit: explicit)
        let lock = try store?.lock(exclusive: false)
        defer { lock?.release() }
        let writer = try recordPartials(of: bundle, in: store ?? defaultStore(explicit))
        defer { writer?.release() }
        // Progress in the checkpoint's plain bytes, of all of them: the bundle's own size is not known ahead.
        let done = Locked<UInt64>(0)
        let ticker = ProgressTicker.reporting(progress, phase: "exporting", total: manifest.files.reduce(0) { $0 + $1.size }) { done.current }
        defer { ticker?.stop() }
        do {
            return try CheckpointBundle.export(directory: directory, manifestData: data, manifest: manifest, store: store, to: bundle, done: done)
        } catch let error as StasisError {
            throw error.prefixed("export of \(directory) failed")
        }
    }

    /// Runs `body`, which writes `output` as an AtomicFile (a checkpoint archive), with the hidden file it
    /// makes recorded first in the store of the checkpoint in `directory` (else the default one), so that
    /// `stasis gc` removes it should this process die. A checkpoint that cannot be read is left for `body`
    /// to refuse.
    public static func recordingPartials<Result>(of output: String, checkpoint directory: String, store explicit: String?,
                                                 _ body: () throws -> Result) throws -> Result {
        var store: ChunkStore?
        // Unreadable: left for `body` to refuse (see above); a store the manifest names but that is gone: the default one.
        if let manifest = try? Checkpoint.readManifest(URL(fileURLWithPath: directory).standardizedFileURL.path) {
            store = (try? Checkpoint.store(for: manifest, explicit: explicit)) ?? defaultStore(explicit)  // as above
        }
        let writer = try recordPartials(of: output, in: store)
        defer { writer?.release() }
        return try body()
    }

    /// Records the hidden `.NAME.partial-PID-*` file that writing `output` makes, before it is made; nil
    /// without a store (then only the next writer of the same name removes what a killed one left).
    /// One catalog entry per id: a second copy listed over the first would let `stasis rm` of either unlist
    /// the chunks both use. `verb`: what the user ran ("import", "pull").
    static func refuseListedTwice(_ id: String, in store: ChunkStore, verb: String) throws {
        if let listed = StoreCatalog(store: store).entry(id: id), FileSystem.exists(listed.directory + "/" + Manifest.fileName) {
            throw StasisError(.invalidArgument, "checkpoint \(id) is already in the store \(store.path), at \(listed.directory)",
                              hint: "use that copy, or `stasis rm` it first, or \(verb) into another --store")
        }
    }

    /// The end of every import (a bundle, a migration's, a registry's pull): the manifest written naming the
    /// store its chunks are now in, listed in that store's catalog before the directory appears (from then
    /// on gc keeps its chunks), and the directory published. `catalog` is set once listed, for the caller's
    /// undo should the publish fail.
    static func publishImported(_ manifest: inout Manifest, store: ChunkStore?, staging: StagingDirectory, catalog: inout StoreCatalog?) throws {
        if let store { manifest.store!.path = store.path }
        try FileSystem.writeAtomically(try Manifest.encoder().encode(manifest), to: staging.path + "/" + Manifest.fileName)
        if let store {
            catalog = StoreCatalog(store: store)
            try catalog!.register(manifest, directory: staging.destination)
        }
        try staging.publish()
    }

    static func recordPartials(of output: String, in store: ChunkStore?) throws -> StoreWriter? {
        guard let store else { return nil }
        do {
            return try StoreWriter(store: store, partialsOf: output)
        } catch let error as StasisError {
            throw error.prefixed("cannot record \(output) in the store \(store.path)")
        }
    }

    /// The store a command names or the environment gives, when it exists: where the partials of a checkpoint
    /// without chunks are recorded.
    static func defaultStore(_ explicit: String?) -> ChunkStore? {
        // No such store: nothing to record in (the doc above); the export itself does not need one.
        try? Backends().openStore(explicit, create: false)
    }

    public struct ImportReport: Codable, Sendable {
        public var directory: String
        public var bundle: String
        public var id: String
        /// The store that received the chunks; nil for a checkpoint without chunked files.
        public var store: String?
        public var statistics: CheckpointBundle.ImportStatistics
        public var seconds: Double
    }

    /// Recreates the checkpoint of `bundle` in `destination` (missing or an empty directory), its chunks in the
    /// store `explicit` (else STASIS_STORE, else the default; the bundle's own store path belongs to the machine
    /// it came from). Everything is checked before the directory appears, under its final name, complete.
    public static func importBundle(_ bundle: String, into destination: String, store explicit: String?,
                                    progress: ProgressHandler? = nil) throws -> ImportReport {
        let reader: CheckpointBundle.Reader
        let staging: StagingDirectory
        do {
            reader = try CheckpointBundle.Reader(path: bundle)
            try StagingDirectory.check(destination: destination)
            // The store records the staging directory, so that gc finds it should this import be killed.
            let store = try reader.manifest.store.map { _ in try Backends().openStore(explicit, create: true) }
            staging = try StagingDirectory(destination: destination, store: store)
        } catch let error as StasisError {
            throw error.prefixed("import of \(bundle) failed")
        }
        // Tests kill an import here, its staging directories made (STASIS_FAULT=import-staged-stall).
        FaultInjection.stall("import-staged") { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }
        let read = Locked<UInt64>(0)
        reader.meter = read
        let ticker = ProgressTicker.reporting(progress, phase: "importing", total: FileSystem.size(bundle)) { read.current }
        defer { ticker?.stop() }
        return try importBundle(reader, staging: staging, store: explicit)
    }

    /// The import proper, from an open bundle (a file, or a migration's connection) into `staging`.
    /// `chunksMayBeInStore`: the sender left out the chunks the store has.
    static func importBundle(_ reader: CheckpointBundle.Reader, staging: StagingDirectory, store explicit: String?,
                             chunksMayBeInStore: Bool = false) throws -> ImportReport {
        let watch = Stopwatch()
        var manifest = reader.manifest
        var catalog: StoreCatalog?
        do {
            var store: ChunkStore?
            var lock: StoreLock?
            // Shared from the first chunk written until the manifest is listed: gc must see it or wait.
            defer { lock?.release() }
            if manifest.store != nil {
                let opened = try Backends().openStore(explicit, create: true)
                lock = try opened.lock(exclusive: false)
                store = opened
                try refuseListedTwice(manifest.id, in: opened, verb: "import")
            }
            let statistics = try reader.extract(into: staging.path, store: store, chunksMayBeInStore: chunksMayBeInStore)
            try publishImported(&manifest, store: store, staging: staging, catalog: &catalog)
            return ImportReport(directory: staging.destination, bundle: reader.path, id: manifest.id, store: store?.path,
                                statistics: statistics, seconds: watch.seconds)
        } catch {
            if !staging.published { catalog?.unregister(id: manifest.id) }
            staging.discard()
            throw StasisError.wrapping(error, as: .io).prefixed("import of \(reader.path) failed")
        }
    }
}
