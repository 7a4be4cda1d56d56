import Crypto
import Foundation
import StasisCore
import StasisOS

/// One checkpoint as a single file, its chunks included, for moving it to a machine that does not share the
/// store (`stasis export` / `stasis import`). The format:
///
///     bundle  = "STASISBUNDLE1\n" record* end
///     record  = kind (1 byte) | name length (UInt16 LE) | name (UTF-8) | payload length (UInt64 LE) | payload
///     'M'     the manifest: name "manifest.json", payload its JSON as the checkpoint holds it; first, once
///     'F'     a whole file: name its path in the checkpoint, payload its bytes; once per whole file
///     'C'     a chunk: name its digest, payload the chunk file as the store keeps it (header and compressed
///             data, copied as they are); once per distinct non-zero chunk of the chunked files
///     'E'     the end: empty name, payload the SHA-256 of every byte before this record; last, nothing after
///
/// Each record is checked on its own as it is read (a file against the manifest's SHA-256, a chunk against its
/// digest) and the end record covers the whole, so a damaged or truncated bundle is refused, naming the
/// record and its byte offset. Memory stays bounded: files are streamed, chunks handled one at a time.
public enum CheckpointBundle {
    static let magic = Array("STASISBUNDLE1\n".utf8)
    /// Bounds what a damaged length field can make import allocate.
    static let maxManifestBytes: UInt64 = 64 << 20
    static let ioSize = 1 << 20

    enum Kind: UInt8 {
        case manifest = 0x4D, file = 0x46, chunk = 0x43, end = 0x45  // M F C E
    }

    // MARK: export

    public struct ExportReport: Codable, Sendable {
        public var bundle: String
        public var checkpoint: String
        public var id: String
        /// Whole files carried, and chunked files whose chunks are carried.
        public var files: Int
        public var chunkedFiles: Int
        /// Distinct non-zero chunks carried (each once, however many times the files use it).
        public var chunks: Int
        /// Plain bytes of every file of the checkpoint, and bytes of the bundle.
        public var checkpointBytes: UInt64
        public var bundleBytes: UInt64
        public var seconds: Double
    }

    /// Writes the checkpoint in `directory` (whose manifest.json holds `manifestData`) to a new file at
    /// `bundlePath`, reading its chunks from `store`. Every whole file is checked against the manifest and every
    /// chunk against its digest on the way, so a damaged checkpoint is refused here rather than on the other
    /// machine. The file appears complete or not at all (an AtomicFile), mode 0600.
    /// `meter` counts the bytes written; `done`, the checkpoint's plain bytes taken care of (of all its files'
    /// sizes), for a progress display.
    public static func export(directory: String, manifestData: Data, manifest: Manifest, store: ChunkStore?,
                              to bundlePath: String, meter: Locked<UInt64>? = nil, done: Locked<UInt64>? = nil) throws -> ExportReport {
        let watch = Stopwatch()
        try checkChunkLists(manifest, name: "\(directory)/\(Manifest.fileName)", code: .manifestInvalid)
        let chunked = manifest.files.filter { $0.chunks != nil }
        if !chunked.isEmpty && store == nil {
            throw StasisError(.invalidArgument, "\(directory) keeps its memory in a chunk store; name it with --store")
        }
        let output = try BundleOutput(path: bundlePath)
        output.meter = meter
        return try writeBundle(directory: directory, manifestData: manifestData, manifest: manifest, store: store, to: output, skipping: [],
                               started: watch, done: done)
    }

    /// Writes the checkpoint as a bundle onto `connection` (a migration's: through its TLS when it is
    /// secured, never around it), leaving out the chunks in `skipping` (those the receiver has): the receiver
    /// takes them from its own store. Not closed.
    public static func stream(directory: String, manifestData: Data, manifest: Manifest, store: ChunkStore?, to connection: TCPConnection,
                              skipping: Set<String>, meter: Locked<UInt64>? = nil) throws -> ExportReport {
        let watch = Stopwatch()
        try checkChunkLists(manifest, name: "\(directory)/\(Manifest.fileName)", code: .manifestInvalid)
        let output = try BundleOutput(stream: connection)
        output.meter = meter
        return try writeBundle(directory: directory, manifestData: manifestData, manifest: manifest, store: store,
                         to: output, skipping: skipping, started: watch)
    }

