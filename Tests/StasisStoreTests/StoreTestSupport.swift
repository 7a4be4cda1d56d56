import Foundation
import StasisCore
import StasisStore

/// Puts `chunks` through one batch of `store` and commits it; `checkEach` sees each chunk's digest and what
/// putting it did, before the commit. Returns the digests.
func putChunks(_ chunks: [Data], into store: any ChunkStore, probe: Bool,
               checkEach: (String, ChunkPutResult) -> Void = { _, _ in }) throws -> [String] {
    let batch = store.makeBatch()
    let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkSink.scratchSize(), alignment: 4096)
    defer { scratch.deallocate() }
    let digests = try chunks.map { data in
        try data.withUnsafeBytes { bytes in
            let digest = ChunkDigest.hex(bytes)
            checkEach(digest, try batch.put(bytes, digest: digest, codec: .lz4, scratch: scratch, probe: probe, claimed: false))
            return digest
        }
    }
    try batch.commit()
    return digests
}
