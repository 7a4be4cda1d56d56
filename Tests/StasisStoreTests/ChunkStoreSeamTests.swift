import Foundation
import StasisCore
import StasisOS
import StasisStore
import StasisTestSupport
import Testing

/// The chunk store through its protocol (`any ChunkStore`), as the engine, the GPU code and bundles use it.
@Suite struct ChunkStoreSeam {
    func chunk(_ seed: UInt8, _ count: Int = 300_000) -> Data { Data((0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31) ^ seed }) }

    /// Puts `chunks` through one batch and commits it; returns their digests. Each is new, and not visible under
    /// its name before the commit.
    func put(_ chunks: [Data], into store: any ChunkStore) throws -> [String] {
        try putChunks(chunks, into: store, probe: false) { digest, result in
            #expect(result.isNew)
            #expect(!store.contains(digest))
        }
    }

    @Test func chunksPutThroughTheProtocolAreReadCheckedAndListed() throws {
        let root = Harness.scratch("seam")
        defer { FileSystem.removeTree(root) }
        let store: any ChunkStore = try ChunkStores.open(kind: .directory, path: root + "/store", create: true)
        #expect(store.kind == .directory)
        let chunks = [chunk(1), chunk(2)]
        let digests = try put(chunks, into: store)
        #expect(Set(store.allChunks()) == Set(digests))
        for (digest, data) in zip(digests, chunks) {
            #expect(store.has(digest))
            #expect(store.contains(digest))
            #expect((store.storedSize(digest) ?? 0) > 0)
            try store.check(digest)
            let output = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count, alignment: 4096)
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkSink.scratchSize(), alignment: 4096)
            defer { output.deallocate(); scratch.deallocate() }
            try store.read(digest, into: output, scratch: scratch, place: ChunkPlace(checkpoint: "c", file: "f", offset: 0, length: data.count))
            #expect(Data(output) == data)
        }
        // A chunk put again is claimed by no one: the store has it.
        #expect(!store.makeBatch().claim(digests[0]))
        let missing = String(repeating: "0", count: 64)
        #expect(!store.has(missing) && !store.contains(missing) && store.storedSize(missing) == nil)
        let error = try #require(throws: StasisError.self) { try store.check(missing) }
        #expect(error.code == .integrity)
    }

    @Test func aDamagedChunkIsFoundThroughTheProtocol() throws {
        let root = Harness.scratch("seam-damage")
        defer { FileSystem.removeTree(root) }
        let store: any ChunkStore = try ChunkStores.open(path: root + "/store", create: true)
        let digest = try put([chunk(3)], into: store)[0]
        // The stored file, damaged behind the store's back (its last byte flipped).
        let file = store.chunkFileName(digest)
        var bytes = try Data(contentsOf: URL(fileURLWithPath: file))
        bytes[bytes.count - 1] ^= 0xFF
        try FileSystem.setMode(file, 0o600)
        try bytes.write(to: URL(fileURLWithPath: file))
        let error = try #require(throws: StasisError.self) { try store.check(digest) }
        #expect(error.code == .integrity)
        #expect(!store.has(digest))
    }

    @Test func chunksCopyBetweenStoresAsTheyAre() throws {
        let root = Harness.scratch("seam-copy")
        defer { FileSystem.removeTree(root) }
        let source: any ChunkStore = try ChunkStores.open(path: root + "/source", create: true)
        let target: any ChunkStore = try ChunkStores.open(path: root + "/target", create: true)
        let digests = try put([chunk(4), chunk(5)], into: source)
        let copied = try target.copyChunks(digests + [""], from: source, threads: 2)
        #expect(copied.newChunks == 2)
        for digest in digests { try target.check(digest) }
        #expect(try target.copyChunks(digests, from: source, threads: 2).newChunks == 0)
    }

    @Test func theStoreLocksThroughTheProtocolAndAMissingStoreIsRefused() throws {
        let root = Harness.scratch("seam-lock")
        defer { FileSystem.removeTree(root) }
        let store: any ChunkStore = try ChunkStores.open(path: root + "/store", create: true)
        let shared = try store.lock(exclusive: false)
        let reader = try #require(store.readerLock())
        shared.release()
        reader.release()
        try store.lock(exclusive: true).release()
        let error = try #require(throws: StasisError.self) { try ChunkStores.open(path: root + "/none", create: false) }
        #expect(error.code == .notACheckpoint)
    }
}