    static func writeBundle(directory: String, manifestData: Data, manifest: Manifest, store: ChunkStore?, to output: BundleOutput,
                      skipping: Set<String>, started watch: Stopwatch, done: Locked<UInt64>? = nil) throws -> ExportReport {
        let chunked = manifest.files.filter { $0.chunks != nil }
        let chunkSize = manifest.store?.chunkSize ?? ChunkFormat.chunkSize
        var chunks = 0
        do {
            try manifestData.withUnsafeBytes { try output.record(.manifest, name: Manifest.fileName, payload: $0) }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: ioSize, alignment: 4096)
            defer { buffer.deallocate() }
            for entry in manifest.files where entry.chunks == nil {
                try exportWholeFile(entry, from: directory, to: output, buffer: buffer)
                done?.withLock { $0 += entry.size }
            }
            if let store {
                let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
                let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkFormat.scratchSize(chunkSize), alignment: 4096)
                defer { plain.deallocate(); scratch.deallocate() }
                var seen = Set<String>()
                for entry in chunked {
                    let item = ChunkedFiles.Item(entry)!
                    for (index, digest) in item.chunks.enumerated() {
                        let place = item.place(index, chunkSize: chunkSize, checkpoint: directory)
                        // Counted whether written or not (zeros, repeats, what the receiver has): all of it is taken care of.
                        defer { done?.withLock { $0 += UInt64(place.length) } }
                        guard !digest.isEmpty, !skipping.contains(digest), seen.insert(digest).inserted else { continue }
                        // read checks header, length, decoding and SHA-256, and leaves the chunk file in scratch.
                        // A stream's receiver checks every chunk itself (they are this dump's, just written): not twice.
                        let stored = try store.read(digest, into: UnsafeMutableRawBufferPointer(rebasing: plain[0..<place.length]),
                                                    scratch: scratch, place: place, fileInScratch: true, checkDigest: !output.isStream)
                        try output.record(.chunk, name: digest, payload: UnsafeRawBufferPointer(rebasing: scratch[0..<stored]))
                        chunks += 1
                    }
                }
            }
            try output.finish()
        } catch {
            output.abandon()
            throw error
        }
        return ExportReport(bundle: output.path, checkpoint: directory, id: manifest.id,
                            files: manifest.files.count - chunked.count, chunkedFiles: chunked.count, chunks: chunks,
                            checkpointBytes: manifest.files.reduce(0) { $0 + $1.size }, bundleBytes: output.written,
                            seconds: watch.seconds)
    }

    /// Streams one whole file into a record, hashing it as the manifest does; a file that changed is refused.
    static func exportWholeFile(_ entry: Manifest.FileEntry, from directory: String, to output: BundleOutput,
                                buffer: UnsafeMutableRawBufferPointer) throws {
        let path = directory + "/" + entry.path
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(path, .readOnly)
        } catch .noSuchFileOrDirectory {
            throw StasisError(.integrity, "\(path) is missing (the manifest lists it, \(entry.size) bytes)",
                              hint: "the checkpoint is incomplete; export another copy")
        } catch {
            throw systemError("cannot open", path, error)
        }
        defer { fd.closeQuietly() }
        try output.header(.file, name: entry.path, length: entry.size)
        var hasher = SegmentedDigest.Streaming()
        var done: UInt64 = 0
        while done < entry.size {
            let want = Int(min(UInt64(buffer.count), entry.size - done))
            let got = try attempt("cannot read", path) { try fd.readSome(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<want])) }
            guard got > 0 else {
                throw StasisError(.integrity, "\(path) has \(done) bytes; the manifest says \(entry.size) (truncated)",
                                  hint: "the checkpoint is damaged; `stasis verify` checks it")
            }
            let bytes = UnsafeRawBufferPointer(rebasing: buffer[0..<got])
            hasher.update(bytes)
            try output.append(bytes)
            done += UInt64(got)
        }
        guard hasher.finish() == entry.sha256 else {
            throw StasisError(.integrity, "\(path) does not match its SHA-256 in the manifest (content changed or corrupt); not exported",
                              hint: "the checkpoint is damaged; `stasis verify` checks it")
        }
    }

    // MARK: import

    /// What an import wrote.
    public struct ImportStatistics: Codable, Sendable {
        public var files = 0
        public var fileBytes: UInt64 = 0
        /// Distinct chunks in the bundle; those the store lacked were added, the rest were already there.
        public var chunks = 0
        public var newChunks = 0
        public var reusedChunks = 0
        /// Bytes of chunk files added to the store.
        public var storedBytes: UInt64 = 0
        public var bundleBytes: UInt64 = 0
    }

    /// Reads a bundle: `init` reads and validates its manifest, `extract` the rest.
    public final class Reader {
        public let path: String
        public let manifest: Manifest
        private let input: BundleInput
        private var records = 0
        /// Counts the bytes read from here on, for a progress display.
        public var meter: Locked<UInt64>? {
            get { input.meter }
            set { input.meter = newValue }
        }

        public convenience init(path: String) throws {
            try self.init(input: try BundleInput(path: URL(fileURLWithPath: path).standardizedFileURL.path))
        }

        /// A bundle arriving on a migration's connection (through its TLS when it is secured), named `name`
        /// in messages; the connection stays open.
        public convenience init(stream connection: TCPConnection, name: String) throws {
            try self.init(input: BundleInput(stream: connection, name: name))
        }

        init(input: BundleInput) throws {
            var records = 0
            var head = [UInt8](repeating: 0, count: magic.count)
            let complete = try head.withUnsafeMutableBytes { try input.read(into: $0) }
            guard complete else {
                throw StasisError(.integrity, "\(input.path) is truncated: shorter than a bundle's header")
            }
            guard head == magic else {
                throw StasisError(.notACheckpoint, "\(input.path) is not a stasis bundle (no STASISBUNDLE1 header)",
                                  hint: "`stasis export DIR -o FILE` writes bundles")
            }
            guard let record = try Self.nextRecord(input, number: &records) else {
                throw StasisError(.integrity, "\(input.path) is truncated: it ends after its header")
            }
            guard record.kind == .manifest else { throw record.damaged(in: input.path, "the first record must be the manifest") }
            guard record.length <= maxManifestBytes else { throw record.damaged(in: input.path, "its length \(record.length) is beyond any manifest") }
            var data = Data(count: Int(record.length))
            let read = try data.withUnsafeMutableBytes { try input.read(into: $0) }
            guard read else { throw record.truncated(in: input.path, at: input.offset) }
            let name = "\(input.path) (its manifest record)"
            do {
                manifest = try Manifest.decode(data, path: name)
            } catch let error as StasisError where error.code == .manifestInvalid || error.code == .notACheckpoint {
                throw StasisError(.integrity, "\(error.message); the bundle is damaged", hint: "export the checkpoint again")
            }
            try checkChunkLists(manifest, name: name, code: .integrity)
            (self.path, self.input, self.records) = (input.path, input, records)
        }

        /// Writes the whole files into `directory` (which must be empty) and the chunks the store lacks into
        /// `store`, checking every record, and finally the end record's SHA-256 over the whole bundle. The
        /// caller publishes `directory` only when this returns; chunks added before a failure stay for gc.
        /// `chunksMayBeInStore`: a chunk the bundle leaves out is fine when the store has it (a migration sends
        /// only what the receiver lacks).
        public func extract(into directory: String, store: ChunkStore?, chunksMayBeInStore: Bool = false) throws -> ImportStatistics {
            let whole = Dictionary(manifest.files.filter { $0.chunks == nil }.map { ($0.path, $0) }, uniquingKeysWith: { a, _ in a })
            let chunkSize = manifest.store?.chunkSize ?? ChunkFormat.chunkSize
            var places: [String: ChunkPlace] = [:]
            for item in manifest.files.compactMap(ChunkedFiles.Item.init) {
                for (index, digest) in item.chunks.enumerated() where !digest.isEmpty && places[digest] == nil {
                    places[digest] = item.place(index, chunkSize: chunkSize, checkpoint: path)
                }
            }
            if !places.isEmpty && store == nil {
                throw StasisError(.invalidArgument, "\(path) carries chunks; a store must receive them")
            }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: ioSize, alignment: 4096)
            let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkFormat.scratchSize(chunkSize), alignment: 4096)
            defer { buffer.deallocate(); plain.deallocate(); scratch.deallocate() }
            var statistics = ImportStatistics()
            var seenFiles = Set<String>(), seenChunks = Set<String>()
            // The chunks get their names together once all is checked, after one syncfs, as a dump's do.
            let batch = store.map { $0.makeBatch() }
            var committed = false
            var intake: ChunkIntake?
            defer {
                // Waits for chunks in flight on a failure already being thrown (after a success it was finished already).
                _ = try? intake?.finish()
                if !committed { batch?.abandon() }
            }
            while true {
                let before = input.hasher  // the end record's digest covers everything up to its own first byte
                guard let record = try Self.nextRecord(input, number: &records) else {
                    throw StasisError(.integrity, "\(path) is truncated: it ends at byte \(input.offset), after \(records) records, without its end record",
                                      hint: "copy the bundle again")
                }
                switch record.kind {
                case .manifest:
                    throw record.damaged(in: path, "a bundle holds one manifest")
                case .file:
                    guard let entry = whole[record.name], seenFiles.insert(record.name).inserted else {
                        throw record.damaged(in: path, "the manifest lists no such whole file, or it came twice")
                    }
                    guard record.length == entry.size else {
                        throw record.damaged(in: path, "it holds \(record.length) bytes; the manifest says \(entry.size)")
                    }
                    try receiveFile(record, entry, into: directory, buffer: buffer)
                    statistics.files += 1
                    statistics.fileBytes += entry.size
                case .chunk:
                    guard let place = places[record.name], seenChunks.insert(record.name).inserted, let store else {
                        throw record.damaged(in: path, "the manifest uses no such chunk, or it came twice")
                    }
                    guard record.length < UInt64(scratch.count) else { throw record.damaged(in: path, "longer than any valid chunk") }
                    if intake == nil { intake = ChunkIntake(store: store, batch: batch!, chunkSize: chunkSize) }
                    // Read here, in order; checked and written on the intake's threads.
                    let holds = "it holds \(Self.describe(place))"
                    let damaged = record.damaged(in: path, "{why} (\(holds))")
                    try intake!.submit(length: Int(record.length), plainLength: place.length, digest: record.name, damaged: damaged) { bytes in
                        guard try input.read(into: bytes) else { throw record.truncated(in: path, at: input.offset) }
                    }
                case .end:
                    if let intake { statistics = statistics + (try intake.finish()) }
                    var digest = [UInt8](repeating: 0, count: 32)
                    guard record.length == 32 else { throw record.damaged(in: path, "its length is \(record.length), not 32") }
                    guard try digest.withUnsafeMutableBytes({ try input.read(into: $0) }) else { throw record.truncated(in: path, at: input.offset) }
                    guard input.isStream || Array(before.finalize()) == digest else {
                        throw record.damaged(in: path, "the bundle's SHA-256 does not match (a byte before it changed)")
                    }
                    // A stream goes on with the migration's answer; a file must end here.
                    guard try input.isStream || input.atEnd() else { throw record.damaged(in: path, "bytes follow the end record") }
                    statistics.bundleBytes = input.offset
                    if let missing = whole.keys.sorted().first(where: { !seenFiles.contains($0) }) {
                        throw StasisError(.integrity, "\(path) lacks the file \(missing) that its manifest lists")
                    }
                    let inStore = { (digest: String) in chunksMayBeInStore && store?.has(digest) == true }
                    if let missing = places.first(where: { !seenChunks.contains($0.key) && !inStore($0.key) }) {
                        throw StasisError(.integrity, "\(path) lacks chunk \(missing.key), which holds \(Self.describe(missing.value))",
                                          hint: "export the checkpoint again")
                    }
                    try FileSystem.fsync(path: directory)
                    try batch?.commit()
                    committed = true
                    return statistics
                }
            }
        }

        /// A chunk's first use, named by the checkpoint's file rather than the staging directory it is written to.
        private static func describe(_ place: ChunkPlace) -> String {
            "\(place.file) bytes \(place.offset)..<\(place.offset + UInt64(place.length))"
        }

        /// Streams a whole-file record into `directory`, hashing it; the file is synced before it counts.
        private func receiveFile(_ record: Record, _ entry: Manifest.FileEntry, into directory: String,
                                 buffer: UnsafeMutableRawBufferPointer) throws {
            let target = directory + "/" + entry.path
            if entry.path.contains("/") {
                try FileSystem.makePrivateDirectory(String(target[..<target.lastIndex(of: "/")!]))
            }
            let fd = try attempt("cannot create", target) {
                try FileDescriptor.open(target, .writeOnly, options: [.create, .exclusiveCreate], permissions: .ownerReadWrite)
            }
            defer { fd.closeQuietly() }
            var hasher = SegmentedDigest.Streaming()
            var left = record.length
            while left > 0 {
                let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(min(UInt64(buffer.count), left))])
                guard try input.read(into: piece) else { throw record.truncated(in: path, at: input.offset) }
                hasher.update(UnsafeRawBufferPointer(piece))
                try attempt("cannot write", target) { try fd.write(all: UnsafeRawBufferPointer(piece)) }
                left -= UInt64(piece.count)
            }
            guard hasher.finish() == entry.sha256 else {
                throw record.damaged(in: path, "its content does not match the SHA-256 the manifest gives")
            }
            try attempt("cannot sync", target) { try fd.syncData() }
        }

        /// The next record's header; nil when the file ends cleanly before one.
        static func nextRecord(_ input: BundleInput, number: inout Int) throws -> Record? {
            let start = input.offset
            guard !(try input.atEnd()) else { return nil }
            number += 1
            var fixed = [UInt8](repeating: 0, count: 3)
            var record = Record(number: number, offset: start, kind: .end, name: "", length: 0)
            let what = "record \(number) at byte \(start)"
            guard try fixed.withUnsafeMutableBytes({ try input.read(into: $0) }) else {
                throw StasisError(.integrity, "\(input.path) is truncated: it ends inside the header of \(what)", hint: "copy the bundle again")
            }
            guard let kind = Kind(rawValue: fixed[0]) else {
                throw StasisError(.integrity, "\(input.path) is damaged: \(what) has an unknown kind \(fixed[0])", hint: "copy the bundle again")
            }
            record.kind = kind
            var name = [UInt8](repeating: 0, count: Int(fixed[1]) | Int(fixed[2]) << 8)
            var length = [UInt8](repeating: 0, count: 8)
            guard try name.withUnsafeMutableBytes({ try input.read(into: $0) }),
                  try length.withUnsafeMutableBytes({ try input.read(into: $0) }) else {
                throw StasisError(.integrity, "\(input.path) is truncated: it ends inside the header of \(what)", hint: "copy the bundle again")
            }
            record.name = String(decoding: name, as: UTF8.self)
            record.length = length.reversed().reduce(0) { $0 << 8 | UInt64($1) }
            return record
        }
    }

    /// A record's header, and how errors name it.
    struct Record {
        var number: Int
        var offset: UInt64
        var kind: Kind
        var name: String
        var length: UInt64

        var text: String {
            let what: String
            switch kind {
            case .manifest: what = "manifest"
            case .file: what = "file \(name)"
            case .chunk: what = "chunk \(name)"
            case .end: what = "end"
            }
            return "record \(number) (\(what)) at byte \(offset)"
        }

        func damaged(in bundle: String, _ why: String) -> StasisError {
            StasisError(.integrity, "\(bundle) is damaged: \(text): \(why)", hint: "copy the bundle again, or export the checkpoint again")
        }

        func truncated(in bundle: String, at offset: UInt64) -> StasisError {
            StasisError(.integrity, "\(bundle) is truncated: it ends at byte \(offset), inside \(text) of \(length) bytes",
                        hint: "copy the bundle again")
        }
    }

    // MARK: checks shared by export and import

    /// Refuses a manifest whose chunk lists disagree with its files' digests. Everything else that could make
    /// an import write outside its directory or store was refused when the manifest was decoded
    /// (`Manifest.validate`); the bundle's manifest comes from another machine.
    public static func checkChunkLists(_ manifest: Manifest, name: String, code: StasisError.Code) throws {
        for entry in manifest.files {
            if let problem = ChunkedFiles.problem(with: entry) {
                throw StasisError(code, "\(name): \(problem)", hint: "the manifest is damaged")
            }
        }
    }
}

