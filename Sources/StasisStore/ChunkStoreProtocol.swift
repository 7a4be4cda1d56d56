import Foundation
import StasisCore

/// A place that keeps content-addressed chunks (named by the SHA-256 of their plain content) for many
/// checkpoints: what dumps write into, restores, verifies, exports and agents read from. Today there is one
/// kind, `DirectoryChunkStore` (a directory on this machine); `ChunkStores.open` is where a kind is chosen.
///
/// Every chunk a store hands back is checked (decoded, its SHA-256 compared with its name) unless the caller
/// says it checks it elsewhere; a chunk is never visible under its name before its bytes are durable.
public protocol ChunkStore: AnyObject, Sendable {
    /// What kind of store this is; the manifest records it beside `path`.
    var kind: Manifest.StoreKind { get }
    /// Where the store is: for a directory store, its directory (standardized). Recorded in manifests, named
    /// in messages, and where its catalog and writers' records live.
    var path: String { get }

    // MARK: reading

    /// Whether the store holds a good copy of `digest` that a writer may count on (checked once, then trusted).
    func has(_ digest: String) -> Bool
    /// Whether a chunk is stored under `digest`, unread: a restore's check that nothing is missing.
    func contains(_ digest: String) -> Bool
    /// The bytes `digest` takes in the store (its chunk file), nil when it is not there.
    func storedSize(_ digest: String) -> UInt64?
    /// Reads chunk `digest` into `output` (exactly its plain length), checking it unless `checkDigest` is false.
    /// `scratch` holds `ChunkFormat.scratchSize` bytes; with `fileInScratch` it is left holding the whole chunk
    /// file. Returns the chunk file's size.
    @discardableResult
    func read(_ digest: String, into output: UnsafeMutableRawBufferPointer, scratch: UnsafeMutableRawBufferPointer, place: ChunkPlace,
              fileInScratch: Bool, checkDigest: Bool) throws -> Int
    /// Reads the stored chunk file of `digest` (header and payload) as it is, unchecked, into `buffer`;
    /// returns its length (`buffer.count` or more means it did not fit).
    func readChunkFile(_ digest: String, into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    /// Names a chunk's stored file in messages.
    func chunkFileName(_ digest: String) -> String
    /// Checks one stored chunk (decodes it, compares it with `plain` when given, else with its name).
    func check(_ digest: String, against plain: UnsafeRawBufferPointer?) throws
    /// The digests of every chunk in the store.
    func allChunks() -> [String]
    /// Brings chunk `digest` closer for a read soon (the page cache), reading it into `buffer` piece by piece
    /// when it is not there yet; returns the bytes read (0 when it was close already or cannot be read now).
    func readAhead(_ digest: String, buffer: UnsafeMutableRawBufferPointer) -> UInt64

    // MARK: writing

    /// A batch for the chunks of one ingest, import or copy: nothing it puts is visible before its `commit`.
    func makeBatch() -> any ChunkBatch
    /// Copies the chunk files `digests` ("" skipped) from `source` as they are, skipping those it has.
    func copyChunks(_ digests: [String], from source: any ChunkStore, threads: Int) throws -> (newChunks: Int, storedBytes: UInt64)
    /// Told of every new chunk a writer of this store instance puts, on the writer's thread.
    func observe(_ body: ChunkObserver?)

    // MARK: locking

    /// Dumps and imports hold the lock shared from their first chunk until their manifest is registered; gc
    /// holds it exclusive.
    func lock(exclusive: Bool) throws -> StoreLock
    /// The shared lock for a reader, or nil when the store cannot be locked (read-only): reading goes on.
    func readerLock() -> StoreLock?
}

extension ChunkStore {
    /// Reads and checks chunk `digest` into `output`; returns the chunk file's size.
    @discardableResult
    public func read(_ digest: String, into output: UnsafeMutableRawBufferPointer, scratch: UnsafeMutableRawBufferPointer,
                     place: ChunkPlace) throws -> Int {
        try read(digest, into: output, scratch: scratch, place: place, fileInScratch: false, checkDigest: true)
    }

    /// Reads chunk `digest` into `output`, leaving the whole chunk file in `scratch` when `fileInScratch`.
    @discardableResult
    public func read(_ digest: String, into output: UnsafeMutableRawBufferPointer, scratch: UnsafeMutableRawBufferPointer,
                     place: ChunkPlace, fileInScratch: Bool) throws -> Int {
        try read(digest, into: output, scratch: scratch, place: place, fileInScratch: fileInScratch, checkDigest: true)
    }

    public func check(_ digest: String) throws { try check(digest, against: nil) }
}

/// The new chunks of one writer, put from any number of threads and made durable and visible together by
/// `commit` (or dropped by `abandon`). Until then the batch answers for its own chunks.
public protocol ChunkBatch: AnyObject, Sendable {
    /// True when `digest` is this writer's to put: the store lacks a known-good copy and the batch has not
    /// claimed it. `plain`: the chunk's bytes, when the caller has them (a first reuse compares with them).
    func claim(_ digest: String, plain: UnsafeRawBufferPointer?) -> Bool
    /// Stores `plain` under `digest` (compressed with `codec` when it shrinks) unless the store or the batch
    /// has it; `claimed`: the caller has claimed it already. `scratch` holds `ChunkFormat.scratchSize` bytes.
    func put(_ plain: UnsafeRawBufferPointer, digest: String, codec: Codec, scratch: UnsafeMutableRawBufferPointer,
             probe: Bool, claimed: Bool) throws -> ChunkPutResult
    /// Stores a complete chunk file (header and payload, checked by the caller) under `digest`.
    func putFile(_ bytes: UnsafeRawBufferPointer, digest: String) throws -> ChunkPutResult
    /// Takes piece `name` of an agent's arena in the store's reserve (`ArenaPieces`) as the file of chunk
    /// `digest` (`length` plain bytes, claimed by the caller), without reading it. Only a directory store has
    /// arenas; any other kind refuses.
    func adoptPiece(_ name: String, length: Int, digest: String) throws -> ChunkPutResult
    func commit() throws
    func abandon()
}

extension ChunkBatch {
    public func claim(_ digest: String) -> Bool { claim(digest, plain: nil) }
}

/// Told of every new chunk a writer puts (its digest and its file's bytes, header included), on the writer's
/// thread: how a migration sends chunks while its dump still produces them.
public typealias ChunkObserver = @Sendable (_ digest: String, _ file: Data) -> Void

/// Where kinds of chunk store are chosen: the one place that maps a manifest's store kind to its implementation.
public enum ChunkStores {
    /// Opens the store of `kind` at `path`; `create` makes it when missing, else a missing store is an error.
    public static func open(kind: Manifest.StoreKind = .directory, path: String, create: Bool) throws -> any ChunkStore {
        switch kind {
        case .directory: try DirectoryChunkStore(path: path, create: create)
        }
    }

    /// Opens the store a manifest names: its recorded kind (a directory when it names none, as every manifest
    /// written before kinds were recorded) at `explicit`, else its recorded path, else the default.
    public static func open(for info: Manifest.StoreInfo, explicit: String?) throws -> any ChunkStore {
        try open(kind: try info.storeKind(), path: StoreLocation.resolve(explicit, recorded: info.path), create: false)
    }
}
