import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisStore
import StasisTestSupport
import Testing

/// The store's pieces without CRIU: a file cut into chunks while it grows comes back byte for byte.
@Suite struct ChunkStorePieces {
    func randomBytes(_ count: Int) -> Data {
        var generator = SystemRandomNumberGenerator()
        return Data((0..<count / 8).flatMap { _ in withUnsafeBytes(of: generator.next() as UInt64) { Array($0) } })
    }

    @Test func growingFileIsChunkedWhileWrittenAndRebuiltExactly() throws {
        let root = Harness.scratch("pieces")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let images = root + "/images"
        try FileManager.default.createDirectory(atPath: images, withIntermediateDirectories: true)
        let store = try DirectoryChunkStore(path: root + "/store", create: true)
        let path = images + "/pages-1.img"
        FileManager.default.createFile(atPath: path, contents: nil)
        let ingester = ChunkIngester(directory: images, store: store, codec: .lz4, threads: 2) { $0.hasPrefix("pages-") }
        // Appended in uneven pieces, as a writer would: random data, 4 MiB of zeros, text, a short tail.
        var expected = Data()
        let handle = try #require(FileHandle(forWritingAtPath: path))
        for piece in [randomBytes(3 << 20), Data(count: 4 << 20), Data(String(repeating: "stasis ", count: 300_000).utf8), randomBytes(12_345 & ~7)] {
            try handle.write(contentsOf: piece)
            expected.append(piece)
            usleep(50_000)
        }
        try handle.close()
        let (files, statistics) = try ingester.finish()
        let file = try #require(files["pages-1.img"])
        #expect(file.size == UInt64(expected.count))
        #expect(file.chunks.count == (expected.count + ChunkFormat.chunkSize - 1) / ChunkFormat.chunkSize)
        #expect(statistics.zeroChunks >= 1)
        #expect(statistics.plainBytes == UInt64(expected.count))

        let rebuilt = root + "/rebuilt"
        try FileManager.default.createDirectory(atPath: rebuilt, withIntermediateDirectories: true)
        try ChunkedFiles.read([.init(path: "pages-1.img", size: file.size, chunks: file.chunks)], from: store, checkpoint: root,
                              chunkSize: ChunkFormat.chunkSize, into: rebuilt)
        #expect(try Data(contentsOf: URL(fileURLWithPath: rebuilt + "/pages-1.img")) == expected)

        // The same content again: nothing new is written.
        let again = ChunkIngester(directory: images, store: store, codec: .zstd(level: 3), threads: 2) { _ in false }
        let (_, second) = try again.finish(alsoIngest: ["pages-1.img"])
        #expect(second.newChunks == 0 && second.storedBytes == 0)
        #expect(second.reusedChunks == statistics.newChunks + statistics.reusedChunks)
    }

    @Test func codecNames() throws {
        #expect(try Codec(parsing: "lz4") == .lz4)
        #expect(try Codec(parsing: "zstd") == .zstd(level: 3))
        #expect(try Codec(parsing: "zstd:19") == .zstd(level: 19))
        #expect(try Codec(parsing: "none") == .none)
        for bad in ["zstd:0", "zstd:20", "zstd:x", "gzip", "lz4:1", ""] {
            #expect(throws: StasisError.self, "\(bad)") { try Codec(parsing: bad) }
        }
    }
}

/// The prefetcher reads into the page cache the chunks that are not there, in order, and skips those that are.
@Suite struct ChunkPrefetching {
    @Test func chunksOutOfThePageCacheAreReadAndCachedOnesSkipped() throws {
        // On the disk (tmpfs keeps everything in memory, and nothing could be evicted there).
        let root = "/var/tmp/stasis-prefetch-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: root) }
        let store = try DirectoryChunkStore(path: root, create: true)
        var digests: [String] = []
        for index in 0..<6 {
            let digest = String(format: "%064x", index + 1)
            let path = store.chunkPath(digest)
            try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try Data(repeating: UInt8(index), count: 1 << 20).write(to: URL(fileURLWithPath: path))
            digests.append(digest)
        }
        // Written, synced, then dropped from the page cache (clean pages go with DONTNEED).
        for digest in digests {
            let fd = open(store.chunkPath(digest), O_RDONLY)
            fsync(fd)
            posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
            close(fd)
        }
        let item = ChunkedFiles.Item(path: "pages-1.img", size: UInt64(digests.count) << 20, chunks: digests + ["", digests[0]])
        func residency() throws -> [Bool?] {
            try digests.map { digest in
                let fd = try FileDescriptor.open(store.chunkPath(digest), .readOnly)
                defer { fd.closeQuietly() }
                return fd.startIsCached()
            }
        }
        func cached() throws -> [Bool] { try residency().map { $0 == true } }
        // A filesystem that cannot tell (no RWF_NOWAIT, as tmpfs): the prefetcher takes every chunk as cached.
        if try residency().contains(where: { $0 == nil }) {
            let prefetcher = ChunkPrefetcher(store: store, items: [item], budget: 1 << 30)
            prefetcher.start(threads: 2)
            usleep(200_000)
            #expect(prefetcher.stop() == 0)
            return
        }
        let first = ChunkPrefetcher(store: store, items: [item], budget: 1 << 30)
        first.start(threads: 2)
        let deadline = Date().addingTimeInterval(10)
        while try cached().contains(false), Date() < deadline { usleep(10_000) }
        let read = first.stop()
        #expect(try cached() == Array(repeating: true, count: digests.count), "not all chunks are in the page cache after the prefetch")
        // What the kernel really dropped was read back (all of it, where DONTNEED evicts), each chunk once.
        #expect(read <= UInt64(digests.count) << 20 && read % (1 << 20) == 0, "\(read)")
        // Everything is cached now: a second prefetcher reads nothing.
        let second = ChunkPrefetcher(store: store, items: [item], budget: 1 << 30)
        second.start(threads: 2)
        usleep(200_000)
        #expect(second.stop() == 0)
    }
}
