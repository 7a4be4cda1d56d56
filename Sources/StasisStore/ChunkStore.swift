import Crypto
import Foundation
import StasisCore
import StasisOS

/// The `directory` kind of `ChunkStore`: a directory of content-addressed chunks shared by many checkpoints.
///
///     STORE/chunks/ab/abcdef...   one chunk, named by the SHA-256 of its plain content (64 hex digits)
///     STORE/checkpoints/ID.json   the manifest of every checkpoint that uses the store (what gc keeps)
///     STORE/tmp/                  chunks being written
///     STORE/lock                  flock: dumps and imports hold it shared, gc exclusive
///     STORE/reserve/              blank chunk files to write into, for a store in memory (`ChunkReserve`)
///
/// A chunk file is a 12-byte header ("STCK", format 1, codec, 2 reserved bytes, plain length as little-endian
/// UInt32) and the payload. It is written to tmp/, made durable (one syncfs for all the chunks of a dump or
/// an import, see `Batch`) and only then renamed into place, so a chunk that exists under its name is
/// complete; readers still check its SHA-256, so damage is found, never restored.
public final class DirectoryChunkStore: ChunkStore {
    public let path: String
    public var kind: Manifest.StoreKind { .directory }

    private let observer = Locked<ChunkObserver?>(nil)
    private let checkBuffers = BufferPairs()
    /// Pages ready to be written (empty unless `stasis reserve` made some).
    public let reserve: ChunkReserve

    public func observe(_ body: ChunkObserver?) { observer.withLock { $0 = body } }

    /// Opens the store at `path`; `create` makes it (0700) when missing, else a missing store is an error.
    public init(path: String, create: Bool) throws {
        // URL would take "" for the current directory, which would silently become a store.
        guard !path.isEmpty else {
            throw StasisError(.invalidArgument, "the chunk store's path is empty",
                              hint: "name a directory with --store or STASIS_STORE, or leave both unset for \(StoreLocation.defaultPath)")
        }
        self.path = URL(fileURLWithPath: path).standardizedFileURL.path
        reserve = ChunkReserve(storePath: self.path)
        if !FileSystem.isDirectory(self.path + "/chunks") {
            guard create else {
                throw StasisError(.notACheckpoint, "\(self.path) is not a stasis chunk store (no chunks/ in it)",
                                  hint: "name the store the checkpoint was written to with --store")
            }
        }
        if create {
            for sub in ["", "/chunks", "/checkpoints", "/tmp"] {
                try FileSystem.makePrivateDirectory(self.path + sub)
            }
        }
        try requirePrivateLevels()
    }

    /// Chunks already in the store are reused unread by a dump, its list decides what gc keeps, its records
    /// what gc removes: every level stasis reads or writes must be this user's alone (a chunks/XX that others
    /// may write lets them plant or swap chunks as well as a chunks/ would).
    private func requirePrivateLevels() throws {
        let levels = ["", "/chunks", "/checkpoints", "/tmp", "/writers", "/lock", "/reserve"].map { path + $0 }
        for level in levels where level == path || FileSystem.exists(level) {
            try FileSystem.requireOwnedAndPrivate(level, what: "chunk store")
        }
        // Listed once the levels above are known to be this user's: a chunks/ that cannot be read is an error
        // naming it, not a store taken as empty.
        for prefix in try FileSystem.namesOrNone(in: path + "/chunks").sorted() {
            try FileSystem.requireOwnedAndPrivate("\(path)/chunks/\(prefix)", what: "chunk store")
        }
    }

    public func chunkPath(_ digest: String) -> String { "\(path)/chunks/\(digest.prefix(2))/\(digest)" }

    // MARK: writing

    public func makeBatch() -> any ChunkBatch { Batch(store: self) }

    /// New chunks of one ingest, written to tmp/ and given their names together by `commit`: one syncfs for
    /// all of them instead of an fdatasync each (which on a VM's disk made ingest latency-bound), and still
    /// no chunk under its name before its bytes are durable. Until then the batch answers for its own chunks.
    final class Batch: ChunkBatch {
        let store: DirectoryChunkStore
        private let pending = Locked<[String: String]>([:])  // digest -> temporary file

        init(store: DirectoryChunkStore) { self.store = store }