/// The bundle being written: buffered, hashed as it goes, into an AtomicFile (or onto a connection) until
/// `finish` renames it into place.
final class BundleOutput {
    let path: String
    /// The connection written to (nil for a file).
    private let stream: TCPConnection?
    /// The file being written (nil on a stream): it holds the descriptor and gives the bundle its name.
    private var file: AtomicFile?
    private let buffer: UnsafeMutableRawBufferPointer
    private var used = 0
    private var hasher = SHA256()
    private(set) var written: UInt64 = 0
    var isStream: Bool { stream != nil }
    /// Counts the bytes that left, as they leave (a progress display reads it from another thread).
    var meter: Locked<UInt64>?

    /// Writes onto a connection: no file, no rename, no fsync; `finish` only flushes.
    init(stream connection: TCPConnection) throws {
        (path, stream) = ("the connection to \(connection.peer)", connection)
        buffer = .allocate(byteCount: CheckpointBundle.ioSize, alignment: 4096)
        try CheckpointBundle.magic.withUnsafeBytes { try append($0) }
    }

    init(path target: String) throws {
        let file = try AtomicFile(creating: target)
        (path, stream, self.file) = (file.path, nil, file)
        buffer = .allocate(byteCount: CheckpointBundle.ioSize, alignment: 4096)
        try CheckpointBundle.magic.withUnsafeBytes { try append($0) }
    }

