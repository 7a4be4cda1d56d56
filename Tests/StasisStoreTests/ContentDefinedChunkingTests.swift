import Foundation
import StasisCore
import StasisOS
import StasisStore
import StasisTestSupport
import Testing

/// Content-defined chunks: cut by what the pages hold, so memory that moved by whole pages still shares its
/// chunks; and the ingester cuts a file that grows on disk and the same bytes arriving as a stream alike.
@Suite struct ContentDefinedChunks {
    static let page = ContentDefinedChunking.pageSize
    let cuts = ContentDefinedChunking.standard

    /// Pages of seeded random bytes (reproducible), with a run of zero pages in the middle.
    static func pages(_ count: Int, seed: UInt64, zeroRun: Range<Int>? = nil) -> [UInt8] {
        var state = seed
        var bytes = [UInt8](repeating: 0, count: count * page)
        for index in stride(from: 0, to: bytes.count, by: 8) where !(zeroRun?.contains(index / page) ?? false) {
            // SplitMix64: reproducible from the seed, printed by the tests that draw one.
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            z ^= z >> 31
            withUnsafeBytes(of: z.littleEndian) { for offset in 0..<8 { bytes[index + offset] = $0[offset] } }
        }
        return bytes
    }

    func chunks(of bytes: [UInt8]) -> [ArraySlice<UInt8>] {
        let lengths = bytes.withUnsafeBytes { cuts.lengths(of: $0) }
        var start = 0
        return lengths.map { length in defer { start += length }; return bytes[start..<start + length] }
    }

    @Test func sizesAreBoundedAndZeroRunsAreCutAtTheMaximum() {
        let bytes = Self.pages(4096, seed: 7, zeroRun: 1000..<3000)
        let lengths = bytes.withUnsafeBytes { cuts.lengths(of: $0) }
        #expect(lengths.reduce(0, +) == bytes.count)
        #expect(lengths.dropLast().allSatisfy { (cuts.minimum...cuts.maximum).contains($0) && $0 % Self.page == 0 }, "\(lengths)")
        // One cut every 128 pages past 128: about 256 pages (1 MiB) a chunk, more with the zero run's.
        let average = bytes.count / lengths.count
        #expect((160 * Self.page...360 * Self.page).contains(average), "average \(average)")
        // A page of zeros never ends a chunk: a run of them (8 MiB here) is cut at the maximum.
        #expect([UInt8](repeating: 0, count: Self.page).withUnsafeBytes { ContentDefinedChunking.hash($0) } == 0)
        let zeroChunks = chunks(of: bytes).filter { $0.allSatisfy { $0 == 0 } }
        #expect(zeroChunks.count >= 2 && zeroChunks.allSatisfy { $0.count == cuts.maximum }, "\(zeroChunks.map(\.count))")
        // A tail shorter than a page ends the last chunk.
        let tail = bytes + [1, 2, 3]
        let tailLengths = tail.withUnsafeBytes { cuts.lengths(of: $0) }
        #expect(tailLengths.reduce(0, +) == tail.count && Array(tailLengths.dropLast()) == Array(lengths.dropLast()))
    }

    /// Pages inserted before the rest and pages taken out of the middle: the chunks past each change are the
    /// ones before it; fixed pieces would share none.
    @Test func memoryThatMovedByWholePagesSharesItsChunks() {
        let seed = UInt64.random(in: 1...UInt64.max)
        let first = Self.pages(8192, seed: seed)
        let second = Self.pages(3, seed: seed ^ 0xFF) + first[0..<(4000 * Self.page)] + first[(4010 * Self.page)...]
        let known = Set(chunks(of: first))
        let shared = chunks(of: second).filter { known.contains($0) }.reduce(0) { $0 + $1.count }
        // What is lost: the chunk each change lands in, and the one after it (about 1 MiB each of 32).
        #expect(Double(shared) > 0.8 * Double(second.count), "seed \(seed): \(shared) of \(second.count) bytes shared")
        let fixed = Set(stride(from: 0, to: first.count, by: ChunkFormat.chunkSize).map { first[$0..<min($0 + ChunkFormat.chunkSize, first.count)] })
        let fixedShared = stride(from: 0, to: second.count, by: ChunkFormat.chunkSize).filter {
            fixed.contains(second[$0..<min($0 + ChunkFormat.chunkSize, second.count)])
        }.count
        #expect(fixedShared == 0, "seed \(seed)")
    }