        func claim(_ digest: String, plain: UnsafeRawBufferPointer?) -> Bool { store.claim(digest, batch: self, plain: plain) }

        func put(_ plain: UnsafeRawBufferPointer, digest: String, codec: Codec, scratch: UnsafeMutableRawBufferPointer,
                 probe: Bool, claimed: Bool) throws -> ChunkPutResult {
            try store.put(plain, digest: digest, codec: codec, scratch: scratch, batch: self, probe: probe, claimed: claimed)
        }

        func putFile(_ bytes: UnsafeRawBufferPointer, digest: String) throws -> ChunkPutResult {
            try store.putFile(bytes, digest: digest, batch: self)
        }

        func adoptPiece(_ name: String, length: Int, digest: String) throws -> ChunkPutResult {
            try store.adoptPiece(name, length: length, digest: digest, batch: self)
        }

        /// Claims `digest` for this batch; false when the batch already has it.
        func claim(_ digest: String) -> Bool {
            pending.withLock { pending in
                guard pending[digest] == nil else { return false }
                pending[digest] = ""  // claimed; its file follows in `written`
                return true
            }
        }

        func written(_ digest: String, at temporary: String) { pending.withLock { $0[digest] = temporary } }

        /// Syncs the store's filesystem, renames every chunk into place, and syncs it again for the renames
        /// (one syncfs instead of an fsync per prefix directory: up to 257 of them, one after another).
        func commit() throws {
            let chunks = pending.withLock { $0.filter { !$0.value.isEmpty } }
            guard !chunks.isEmpty else { return }
            try FileSystem.syncFilesystem(of: store.path + "/tmp")
            let moves = chunks.map { (temporary: $0.value, target: store.chunkPath($0.key)) }
            for directory in Set(moves.map { String($0.target[..<$0.target.lastIndex(of: "/")!]) }) {
                try FileSystem.makeDirectory(directory)
            }
            // Thousands of renames (a GPU's memory): on several threads, a share each.
            let shares = min(8, max(1, moves.count / 256))
            let failure = Locked<Error?>(nil)
            DispatchQueue.concurrentPerform(iterations: shares) { share in
                for index in stride(from: share, to: moves.count, by: shares) {
                    do {
                        try FileSystem.rename(moves[index].temporary, to: moves[index].target)
                    } catch {
                        failure.withLock { if $0 == nil { $0 = error } }
                        return
                    }
                }
            }
            if let error = failure.current { throw error }
            pending.withLock { $0 = [:] }
            try FileSystem.syncFilesystem(of: store.path + "/chunks")
        }

        /// Drops the chunks not committed (the ingest failed). A store with a reserve takes their files back as
        /// blanks, up to its target: a failed dump does not use the reserve up.
        func abandon() {
            let files = pending.withLock { $0.values.filter { !$0.isEmpty } }
            let target = files.isEmpty ? 0 : store.reserve.targetBytes
            // A reserve that cannot be listed counts as full: the files are removed, as without one.
            var held = target == 0 ? 0 : (try? store.reserve.status().bytes) ?? target
            for file in files where !store.reserve.recycle(file, target: target, held: &held) { FileSystem.remove(file) }
            pending.withLock { $0 = [:] }
        }
    }

    /// Stores `plain` under `digest` into `batch` (named at its commit) unless the store or the batch has it
    /// already. `scratch` must hold `headerSize + codec.bound(plain.count)` bytes.
    /// `claimed`: the caller has claimed it already (`claim`).
    func put(_ plain: UnsafeRawBufferPointer, digest: String, codec: Codec, scratch: UnsafeMutableRawBufferPointer,
             batch: Batch, probe: Bool = false, claimed: Bool = false) throws -> ChunkPutResult {
        guard claimed || claim(digest, batch: batch, plain: plain) else { return ChunkPutResult(isNew: false, storedBytes: 0) }
        let payload = UnsafeMutableRawBufferPointer(rebasing: scratch[ChunkFormat.headerSize...])
        let header = UnsafeRawBufferPointer(rebasing: scratch[0..<ChunkFormat.headerSize])
        // A chunk that does not shrink is written from `plain` itself after its header: no copy.
        let parts: [UnsafeRawBufferPointer]
        if let compressed = codec.compress(plain, into: payload, probe: probe) {
            ChunkFormat.writeHeader(into: scratch, tag: codec.tag, plainLength: plain.count)
            parts = [UnsafeRawBufferPointer(rebasing: scratch[0..<(ChunkFormat.headerSize + compressed)])]
        } else {
            ChunkFormat.writeHeader(into: scratch, tag: 0, plainLength: plain.count)
            parts = [header, plain]
        }
        batch.written(digest, at: try writeTemporary(parts, digest: digest))
        if let observer = observer.current {
            var file = Data(capacity: parts.reduce(0) { $0 + $1.count })
            for part in parts { file.append(contentsOf: part) }
            observer(digest, file)
        }
        return ChunkPutResult(isNew: true, storedBytes: UInt64(parts.reduce(0) { $0 + $1.count }))
    }