    deinit { buffer.deallocate() }

    func header(_ kind: CheckpointBundle.Kind, name: String, length: UInt64) throws {
        let nameBytes = Array(name.utf8)
        guard nameBytes.count <= Int(UInt16.max) else { throw StasisError(.invalidArgument, "the name \(name.prefix(80))... is too long for a bundle") }
        var bytes: [UInt8] = [kind.rawValue, UInt8(nameBytes.count & 0xff), UInt8(nameBytes.count >> 8)] + nameBytes
        for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: length >> UInt64(shift))) }
        try bytes.withUnsafeBytes { try append($0) }
    }

    func record(_ kind: CheckpointBundle.Kind, name: String, payload: UnsafeRawBufferPointer) throws {
        try header(kind, name: name, length: UInt64(payload.count))
        try append(payload)
    }

    func append(_ bytes: UnsafeRawBufferPointer) throws {
        // A stream's records are each checked against the authenticated manifest: no digest of the whole.
        if !isStream { hasher.update(bufferPointer: bytes) }
        written += UInt64(bytes.count)
        var rest = bytes
        while !rest.isEmpty {
            let take = min(rest.count, buffer.count - used)
            (buffer.baseAddress! + used).copyMemory(from: rest.baseAddress!, byteCount: take)
            used += take
            rest = UnsafeRawBufferPointer(rebasing: rest[take...])
            if used == buffer.count { try flush() }
        }
    }

    private func flush() throws {
        let pending = UnsafeRawBufferPointer(start: buffer.baseAddress, count: used)
        defer { meter?.withLock { $0 += UInt64(pending.count) } }
        if let file {
            try file.write(pending)
        } else if let stream {
            try stream.send(pending)
        }
        used = 0
    }

    /// Appends the end record, makes the file durable and gives it its name.
    func finish() throws {
        let digest = isStream ? [UInt8](repeating: 0, count: 32) : Array(hasher.finalize())
        try header(.end, name: "", length: 32)
        try digest.withUnsafeBytes { try append($0) }
        try flush()
        try file?.publish()
    }

    /// Removes the unfinished file.
    func abandon() { file?.discard() }
}

