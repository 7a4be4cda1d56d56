import Foundation
import StasisCore
import StasisOS
@testable import StasisStore
import StasisTestSupport
import Testing

/// A store's reserve of blank chunk files (`stasis reserve`): chunks written into blanks read back as written,
/// use the blanks up, and gc gives removed chunk files back to the reserve up to its target; a blank of the
/// wrong size still ends up holding exactly its chunk.
@Suite struct ChunkReserveTests {
    static let chunk = ChunkFormat.chunkSize

    func makeStore(_ name: String) throws -> (root: String, store: DirectoryChunkStore) {
        let root = Harness.scratch(name)
        return (root, try DirectoryChunkStore(path: root + "/store", create: true))
    }

    /// A whole chunk that does not compress (stored as it is: the size of a blank), or a small one that does.
    func data(_ seed: UInt64, incompressible: Bool = true) -> Data {
        guard incompressible else { return Data(repeating: UInt8(truncatingIfNeeded: seed), count: 300_000) }
        var state = seed &+ 0x9E37_79B9_7F4A_7C15
        return Data((0..<Self.chunk).map { _ in
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return UInt8(truncatingIfNeeded: state >> 33)
        })
    }

    func put(_ chunks: [Data], into store: DirectoryChunkStore) throws -> [String] { try putChunks(chunks, into: store, probe: true) }