    /// Stores a complete chunk file (header and payload, checked by the caller) under `digest` unless the
    /// store or `batch` has it already: how imports add the chunks a bundle carries.
    func putFile(_ bytes: UnsafeRawBufferPointer, digest: String, batch: Batch) throws -> ChunkPutResult {
        guard claim(digest, batch: batch) else { return ChunkPutResult(isNew: false, storedBytes: 0) }
        batch.written(digest, at: try writeTemporary([bytes], digest: digest))
        return ChunkPutResult(isNew: true, storedBytes: UInt64(bytes.count))
    }

    /// True when `digest` is this writer's to write: the store lacks a known-good copy and `batch` has not
    /// claimed it. `plain`: the chunk's bytes, when the caller has them (a first reuse then compares the stored
    /// chunk with them instead of hashing it).
    func claim(_ digest: String, batch: Batch, plain: UnsafeRawBufferPointer? = nil) -> Bool {
        let target = chunkPath(digest)
        if isKnownGood(target, digest: digest, plain: plain) {
            // Fresh mtime: gc's grace period then spares a chunk a running dump has just decided to reuse.
            utimensat(AT_FDCWD, target, nil, 0)
            return false
        }
        return batch.claim(digest)
    }

    /// Whether the store holds a good copy of `digest` that a writer may count on (a migration's receiver
    /// telling its source which chunks it need not send, an import missing chunks the store has).
    public func has(_ digest: String) -> Bool { Manifest.isDigest(digest) && isKnownGood(chunkPath(digest), digest: digest) }

    /// Mode that marks a chunk file as read back and checked since it was written (chunk files are written
    /// 0600): `isKnownGood` does not read it again.
    static let checkedMode: FilePermissions = .ownerRead

    /// Whether the chunk file at `target` may be reused without writing it again: the only checkpoint of a job
    /// whose tree the dump then ends must not rest on a chunk that was planted or damaged. The first time a
    /// chunk is reused it is read and checked (decoded, its SHA-256 compared with its name) and then marked
    /// (`checkedMode`); later reuses only look at the mark. A damaged chunk, or one that another user owns, is
    /// not reused: the writer puts its own copy in its place.
    /// Each error below only means "do not reuse it": the writer then puts its own copy, which reports its own.
    func isKnownGood(_ target: String, digest: String, plain: UnsafeRawBufferPointer? = nil) -> Bool {
        // Missing or not examinable: not reused.
        guard let status = try? FileSystem.status(target, followingLinks: false),
              status.kind == .regular, status.ownedByThisUser else { return false }
        if status.permissions == Self.checkedMode.rawValue { return true }
        guard (try? check(digest, against: plain)) != nil else { return false }  // damaged: not reused
        // A mark that cannot be set: not reused this time (it would be trusted unread next time).
        return (try? FileSystem.setMode(target, Self.checkedMode.rawValue)) != nil
    }