/// The bundle being read: buffered, counting and hashing every byte handed out.
final class BundleInput {
    let path: String
    /// The file read (nil on a connection).
    private let fd: FileDescriptor?
    private let connection: TCPConnection?
    private let buffer: UnsafeMutableRawBufferPointer
    private var start = 0
    private var end = 0
    private(set) var offset: UInt64 = 0
    private(set) var hasher = SHA256()
    /// A connection, not a file: not closed here, and the end record need not be the last byte.
    var isStream: Bool { connection != nil }
    /// Counts the bytes read, as they arrive (a progress display reads it from another thread).
    var meter: Locked<UInt64>?

    init(path: String) throws {
        let fd = try FileSystem.openInput(path, what: "a bundle")
        (self.path, self.fd, connection) = (path, fd, nil)
        buffer = .allocate(byteCount: CheckpointBundle.ioSize, alignment: 4096)
    }

    init(stream connection: TCPConnection, name: String) {
        (path, fd, self.connection) = (name, nil, connection)
        buffer = .allocate(byteCount: CheckpointBundle.ioSize, alignment: 4096)
    }

    deinit {
        fd?.closeQuietly()
        buffer.deallocate()
    }

    /// Fills `target` entirely; false when the file ends first.
    func read(into target: UnsafeMutableRawBufferPointer) throws -> Bool {
        var done = 0
        while done < target.count {
            if start == end, try !refill() { return false }
            let take = min(end - start, target.count - done)
            let piece = UnsafeRawBufferPointer(rebasing: buffer[start..<(start + take)])
            (target.baseAddress! + done).copyMemory(from: piece.baseAddress!, byteCount: take)
            if !isStream { hasher.update(bufferPointer: piece) }
            start += take
            done += take
            offset += UInt64(take)
        }
        return true
    }

    func atEnd() throws -> Bool {
        if start < end { return false }
        return try !refill()
    }

    private func refill() throws -> Bool {
        let got: Int
        if let connection {
            got = try connection.receiveSome(into: buffer)
        } else {
            got = try attempt("cannot read", path) { try fd!.readSome(into: buffer) }
        }
        meter?.withLock { $0 += UInt64(got) }
        (start, end) = (0, got)
        return got > 0
    }
}