    /// The same bytes through a followed file (written in uneven pieces while the ingester runs) and through
    /// `receive` (a pipe, as CRIU's page server would send them) are cut where `lengths(of:)` says, stored
    /// once, and come back byte for byte.
    @Test func aFollowedFileAndAStreamAreCutAlikeAndReadBack() throws {
        let root = Harness.scratch("cdc")
        defer { FileSystem.removeTree(root) }
        let images = root + "/images"
        try FileSystem.makePrivateDirectory(images)
        let store = try DirectoryChunkStore(path: root + "/store", create: true)
        let bytes = Self.pages(2500, seed: 11, zeroRun: 600..<2000) + [9, 9, 9, 9, 9]
        let expected = bytes.withUnsafeBytes { cuts.lengths(of: $0) }

        let ingester = ChunkIngester(directory: images, store: store, codec: .lz4, contentDefined: cuts, threads: 2) { $0.hasPrefix("pages-") }
        let path = images + "/pages-1.img"
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        let file = try #require(FileHandle(forWritingAtPath: path))
        // Pieces that end mid-page, so that the follower sees partial pages.
        var written = 0
        for piece in [1_000_001, 3 << 20, 777, 2 << 20, bytes.count] where written < bytes.count {
            let end = min(bytes.count, written + piece)
            try file.write(contentsOf: bytes[written..<end])
            written = end
            usleep(30_000)
        }
        try file.close()
        let pipe = try FileDescriptor.makePipe()
        let writer = Thread {
            bytes.withUnsafeBytes { _ = try? pipe.writeEnd.write(all: $0) }
            pipe.writeEnd.closeQuietly()
        }
        writer.start()
        try ingester.receive("pages-2.img", from: pipe.readEnd, count: bytes.count)
        try ingester.endStream("pages-2.img")
        pipe.readEnd.closeQuietly()
        let (files, statistics) = try ingester.finish()
        let followed = try #require(files["pages-1.img"])
        let streamed = try #require(files["pages-2.img"])
        #expect(followed.lengths == expected)
        #expect(streamed.lengths == expected)
        #expect(followed.chunks == streamed.chunks)
        #expect(statistics.plainBytes == UInt64(2 * bytes.count))
        #expect(statistics.zeroChunks >= 2)

        let rebuilt = root + "/rebuilt"
        try FileSystem.makePrivateDirectory(rebuilt)
        let entry = Manifest.FileEntry(path: "pages-2.img", size: streamed.size, sha256: ChunkDigest.ofFile(chunks: streamed.chunks),
                                       chunks: streamed.chunks, chunkLengths: streamed.lengths)
        let item = try #require(ChunkedFiles.Item(entry))
        try ChunkedFiles.read([item], from: store, checkpoint: root, chunkSize: ChunkFormat.chunkSize, into: rebuilt)
        #expect(try FileSystem.readFile(rebuilt + "/pages-2.img") == Data(bytes))
    }

    /// A manifest whose chunk lengths do not add up to the file, or exceed the store's chunk size, is refused.
    @Test func chunkLengthsThatDoNotFitAreRefused() throws {
        for lengths in [[4096, 4096], [4096, 0, 8192], [ChunkFormat.chunkSize + 4096, -ChunkFormat.chunkSize + 4096 + 8192]] {
            var manifest = SampleCheckpoint.manifest()
            let digest = String(repeating: "a", count: 64)
            manifest.files.append(.init(path: "pages-9.img", size: 12288, sha256: digest, chunks: Array(repeating: digest, count: lengths.count),
                                        chunkLengths: lengths))
            #expect(throws: StasisError.self, "\(lengths)") { try manifest.validate(name: "test") }
        }
    }
}