    /// Writes a chunk file into tmp/ (NAME.PID.RANDOM, so gc can tell a dead writer's leftovers) and starts its
    /// writeback (the batch's syncfs finishes it); returns its path.
    func writeTemporary(_ parts: [UnsafeRawBufferPointer], digest: String) throws -> String {
        let temporary = "\(path)/tmp/\(digest).\(ThisProcess.pid).\(UInt32.random(in: 0...UInt32.max))"
        let total = parts.reduce(0) { $0 + $1.count }
        if writeIntoBlank(parts, total: total, at: temporary) { return temporary }
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(temporary, .writeOnly, options: [.create, .exclusiveCreate], permissions: .ownerReadWrite)
        } catch {
            throw Self.writeError("cannot create", temporary, error)
        }
        defer { fd.closeQuietly() }
        for bytes in parts {
            do {
                try fd.write(all: bytes)
            } catch {
                FileSystem.remove(temporary)
                throw Self.writeError("cannot write", temporary, error)
            }
        }
        fd.startWriteback(offset: 0, length: UInt64(total))
        return temporary
    }

    static func writeError(_ action: String, _ subject: String, _ error: Errno) -> StasisError {
        if error.isNoSpace {
            return StasisError(.noSpace, "the chunk store ran out of space (\(action) \(subject))", hint: "free space there, run `stasis gc`, or use another --store",
                               cause: error)
        }
        return systemError(action, subject, error)
    }

    // MARK: reading

    /// Reads chunk `digest` into `output` (exactly its plain length), checking it (`decode`). `scratch` holds
    /// the chunk file while it is decoded (headerSize + bound bytes); returns the chunk file's size. A chunk
    /// stored plain is read straight into `output` unless `fileInScratch` asks for the whole chunk file to be
    /// left in `scratch` (export copies it as it is). `checkDigest: false` leaves the SHA-256 to a reader that
    /// checks it elsewhere (an agent refill that the GPU hashes where the bytes land).
    @discardableResult
    public func read(_ digest: String, into output: UnsafeMutableRawBufferPointer, scratch: UnsafeMutableRawBufferPointer, place: ChunkPlace,
                     fileInScratch: Bool, checkDigest: Bool) throws -> Int {
        let file = chunkPath(digest)
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(file, .readOnly)
        } catch .noSuchFileOrDirectory {
            throw StasisError(.integrity, "chunk \(digest) of \(place.text) is missing from the store \(path)",
                              hint: "the store lost chunks (removed by hand?); restore from another copy")
        } catch {
            throw systemError("cannot open", file, error)
        }
        defer { fd.closeQuietly() }
        var total = try Self.readUpTo(fd, UnsafeMutableRawBufferPointer(rebasing: scratch[0..<ChunkFormat.headerSize]), file: file)
        let header = UnsafeRawBufferPointer(rebasing: scratch[0..<total])
        if !fileInScratch, ChunkFormat.plainLength(ofChunkFile: header) == output.count, header[5] == 0 {
            // Stored plain (it did not compress): its bytes go straight into `output`, without a copy.
            let got = try Self.readUpTo(fd, output, file: file)
            var extra: UInt8 = 0
            let more = try withUnsafeMutableBytes(of: &extra) { try Self.readUpTo(fd, $0, file: file) }
            guard got == output.count, more == 0 else { throw damaged(digest, place, "its none data does not decode (truncated or corrupt)") }
            guard !checkDigest || ChunkDigest.hex(UnsafeRawBufferPointer(output)) == digest else {
                throw damaged(digest, place, "its content does not match its SHA-256")
            }
            return total + got
        }
        total += try Self.readUpTo(fd, UnsafeMutableRawBufferPointer(rebasing: scratch[total...]), file: file)
        guard total < scratch.count else { throw damaged(digest, place, "longer than any valid chunk") }
        if let why = ChunkFormat.decode(UnsafeRawBufferPointer(rebasing: scratch[0..<total]), digest: checkDigest ? digest : nil, into: output) {
            throw damaged(digest, place, why)
        }
        return total
    }

    /// Copies the chunk files `digests` ("" skipped) from `source` into this store as they are (header and
    /// payload), skipping those it has: how a --leave-running dump moves the device memory it staged in memory
    /// into the store once the job runs again. The chunks were checked where they landed (the refill's check),
    /// so they are not decoded again. Durable and visible when it returns; nothing is, if it throws.
    public func copyChunks(_ digests: [String], from source: any ChunkStore, threads: Int) throws -> (newChunks: Int, storedBytes: UInt64) {
        let unique = Array(Set(digests.filter { !$0.isEmpty }))
        let batch = Batch(store: self)
        let next = Locked(0), totals = Locked((newChunks: 0, storedBytes: UInt64(0)))
        do {
            try WorkerGroup.run(max(1, min(threads, unique.count)), name: "stasis-copy-chunks") { _, failure in
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkFormat.scratchSize(ChunkFormat.chunkSize), alignment: 4096)
                defer { buffer.deallocate() }
                while failure.error == nil, let index = next.takeNext(below: unique.count) {
                    let digest = unique[index]
                    let length = try source.readChunkFile(digest, into: buffer)
                    guard length < buffer.count, ChunkFormat.plainLength(ofChunkFile: UnsafeRawBufferPointer(rebasing: buffer[0..<length])) != nil else {
                        throw StasisError(.integrity, "\(source.chunkFileName(digest)) is not a chunk file")
                    }
                    let put = try self.putFile(UnsafeRawBufferPointer(rebasing: buffer[0..<length]), digest: digest, batch: batch)
                    if put.isNew { totals.withLock { $0.newChunks += 1; $0.storedBytes += put.storedBytes } }
                }
            }
            try batch.commit()
        } catch {
            batch.abandon()
            throw error
        }
        return totals.current
    }

    public func readChunkFile(_ digest: String, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let file = chunkPath(digest)
        let fd = try attempt("cannot open", file) { try FileDescriptor.open(file, .readOnly) }
        defer { fd.closeQuietly() }
        return try Self.readUpTo(fd, buffer, file: file)
    }

    public func chunkFileName(_ digest: String) -> String { chunkPath(digest) }

    public func contains(_ digest: String) -> Bool { FileSystem.exists(chunkPath(digest)) }

    public func storedSize(_ digest: String) -> UInt64? { FileSystem.size(chunkPath(digest)) }

    public func readAhead(_ digest: String, buffer: UnsafeMutableRawBufferPointer) -> UInt64 {
        // A chunk that cannot be opened or read now is skipped: read-ahead only warms the page cache, and the
        // restore's own read of the chunk reports what is wrong with it.
        guard let fd = try? FileDescriptor.open(chunkPath(digest), .readOnly) else { return 0 }
        defer { fd.closeQuietly() }
        // In memory already (a warm page cache, a store on tmpfs): nothing to read ahead.
        if fd.startIsCached() != false { return 0 }
        var read: UInt64 = 0
        while let got = try? fd.readSome(into: buffer), got > 0 { read += UInt64(got) }  // a failed read ends read-ahead (above)
        return read
    }

    /// Reads from `fd` until `buffer` is full or the file ends; returns the bytes read.
    private static func readUpTo(_ fd: FileDescriptor, _ buffer: UnsafeMutableRawBufferPointer, file: String) throws -> Int {
        try attempt("cannot read", file) { try fd.read(filling: buffer) }
    }

    private func damaged(_ digest: String, _ place: ChunkPlace, _ why: String) -> StasisError {
        StasisError(.integrity, "chunk \(digest) of \(place.text) is damaged in the store \(path): \(why)",
                    hint: "restore from another copy of the checkpoint")
    }

    /// Checks one chunk file on its own (decodes it and compares its SHA-256 with its name), for audits of a
    /// store whatever checkpoints use it. `plain`: the chunk's expected bytes, when known: the chunk is compared
    /// with them instead (a memcmp, several times faster than hashing; a chunk stored plain is compared where
    /// it was read, without decoding).
    public func check(_ digest: String, against plain: UnsafeRawBufferPointer? = nil) throws {
        let file = chunkPath(digest)
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(file, .readOnly)
        } catch .noSuchFileOrDirectory {
            throw StasisError(.integrity, "chunk \(digest) is missing from the store \(path)")
        } catch {
            throw systemError("cannot open", file, error)
        }
        defer { fd.closeQuietly() }
        // Two chunk-sized buffers, kept between checks: fresh ones would cost 1024 page faults a check.
        let (buffer, output) = checkBuffers.take()
        defer { checkBuffers.give(buffer, output) }
        let size = try Self.readUpTo(fd, buffer, file: file)
        let bytes = UnsafeRawBufferPointer(rebasing: buffer[0..<size])
        func damaged(_ why: String) -> StasisError { StasisError(.integrity, "chunk \(digest) in the store \(path) is damaged: \(why)") }
        guard size < buffer.count, let length = ChunkFormat.plainLength(ofChunkFile: bytes), length <= ChunkFormat.chunkSize else {
            throw damaged("no chunk header, or longer than any chunk")
        }
        if let plain {
            guard plain.count == length else { throw damaged("it holds \(length) bytes, not \(plain.count)") }
            if bytes[5] == 0 {
                guard size == ChunkFormat.headerSize + length, bytesEqual(plain, UnsafeRawBufferPointer(rebasing: bytes[ChunkFormat.headerSize...])) else {
                    throw damaged("its content is not the chunk's")
                }
                return
            }
        }
        let decoded = UnsafeMutableRawBufferPointer(rebasing: output[0..<length])
        if let why = ChunkFormat.decode(bytes, digest: plain == nil ? digest : nil, into: decoded) { throw damaged(why) }
        if let plain, !bytesEqual(plain, UnsafeRawBufferPointer(decoded)) { throw damaged("its content is not the chunk's") }
    }

    /// The digests of every chunk file in the store. A directory that cannot be listed lists none: gc then
    /// removes nothing from it, and `ls` counts what it could read (opening the store checked every level).
    public func allChunks() -> [String] {
        let chunks = path + "/chunks"
        // Unreadable: none (above).
        return ((try? FileSystem.namesOrNone(in: chunks)) ?? []).flatMap { prefix in
            (try? FileSystem.namesOrNone(in: chunks + "/" + prefix)) ?? []  // unreadable: none (above)
        }
    }

    // MARK: locking

    /// The shared lock for a reader (restore, verify, resume): gc waits while it is held, so no chunk goes
    /// while it is being read, listed or not. nil when the store cannot be locked (read-only): then reading
    /// goes on without it, as gc cannot run there either.
    public func readerLock() -> StoreLock? { try? lock(exclusive: false) }

    public func lock(exclusive: Bool) throws -> StoreLock {
        let file = path + "/lock"
        let fd = try attempt("cannot open", file) { try FileDescriptor.open(file, .readWrite, options: .create, permissions: .ownerReadWrite) }
        do {
            try fd.lock(exclusive: exclusive)
        } catch {
            fd.closeQuietly()
            throw systemError("cannot lock", file, error)
        }
        return StoreLock(fd: fd)
    }
}

