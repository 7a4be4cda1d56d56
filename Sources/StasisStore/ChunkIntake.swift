import Foundation
import StasisCore

extension CheckpointBundle.ImportStatistics {
    static func + (a: Self, b: Self) -> Self {
        var sum = a
        sum.files += b.files; sum.fileBytes += b.fileBytes; sum.chunks += b.chunks; sum.newChunks += b.newChunks
        sum.reusedChunks += b.reusedChunks; sum.storedBytes += b.storedBytes; sum.bundleBytes += b.bundleBytes
        return sum
    }
}

/// Chunks arriving in a bundle, decoded, checked against their digests and written to the store on several
/// threads while the reader goes on reading the next ones: one thread hashing a migration's chunks was its
/// bottleneck (0.3 GB/s). A bounded set of buffers keeps memory fixed and makes the reader wait when all
/// are in use; the first failure stops the intake.
// @unchecked Sendable: its free buffers and statistics are `Locked`, its failure a `FirstFailure`; a buffer belongs to one thread at a time.
final class ChunkIntake: @unchecked Sendable {
    private let store: ChunkStore
    private let batch: any ChunkBatch
    private let files: [UnsafeMutableRawBufferPointer]
    private let plains: [UnsafeMutableRawBufferPointer]
    private let available: DispatchSemaphore
    private let group = DispatchGroup()
    private let queue = DispatchQueue(label: "stasis.chunk-intake", attributes: .concurrent)
    private let free: Locked<[Int]>
    private let failure = FirstFailure()
    /// What was stored so far; `finished` once `finish` has handed it out.
    private let totals = Locked((statistics: CheckpointBundle.ImportStatistics(), finished: false))

    init(store: ChunkStore, batch: any ChunkBatch, chunkSize: Int) {
        let count = max(2, min(16, ProcessInfo.processInfo.activeProcessorCount))
        (self.store, self.batch) = (store, batch)
        files = (0..<count).map { _ in .allocate(byteCount: ChunkFormat.scratchSize(chunkSize), alignment: 4096) }
        plains = (0..<count).map { _ in .allocate(byteCount: chunkSize, alignment: 4096) }
        available = DispatchSemaphore(value: count)
        free = Locked(Array(0..<count))
    }

    deinit {
        group.wait()
        files.forEach { $0.deallocate() }
        plains.forEach { $0.deallocate() }
    }

    /// Takes a free buffer, has `fill` read the chunk file's `length` bytes into it (on this thread), and
    /// checks and stores it on another. Throws the first failure of any earlier chunk.
    /// `damaged`: the error for a chunk that fails its check, "{why}" standing for the reason. `plainLength`:
    /// what the manifest says the chunk holds; nil to take its header's word (up to a chunk's size).
    func submit(length: Int, plainLength: Int?, digest: String, damaged: StasisError,
                fill: (UnsafeMutableRawBufferPointer) throws -> Void) throws {
        available.wait()
        let index = free.withLock { $0.removeLast() }
        if let failure = failure.error { release(index); throw failure }
        do { try fill(UnsafeMutableRawBufferPointer(rebasing: files[index][0..<length])) } catch { release(index); throw error }
        queue.async(group: group) { [self] in
            defer { release(index) }
            let bytes = UnsafeRawBufferPointer(rebasing: files[index][0..<length])
            let expected = plainLength ?? min(ChunkFormat.plainLength(ofChunkFile: bytes) ?? 0, plains[index].count)
            let output = UnsafeMutableRawBufferPointer(rebasing: plains[index][0..<expected])
            do {
                if let why = ChunkFormat.decode(bytes, digest: digest, into: output) {
                    var error = damaged
                    error.message = error.message.replacingOccurrences(of: "{why}", with: why)
                    throw error
                }
                let put = try batch.putFile(bytes, digest: digest)
                totals.withLock { totals in
                    totals.statistics.chunks += 1
                    if put.isNew {
                        totals.statistics.newChunks += 1
                        totals.statistics.storedBytes += put.storedBytes
                    } else {
                        totals.statistics.reusedChunks += 1
                    }
                }
            } catch {
                failure.set(error)
            }
        }
    }

    private func release(_ index: Int) {
        free.withLock { $0.append(index) }
        available.signal()
    }

    /// Waits for every chunk submitted; their statistics, or the first failure.
    func finish() throws -> CheckpointBundle.ImportStatistics {
        group.wait()
        try failure.check()
        return totals.withLock { totals in
            defer { totals = (.init(), true) }
            return totals.finished ? .init() : totals.statistics
        }
    }
}

/// Chunk files arriving one by one (a migration's, while the source's dump still runs): each is checked
/// against its digest and written to the store on several threads; `finish` waits for them and gives them
/// their names.
// @unchecked Sendable: as ChunkIntake, which it wraps.
public final class ChunkReceiver: @unchecked Sendable {
    private let batch: any ChunkBatch
    private let intake: ChunkIntake
    private let plainLength = Locked<[String: Int]>([:])

    public init(store: ChunkStore) {
        batch = store.makeBatch()
        intake = ChunkIntake(store: store, batch: batch, chunkSize: ChunkFormat.chunkSize)
    }

    /// Checks and stores one chunk file of `length` bytes (header and payload, as a store keeps it), which
    /// `fill` reads straight into the intake's buffer (from the connection: no copy in between); `from` names
    /// its sender.
    public func submit(digest: String, length: Int, from: String, fill: (UnsafeMutableRawBufferPointer) throws -> Void) throws {
        guard length > 0, length < ChunkFormat.scratchSize(ChunkFormat.chunkSize) else {
            throw StasisError(.integrity, "chunk \(digest) from \(from) claims \(length) bytes, not a chunk file's")
        }
        let damaged = StasisError(.integrity, "chunk \(digest) from \(from) is damaged: {why}")
        try intake.submit(length: length, plainLength: nil, digest: digest, damaged: damaged, fill: fill)
    }

    /// Waits for every chunk, then makes them durable and visible; their statistics, or the first failure.
    public func finish() throws -> CheckpointBundle.ImportStatistics {
        do {
            let statistics = try intake.finish()
            try batch.commit()
            return statistics
        } catch {
            batch.abandon()
            throw error
        }
    }
}