    func readBack(_ digest: String, _ expected: Data, from store: DirectoryChunkStore) throws {
        let output = UnsafeMutableRawBufferPointer.allocate(byteCount: expected.count, alignment: 4096)
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkSink.scratchSize(), alignment: 4096)
        defer { output.deallocate(); scratch.deallocate() }
        try store.read(digest, into: output, scratch: scratch, place: ChunkPlace(checkpoint: "c", file: "f", offset: 0, length: expected.count))
        #expect(Data(output) == expected)
    }

    @Test func chunksWrittenIntoBlanksReadBackAndUseThemUp() throws {
        let (root, store) = try makeStore("reserve-use")
        defer { FileSystem.removeTree(root) }
        var status = try store.reserve.resize(to: UInt64(4 * Self.chunk), threads: 2)
        #expect(status.blanks == 4 && status.bytes == UInt64(4 * Self.chunk) && status.targetBytes == UInt64(4 * Self.chunk))
        // Three whole chunks and one that compresses (a blank cut to its length): four blanks used.
        let chunks = [data(1), data(2), data(3), data(4, incompressible: false)]
        let digests = try put(chunks, into: store)
        #expect(try store.reserve.status().blanks == 0)
        for (digest, expected) in zip(digests, chunks) { try readBack(digest, expected, from: store) }
        #expect(store.storedSize(digests[0]) == UInt64(ChunkReserve.blankSize))
        #expect((store.storedSize(digests[3]) ?? 0) < 100_000)
        #expect(try FileSystem.status(store.chunkPath(digests[0]))?.permissions == 0o600)
        // No blank left: a chunk goes into a new file, as without a reserve.
        let more = try put([data(5)], into: store)
        try readBack(more[0], data(5), from: store)
        // Smaller again: the blanks over the target go.
        _ = try store.reserve.resize(to: UInt64(2 * Self.chunk), threads: 2)
        _ = try store.reserve.resize(to: UInt64(Self.chunk), threads: 2)
        status = try store.reserve.status()
        #expect(status.blanks == 1 && status.targetBytes == UInt64(Self.chunk))
        _ = try store.reserve.resize(to: 0, threads: 1)
        #expect(try store.reserve.status().blanks == 0)
    }

    @Test func gcGivesRemovedChunksToTheReserveUpToItsTarget() throws {
        let (root, store) = try makeStore("reserve-gc")
        defer { FileSystem.removeTree(root) }
        _ = try store.reserve.resize(to: UInt64(3 * Self.chunk), threads: 2)
        // Four chunks (three into blanks), no checkpoint names them: gc removes all four, the reserve takes
        // three back (one compressed, extended to a blank's size) and the fourth is deleted.
        _ = try put([data(1), data(2), data(3, incompressible: false), data(4)], into: store)
        #expect(try store.reserve.status().blanks == 0)
        let report = try StoreCatalog(store: store).collect(graceSeconds: 0)
        #expect(report.removedChunks == 4 && report.reservedChunks == 3)
        #expect(store.allChunks().isEmpty)
        let blanks = try FileSystem.namesOrNone(in: store.reserve.directory).filter { $0.hasPrefix("blank-") }
        #expect(blanks.count == 3)
        for name in blanks {
            let status = try #require(try FileSystem.status(store.reserve.directory + "/" + name))
            #expect(status.size == UInt64(ChunkReserve.blankSize) && status.permissions == 0o600)
        }
        // Recycled blanks are written into like new ones.
        let again = [data(6), data(7)]
        for (digest, expected) in zip(try put(again, into: store), again) { try readBack(digest, expected, from: store) }
        #expect(try store.reserve.status().blanks == 1)
        // A dry run takes nothing.
        let dry = try StoreCatalog(store: store).collect(dryRun: true, graceSeconds: 0)
        #expect(dry.reservedChunks == 0 && store.allChunks().count == 2)
    }

    @Test func aBlankOfAnotherSizeStillHoldsExactlyTheChunk() throws {
        let (root, store) = try makeStore("reserve-sizes")
        defer { FileSystem.removeTree(root) }
        try FileSystem.makePrivateDirectory(store.reserve.directory)
        // Blanks someone shortened or lengthened: each chunk written into one is extended or cut to its size.
        try FileSystem.writeAtomically(Data(count: 100), to: store.reserve.directory + "/blank-short")
        try FileSystem.writeAtomically(Data(repeating: 0xAB, count: 3 << 20), to: store.reserve.directory + "/blank-long")
        let chunks = [data(9), data(10, incompressible: false)]
        let digests = try put(chunks, into: store)
        for (digest, expected) in zip(digests, chunks) { try readBack(digest, expected, from: store) }
        #expect(try store.reserve.status().blanks == 0)
        #expect(store.storedSize(digests[0]) == UInt64(ChunkReserve.blankSize))
        #expect((store.storedSize(digests[1]) ?? 0) < 100_000)
    }

    /// A file outside the store, and a link to it in the reserve named `name`; returns the file's path.
    func plantLink(named name: String, in store: DirectoryChunkStore, root: String) throws -> String {
        try FileSystem.makePrivateDirectory(store.reserve.directory)
        let outside = root + "/outside"
        try FileSystem.writeAtomically(Data("keep me".utf8), to: outside)
        #expect(symlink(outside, store.reserve.directory + "/" + name) == 0)
        return outside
    }

    @Test func aBlankThatIsALinkIsNeverWrittenThrough() throws {
        let (root, store) = try makeStore("reserve-link")
        defer { FileSystem.removeTree(root) }
        let outside = try plantLink(named: "blank-link", in: store, root: root)
        let chunk = data(11)
        let digests = try put([chunk], into: store)
        try readBack(digests[0], chunk, from: store)
        #expect(try FileSystem.readFile(outside) == Data("keep me".utf8))
        #expect(try store.reserve.status().blanks == 0)
    }

    /// gc gives the pieces of an arena whose program died (its lock held by nobody) back to the reserve as
    /// blanks, and leaves a live arena (its lock held) alone.
    @Test func gcGivesBackThePiecesOfDeadArenasOnly() throws {
        let (root, store) = try makeStore("reserve-arenas")
        defer { FileSystem.removeTree(root) }
        let reserve = store.reserve.directory
        try FileSystem.makePrivateDirectory(reserve)
        let dead = "0123456789abcdef", live = "fedcba9876543210"
        for id in [dead, live] {
            try FileSystem.writeAtomically(Data(), to: "\(reserve)/arena-\(id).lock")
            for piece in 0..<3 { try FileSystem.writeAtomically(Data(count: 4096), to: "\(reserve)/arena-\(id)-\(piece)") }
        }
        let held = try FileDescriptor.open("\(reserve)/arena-\(live).lock", .readOnly)
        defer { held.closeQuietly() }
        try held.lock(exclusive: true)
        let report = try StoreCatalog(store: store).collect(graceSeconds: 0)
        #expect(report.reclaimedArenaPieces == 3)
        let names = Set(try FileSystem.namesOrNone(in: reserve))
        #expect(names == Set(["arena-\(live).lock"] + (0..<3).map { "arena-\(live)-\($0)" } + (0..<3).map { "blank-\(dead)-\($0)" }))
        #expect(try store.reserve.status().blanks == 3)
    }

    /// A piece that is a link (or too short to hold the chunk) is never taken: the writer fails, nothing outside
    /// the store is touched, and the batch holds no chunk for it.
    @Test func anArenaPieceThatIsALinkIsRefused() throws {
        let (root, store) = try makeStore("arena-link")
        defer { FileSystem.removeTree(root) }
        let outside = try plantLink(named: "arena-0123456789abcdef-0", in: store, root: root)
        try FileSystem.writeAtomically(Data(count: 100), to: store.reserve.directory + "/arena-0123456789abcdef-1")
        let batch = store.makeBatch()
        let digest = String(repeating: "ab", count: 32)
        for piece in 0..<2 {
            #expect(batch.claim(digest))
            #expect(throws: StasisError.self) { _ = try batch.adoptPiece("arena-0123456789abcdef-\(piece)", length: Self.chunk, digest: digest) }
            batch.abandon()
        }
        #expect(try FileSystem.readFile(outside) == Data("keep me".utf8))
        try batch.commit()
        #expect(store.allChunks().isEmpty)
    }

    /// A batch that fails (a dump that did not finish) gives the blanks it took back to the reserve.
    @Test func anAbandonedBatchGivesItsBlanksBack() throws {
        let (root, store) = try makeStore("reserve-abandon")
        defer { FileSystem.removeTree(root) }
        _ = try store.reserve.resize(to: UInt64(2 * Self.chunk), threads: 1)
        let batch = store.makeBatch()
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkSink.scratchSize(), alignment: 4096)
        defer { scratch.deallocate() }
        for seed in [21, 22, 23] as [UInt64] {
            try data(seed).withUnsafeBytes { bytes in
                _ = try batch.put(bytes, digest: ChunkDigest.hex(bytes), codec: .lz4, scratch: scratch, probe: true, claimed: false)
            }
        }
        #expect(try store.reserve.status().blanks == 0)
        batch.abandon()
        // Two back (its target), the third removed; nothing left in tmp/.
        #expect(try store.reserve.status().blanks == 2)
        #expect(try FileSystem.namesOrNone(in: store.path + "/tmp").isEmpty)
    }
}