/// The chunk file format, the same for every kind of store: a 12-byte header ("STCK", format 1, codec, 2
/// reserved bytes, plain length as little-endian UInt32) and the payload.
public enum ChunkFormat {
    /// Chunks cut from a file are this long (the last one shorter). Part of each manifest, so it may change.
    public static let chunkSize = 2 << 20
    static let magic: [UInt8] = Array("STCK".utf8)
    static let headerSize = 12

    static func writeHeader(into buffer: UnsafeMutableRawBufferPointer, tag: UInt8, plainLength: Int) {
        for (index, byte) in magic.enumerated() { buffer[index] = byte }
        buffer[4] = 1
        buffer[5] = tag
        buffer[6] = 0
        buffer[7] = 0
        withUnsafeBytes(of: UInt32(plainLength).littleEndian) { for index in 0..<4 { buffer[8 + index] = $0[index] } }
    }

    /// The plain length a chunk file's header gives, or nil when `file` does not start with a chunk header.
    static func plainLength(ofChunkFile file: UnsafeRawBufferPointer) -> Int? {
        guard file.count >= headerSize, Array(file[0..<4]) == magic, file[4] == 1 else { return nil }
        return Int(UInt32(file[8]) | UInt32(file[9]) << 8 | UInt32(file[10]) << 16 | UInt32(file[11]) << 24)
    }

