import StasisCore

/// A local store whose chunks are still arriving (a pull from a registry that a restore overlaps): a chunk
/// still to come counts as present, and a read of it waits until the producer has stored it, checked against
/// its digest, durable and visible in `local`; then the read is `local`'s, which checks it again as every read
/// does. If the producer fails, a read waiting for a chunk it did not bring fails with the producer's error, so
/// a restore never runs on bytes that did not arrive. Everything else is `local`'s.
public final class ArrivingChunkStore: ChunkStore {
    public let local: any ChunkStore
    public let arrivals: PendingNames

    public init(local: any ChunkStore, arrivals: PendingNames) {
        self.local = local
        self.arrivals = arrivals
    }

    public var kind: Manifest.StoreKind { local.kind }
    public var path: String { local.path }

    public func has(_ digest: String) -> Bool { arrivals.isPending(digest) || local.has(digest) }
    public func contains(_ digest: String) -> Bool { arrivals.isPending(digest) || local.contains(digest) }
    public func storedSize(_ digest: String) -> UInt64? { local.storedSize(digest) }

    @discardableResult
    public func read(_ digest: String, into output: UnsafeMutableRawBufferPointer, scratch: UnsafeMutableRawBufferPointer, place: ChunkPlace,
                     fileInScratch: Bool, checkDigest: Bool) throws -> Int {
        try arrivals.wait(for: digest)
        return try local.read(digest, into: output, scratch: scratch, place: place, fileInScratch: fileInScratch, checkDigest: checkDigest)
    }

    public func readChunkFile(_ digest: String, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        try arrivals.wait(for: digest)
        return try local.readChunkFile(digest, into: buffer)
    }

    public func chunkFileName(_ digest: String) -> String { local.chunkFileName(digest) }

    public func check(_ digest: String, against plain: UnsafeRawBufferPointer?) throws {
        try arrivals.wait(for: digest)
        try local.check(digest, against: plain)
    }

    public func allChunks() -> [String] { local.allChunks() }

    /// A chunk still to come is not read ahead: the pull brings it, and a read ahead must never wait.
    public func readAhead(_ digest: String, buffer: UnsafeMutableRawBufferPointer) -> UInt64 {
        arrivals.isPending(digest) ? 0 : local.readAhead(digest, buffer: buffer)
    }

    public func makeBatch() -> any ChunkBatch { local.makeBatch() }
    public func copyChunks(_ digests: [String], from source: any ChunkStore, threads: Int) throws -> (newChunks: Int, storedBytes: UInt64) {
        try local.copyChunks(digests, from: source, threads: threads)
    }
    public func observe(_ body: ChunkObserver?) { local.observe(body) }
    public func lock(exclusive: Bool) throws -> StoreLock { try local.lock(exclusive: exclusive) }
    public func readerLock() -> StoreLock? { local.readerLock() }
}
