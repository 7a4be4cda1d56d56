import Foundation
import Glibc
import StasisCore
import StasisImage
import StasisOS
import StasisTestSupport
import Testing

@Suite struct Hashing {
    /// Writes `mib` MiB of deterministic bytes (plus `extra` bytes) to a new file and returns its path.
    func makeFile(_ directory: String, _ name: String, mib: Int, extra: Int = 0) throws -> String {
        let path = directory + "/" + name
        var data = Data(count: mib << 20 + extra)
        data.withUnsafeMutableBytes { raw in
            for index in stride(from: 0, to: raw.count, by: 8) { raw[index] = UInt8(truncatingIfNeeded: index >> 12) }
        }
        try data.write(to: URL(fileURLWithPath: path))
        return path
    }

    func sha256sum(_ path: String) throws -> String {
        let result = try Harness.run("/usr/bin/sha256sum", [path])
        return String(result.stdout.prefix(64))
    }

    @Test func smallFilesHaveTheirPlainSHA256() throws {
        let directory = Harness.scratch("hash")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        _ = try makeFile(directory, "empty", mib: 0)
        _ = try makeFile(directory, "small", mib: 1, extra: 5)
        let results = try ParallelHasher.hash(["empty", "small"], under: directory)
        #expect(results.map(\.path) == ["empty", "small"])
        #expect(results[0].sha256 == (try sha256sum(directory + "/empty")))
        #expect(results[1].sha256 == (try sha256sum(directory + "/small")))
        #expect(results.allSatisfy { $0.segments == nil })
    }

    @Test func largeFilesAreHashedBySegmentTheSameOnAnyNumberOfThreads() throws {
        let directory = Harness.scratch("hash")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        _ = try makeFile(directory, "big", mib: 170)
        let parallel = try ParallelHasher.hash(["big"], under: directory)
        let single = try ParallelHasher.hash(["big"], under: directory, threads: 1)
        #expect(parallel[0].sha256 == single[0].sha256)
        #expect(parallel[0].size == 170 << 20)
        #expect(parallel[0].segments?.count == 3)
        #expect(parallel[0].segments == single[0].segments)
    }

    @Test func verifyPlacesDamageInItsSegment() throws {
        let directory = Harness.scratch("hash")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = try makeFile(directory, "pages-1.img", mib: 150)
        let hashed = try ParallelHasher.hash(["pages-1.img"], under: directory)
        var manifest = SampleCheckpoint.manifest()
        manifest.files = hashed.map { Manifest.FileEntry(path: $0.path, size: $0.size, sha256: $0.sha256, segments: $0.segments) }
        #expect(try Checkpoint.verify(directory, manifest: manifest, store: nil).files == 1)

        let handle = try #require(FileHandle(forUpdatingAtPath: path))
        try handle.seek(toOffset: 100 << 20)
        try handle.write(contentsOf: Data([0xff]))
        try handle.close()
        let error = #expect(throws: StasisError.self) { try Checkpoint.verify(directory, manifest: manifest, store: nil) }
        #expect(error?.code == .integrity)
        #expect(error?.message.contains("pages-1.img") == true)
        #expect(error?.message.contains("bytes \(64 << 20)..<\(128 << 20)") == true)
    }
}