    /// Checks a whole chunk file held in memory (header, plain length, decoding, SHA-256 unless `digest` is
    /// nil), decoding it into `output` (exactly the expected plain length). Returns what is wrong, or nil.
    /// Every reader of chunks (restore, verify, export, import) goes through it.
    static func decode(_ file: UnsafeRawBufferPointer, digest: String?, into output: UnsafeMutableRawBufferPointer) -> String? {
        guard let plainLength = plainLength(ofChunkFile: file) else { return "no chunk header" }
        guard plainLength == output.count else { return "it holds \(plainLength) bytes, the manifest expects \(output.count)" }
        guard Codec.decompress(tag: file[5], UnsafeRawBufferPointer(rebasing: file[headerSize...]), into: output) else {
            return "its \(Codec.name(tag: file[5])) data does not decode (truncated or corrupt)"
        }
        guard let digest else { return nil }
        return ChunkDigest.hex(UnsafeRawBufferPointer(output)) == digest ? nil : "its content does not match its SHA-256"
    }

    /// Buffers for `put` and `read` of chunks up to `chunkSize`.
    static func scratchSize(_ chunk: Int = chunkSize) -> Int { headerSize + max(chunk, Codec.zstd(level: 1).bound(chunk), Codec.lz4.bound(chunk)) + 1 }
}

