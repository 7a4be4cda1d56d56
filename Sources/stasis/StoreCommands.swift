import ArgumentParser
import Foundation
import StasisCore
import StasisEngine
import StasisOS
import StasisStore

/// The store a store command works on: --store, else $STASIS_STORE, else the default.
private func openStore(_ options: StoreOptions) throws -> ChunkStore {
    try Backends().openStore(options.store, create: false)
}

/// Whether the file at `path` is there (a listed checkpoint's manifest). One that cannot be examined
/// (its directory unreadable) shows as absent: `ls` reports, it does not stop at one entry.
private func isPresent(_ path: String) -> Bool { ((try? FileSystem.type(of: path)) ?? nil) != nil }

struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ls",
        abstract: "List the checkpoints whose chunks are in a store, oldest first, and the store's size.")

    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    struct Row: Codable {
        var id: String
        var directory: String
        var present: Bool
        /// The checkpoint is gone (`StoreCatalog.isStale`): the next gc drops it and frees its chunks.
        var stale: Bool
        var createdAt: Date
        var rootPID: Int32
        var imageBytes: UInt64
        var addedBytes: UInt64
    }

    struct Listing: Codable {
        var store: String
        var checkpoints: [Row]
        var chunks: Int
        var chunkBytes: UInt64
    }

    func run() throws {
        try Output.run(json: output.json) {
            let catalog = StoreCatalog(store: try openStore(store))
            let rows = try catalog.entries().map { entry in
                Row(id: entry.manifest.id, directory: entry.directory,
                    present: isPresent(entry.directory + "/" + Manifest.fileName), stale: StoreCatalog.isStale(entry),
                    createdAt: entry.manifest.createdAt, rootPID: entry.manifest.processTree.rootPID,
                    imageBytes: entry.manifest.memory.imageBytes, addedBytes: entry.manifest.store?.storedBytes ?? 0)
            }
            let usage = catalog.usage()
            let listing = Listing(store: catalog.store.path, checkpoints: rows, chunks: usage.chunks, chunkBytes: usage.bytes)
            if output.json { return Output.json(listing) }
            for line in listing.textLines { print(line) }
        }
    }
}

struct RemoveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rm",
        abstract: "Delete checkpoints (directory and store listing); their chunks are freed by the next `stasis gc`.")

    @Argument(help: "Checkpoint directories or ids (as `stasis ls` shows them).")
    var checkpoints: [String]

    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func validate() throws {
        guard !checkpoints.isEmpty else { throw ValidationError("name at least one checkpoint") }
    }

    func run() throws {
        try Output.run(json: output.json) {
            let catalog = StoreCatalog(store: try openStore(store))
            var removed: [String] = []
            for checkpoint in checkpoints {
                let entry = try catalog.remove(checkpoint)
                removed.append(entry.directory)
                if !output.json { print("removed \(entry.manifest.id) (\(entry.directory))") }
            }
            if output.json { Output.json(["removed": removed]) }
        }
    }
}

struct ReserveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reserve",
        abstract: "Keep blank chunk files in a store in memory, so that checkpoints write into ready pages.",
        discussion: """
        A chunk written into a new file on tmpfs costs the kernel a fresh page for every 4 KiB before the \
        copy (cleared, where the kernel clears what it allocates); written into a blank of the reserve, it \
        costs the copy alone. On an H100 that gained little (docs/BENCHMARKS.md). `stasis reserve SIZE` \
        writes blanks until the reserve holds SIZE (or removes those over it); each checkpoint's new chunks \
        use them up, and `stasis gc` gives the reserve the chunk files it removes, up to SIZE, instead of \
        deleting them. The reserve holds SIZE of memory. For a store on tmpfs only; 0 removes it. Without \
        SIZE, shows the reserve.
        """)

    @Argument(help: "How much to keep, in bytes or with a unit (512M, 32G); 0 removes the reserve.")
    var size: String?

    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func validate() throws {
        if let size, Format.parseBytes(size) == nil { throw ValidationError("\(size) is not a size (write it as 512M, 32G or a number of bytes)") }
    }

    func run() throws {
        try Output.run(json: output.json) {
            let bytes = size.flatMap(Format.parseBytes)
            let path = StoreLocation.resolve(store.store, recorded: nil)
            // Checked before the store is made: the nearest directory that exists tells where it would be.
            var existing = URL(fileURLWithPath: path).standardizedFileURL
            while !FileSystem.exists(existing.path), existing.path != "/" { existing.deleteLastPathComponent() }
            if let bytes, bytes > 0, !FileSystem.isInMemory(existing.path) {
                throw StasisError(.invalidArgument, "the store \(path) is not in memory: a reserve only helps a store on tmpfs",
                                  hint: "put the store on /dev/shm (--store or STASIS_STORE) to use one")
            }
            // Made when missing: a reserve is set up before the first checkpoint.
            guard let opened = try Backends().openStore(store.store, create: (bytes ?? 0) > 0) as? DirectoryChunkStore else {
                throw StasisError(.invalidArgument, "only a store in a directory keeps a reserve")
            }
            var status = try opened.reserve.status()
            if let bytes {
                if let available = FileSystem.availableBytes(at: opened.path), bytes > status.bytes, bytes - status.bytes > available {
                    throw StasisError(.noSpace, "the reserve needs \(Format.bytes(bytes - status.bytes)) more, and \(opened.path) has \(Format.bytes(available)) free",
                                      hint: "ask for less, or make room")
                }
                // Shared, as a dump's: gc does not recycle into the reserve while it is resized.
                let lock = try opened.lock(exclusive: false)
                defer { lock.release() }
                status = try opened.reserve.resize(to: bytes, threads: ProcessInfo.processInfo.activeProcessorCount)
            }
            if output.json { return Output.json(status) }
            print("reserve of \(opened.path): \(status.blanks) blank chunk files, \(Format.bytes(status.bytes)) (asked for \(Format.bytes(status.targetBytes)))")
        }
    }
}

struct CollectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract: "Remove the chunks no listed checkpoint uses, and what dumps that died left behind.",
        discussion: """
        Safe while dumps run: gc waits for running dumps and imports to list their checkpoint, and for \
        restores and verifies reading from the store, and spares chunks written in the last --grace seconds. \
        It also removes the hidden partial directories and files of dumps, imports and exports whose process \
        is gone, and drops (saying so) listed checkpoints whose directory is gone, which `stasis ls` shows as \
        stale: their chunks go with the others.
        """)

    @Flag(name: .long, help: "Only report what would be removed.")
    var dryRun = false

    @Option(name: .long, help: "Keep chunks modified less than this many seconds ago.")
    var grace: Double = 60

    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func validate() throws {
        guard grace.isFinite, grace >= 0 else { throw ValidationError("--grace must be a number of seconds, 0 or more (not \(grace))") }
    }

    func run() throws {
        try Output.run(json: output.json) {
            let catalog = StoreCatalog(store: try openStore(store))
            let report = try catalog.collect(dryRun: dryRun, graceSeconds: grace)
            if output.json { return Output.json(report) }
            for line in report.textLines { print(line) }
        }
    }
}
