import Foundation
import StasisCore

/// Puts chunks given as bytes into a store, from any number of threads: a zero chunk is only counted, any
/// other is hashed and, unless the store has it, compressed and written into one batch. Nothing is visible
/// under its name before `commit`. Used by the ingester (chunks read from CRIU's files) and by the agent
/// transfer (chunks read from a GPU process's staging ring).
// @unchecked Sendable: its one mutable value, `statistics`, is `Locked`; the store and batch are Sendable.
public final class ChunkSink: @unchecked Sendable {
    public let store: ChunkStore
    public let codec: Codec
    /// Probe each chunk's first 64 KiB before compressing it all (see `Codec.probeBytes`).
    public let probe: Bool
    private let batch: any ChunkBatch
    private let statistics = Locked(ChunkIngester.Statistics())
    private let adopted = Locked(0)

    public init(store: ChunkStore, codec: Codec, probe: Bool = false) {
        self.store = store
        self.codec = codec
        self.probe = probe
        self.batch = store.makeBatch()
    }

    /// Bytes each caller's scratch buffer must hold for chunks of `chunkSize`.
    public static func scratchSize(chunkSize: Int = ChunkFormat.chunkSize) -> Int { ChunkFormat.scratchSize(chunkSize) }

    /// Stores one chunk; returns its digest, "" for a chunk of zeros.
    public func put(_ bytes: UnsafeRawBufferPointer, scratch: UnsafeMutableRawBufferPointer) throws -> String {
        let zero = ChunkDigest.isZero(bytes)
        var digest = ""
        var put = ChunkPutResult(isNew: false, storedBytes: 0)
        if !zero {
            digest = ChunkDigest.hex(bytes)
            put = try batch.put(bytes, digest: digest, codec: codec, scratch: scratch, probe: probe, claimed: false)
        }
        statistics.withLock { statistics in
            statistics.plainBytes += UInt64(bytes.count)
            statistics.storedBytes += put.storedBytes
            if zero { statistics.zeroChunks += 1 } else if put.isNew { statistics.newChunks += 1 } else { statistics.reusedChunks += 1 }
        }
        return digest
    }

    /// For a chunk whose digest is known without hashing it here (the GPU hashed it): true when its bytes
    /// are needed, and they are then this caller's to `putHashed`; false when the store or this batch has it
    /// (counted as reused, nothing to read).
    public func needs(_ digest: String, length: Int) -> Bool {
        if batch.claim(digest) { return true }
        statistics.withLock { statistics in
            statistics.plainBytes += UInt64(length)
            statistics.reusedChunks += 1
        }
        return false
    }

    /// Stores the bytes of a chunk that `needs` asked for, under its known digest, without hashing them again.
    public func putHashed(_ bytes: UnsafeRawBufferPointer, digest: String, scratch: UnsafeMutableRawBufferPointer) throws {
        let put = try batch.put(bytes, digest: digest, codec: codec, scratch: scratch, probe: probe, claimed: true)
        statistics.withLock { statistics in
            statistics.plainBytes += UInt64(bytes.count)
            statistics.storedBytes += put.storedBytes
            statistics.newChunks += 1
        }
    }

    /// Takes arena piece `name` as the chunk `needs` asked for (the agent copied it there by DMA).
    public func adoptPiece(_ name: String, length: Int, digest: String) throws {
        let put = try batch.adoptPiece(name, length: length, digest: digest)
        statistics.withLock { statistics in
            statistics.plainBytes += UInt64(length)
            statistics.storedBytes += put.storedBytes
            statistics.newChunks += 1
        }
        adopted.withLock { $0 += 1 }
    }

    /// Chunks taken from arena pieces so far.
    public var adoptedPieces: Int { adopted.current }

    /// The reserve directory where agents' arenas for this sink's store live, nil for a store without one.
    public var arenaDirectory: String? { (store as? DirectoryChunkStore)?.arenaDirectory }

    /// Counts a chunk of zeros that was never copied (the GPU found it zero).
    public func countZero(length: Int) {
        statistics.withLock { statistics in
            statistics.plainBytes += UInt64(length)
            statistics.zeroChunks += 1
        }
    }

    public var totals: ChunkIngester.Statistics { statistics.current }

    /// Makes every chunk put so far durable and visible (one syncfs, renames, one syncfs).
    public func commit() throws {
        do {
            try batch.commit()
        } catch {
            batch.abandon()
            throw error
        }
    }

    /// Drops the chunks not committed.
    public func abandon() { batch.abandon() }
}

extension ChunkStore {
    /// Reads chunk `digest` into `output` (its whole plain length) and checks it against its digest unless
    /// `checkDigest` is false (the caller checks where the bytes end up); `scratch` holds
    /// `ChunkSink.scratchSize` bytes. `place` names it in errors.
    public func readChunk(_ digest: String, into output: UnsafeMutableRawBufferPointer, scratch: UnsafeMutableRawBufferPointer,
                          place: ChunkPlace, checkDigest: Bool = true) throws {
        try read(digest, into: output, scratch: scratch, place: place, fileInScratch: false, checkDigest: checkDigest)
    }
}