/// Where the chunk store is when nothing else says so.
public enum StoreLocation {
    public static let defaultPath = "/var/lib/stasis/store"

    /// The store named on the command line, else the one the manifest recorded, else the default.
    public static func resolve(_ explicit: String?, recorded: String?) -> String {
        explicit ?? recorded ?? ProcessInfo.processInfo.environment["STASIS_STORE"] ?? defaultPath
    }
}

/// Where a chunk belongs, for error messages: the checkpoint, the file and the byte range.
public struct ChunkPlace: Sendable {
    public var checkpoint: String
    public var file: String
    public var offset: UInt64
    public var length: Int
    public init(checkpoint: String, file: String, offset: UInt64, length: Int) {
        self.checkpoint = checkpoint
        self.file = file
        self.offset = offset
        self.length = length
    }
    var text: String { "\(checkpoint)/\(file) bytes \(offset)..<\(offset + UInt64(length))" }
}


/// What putting one chunk did.
public struct ChunkPutResult: Sendable {
    public var isNew: Bool
    /// Bytes of the chunk file written (0 when the chunk was already there).
    public var storedBytes: UInt64
    public init(isNew: Bool, storedBytes: UInt64) {
        self.isNew = isNew
        self.storedBytes = storedBytes
    }
}

/// Holds the store's lock until `release` (or the process ends). Dumps and imports hold it shared from
/// their first chunk until their manifest is registered; gc holds it exclusive.
public final class StoreLock: Sendable {
    let fd: FileDescriptor
    init(fd: FileDescriptor) { self.fd = fd }
    public func release() { fd.closeQuietly() }
}


/// SHA-256 of chunk contents, as lowercase hex.
public enum ChunkDigest {
    public static func hex(_ bytes: UnsafeRawBufferPointer) -> String { SegmentedDigest.hex(SHA256.hash(data: bytes)) }

    /// A chunked file's identity: the SHA-256 of its chunks' digests in order (32 zero bytes for a zero chunk).
    public static func ofFile(chunks: [String]) -> String {
        var hasher = SHA256()
        for chunk in chunks {
            var bytes = [UInt8](repeating: 0, count: 32)
            if !chunk.isEmpty {
                var index = chunk.startIndex
                for position in 0..<32 {
                    let next = chunk.index(index, offsetBy: 2)
                    bytes[position] = UInt8(chunk[index..<next], radix: 16) ?? 0
                    index = next
                }
            }
            hasher.update(data: bytes)
        }
        return SegmentedDigest.hex(hasher.finalize())
    }

    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var index = 0
        let words = bytes.count / 8
        let base = bytes.baseAddress!
        while index < words {
            if base.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self) != 0 { return false }
            index += 1
        }
        for offset in (words * 8)..<bytes.count where bytes[offset] != 0 { return false }
        return true
    }
}

/// Pairs of buffers (a chunk file, a decoded chunk) that `DirectoryChunkStore.check` takes and gives back, so that the
/// checks of a dump's first reuses, on every ingest thread, do not map and fault in fresh memory each time.
final class BufferPairs: Sendable {
    typealias Pair = (file: UnsafeMutableRawBufferPointer, plain: UnsafeMutableRawBufferPointer)
    // Sendable: the buffers are only ever used by the one thread that took them.
    private let free = Locked<[(UnsafeMutableRawBufferPointer, UnsafeMutableRawBufferPointer)]>([])

    func take() -> Pair {
        if let pair = free.withLock({ $0.popLast() }) { return pair }
        return (.allocate(byteCount: ChunkFormat.scratchSize(), alignment: 4096), .allocate(byteCount: ChunkFormat.chunkSize, alignment: 4096))
    }

    func give(_ file: UnsafeMutableRawBufferPointer, _ plain: UnsafeMutableRawBufferPointer) { free.withLock { $0.append((file, plain)) } }

    deinit {
        for (file, plain) in free.withLock({ $0 }) { file.deallocate(); plain.deallocate() }
    }
}
