import Foundation
import StasisCore
import StasisOS
import StasisStore

/// A checkpoint built by hand with the store's own APIs, no process and no CRIU: for tests of what reads
/// checkpoints (export, import, verify, the fuzzer).
public struct SampleCheckpoint {
    public var root: String
    public var checkpoint: String
    public var store: DirectoryChunkStore
    public var manifest: Manifest
    /// The plain content of every file, by path.
    public var contents: [String: Data]

    /// Bytes that do not compress, from a fixed seed.
    public static func noise(_ count: Int, seed: UInt64) -> Data {
        var state = seed | 1
        var bytes = [UInt8](repeating: 0, count: count)
        for index in 0..<count {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            bytes[index] = UInt8(truncatingIfNeeded: state)
        }
        return Data(bytes)
    }

    /// A checkpoint in ROOT/ckpt whose pages-1.img lives in ROOT/store-a (listed in its catalog). With
    /// `chunked` false every file is whole and the manifest names no store (a version 1 checkpoint).
    public static func make(chunked: Bool = true, largeWholeFile: Bool = false) throws -> SampleCheckpoint {
        let root = Harness.scratch("bundle")
        let source = root + "/source", checkpoint = root + "/ckpt"
        try FileSystem.makePrivateDirectory(source)
        try FileSystem.makePrivateDirectory(checkpoint)
        let chunk = ChunkFormat.chunkSize
        let pattern = Data((0..<chunk).map { UInt8(truncatingIfNeeded: $0 / 4096) })
        var contents: [String: Data] = [
            "core-1.img": noise(3000, seed: 7),
            "pstree.img": Data(),
            // pattern, zeros, pattern again, noise, and a short tail: 3 distinct stored chunks and a zero one.
            "pages-1.img": pattern + Data(count: chunk) + pattern + noise(chunk, seed: 11) + noise(777, seed: 13),
        ]
        if largeWholeFile { contents["big.img"] = Data(count: Int(SegmentedDigest.segmentSize) + 5) + Data([1, 2, 3]) }
        for (name, data) in contents { try data.write(to: URL(fileURLWithPath: source + "/" + name)) }

        let store = try DirectoryChunkStore(path: root + "/store-a", create: true)
        var chunkedFiles: [String: ChunkIngester.File] = [:]
        var statistics = ChunkIngester.Statistics()
        if chunked {
            let ingester = ChunkIngester(directory: source, store: store, codec: .lz4, follows: { _ in false })
            (chunkedFiles, statistics) = try ingester.finish(alsoIngest: ["pages-1.img"])
        }
        let whole = contents.keys.filter { chunkedFiles[$0] == nil }.sorted()
        for name in whole { try FileManager.default.copyItem(atPath: source + "/" + name, toPath: checkpoint + "/" + name) }
        let files = (try ParallelHasher.hash(whole, under: checkpoint).map {
            Manifest.FileEntry(path: $0.path, size: $0.size, sha256: $0.sha256, segments: $0.segments)
        } + chunkedFiles.map {
            Manifest.FileEntry(path: $0.key, size: $0.value.size, sha256: ChunkDigest.ofFile(chunks: $0.value.chunks), chunks: $0.value.chunks)
        }).sorted { $0.path < $1.path }
        var manifest = Manifest(
            id: UUID().uuidString.lowercased(), createdAt: Date(timeIntervalSince1970: 1_700_000_000),
            tool: .init(name: "stasis", version: "test"),
            host: .init(hostname: "bundle-test-host", kernel: "k", machine: "x86_64", cpuModel: "c", cpuFlags: [], pageSize: 4096),
            criu: .init(version: "4.2.1", logFile: "criu-dump.log"),
            options: .init(leaveRunning: false, tcpEstablished: false, shellJob: false),
            // A PID near the kernel's limit, which no test machine runs: nothing here is restored.
            processTree: .init(rootPID: 4_000_001, processes: [.init(pid: 4_000_001, ppid: 1, command: "sample", arguments: [], threads: 1, residentBytes: 0)]),
            memory: .init(residentBytes: 0, dumpedBytes: 0, imageBytes: files.reduce(0) { $0 + $1.size }),
            timings: .init(), gpu: .init(), files: files)
        if chunked {
            manifest.store = .init(path: store.path, chunkSize: chunk, codec: "lz4", plainBytes: statistics.plainBytes,
                                   storedBytes: statistics.storedBytes, newChunks: statistics.newChunks,
                                   reusedChunks: statistics.reusedChunks, zeroChunks: statistics.zeroChunks)
            try StoreCatalog(store: store).register(manifest, directory: checkpoint)
        }
        try FileSystem.writeAtomically(try Manifest.encoder().encode(manifest), to: checkpoint + "/" + Manifest.fileName)
        return SampleCheckpoint(root: root, checkpoint: checkpoint, store: store, manifest: manifest, contents: contents)
    }

    /// The manifest of a one-process checkpoint, with no file.
    public static func manifest() -> Manifest {
        Manifest(id: "sample", createdAt: Date(timeIntervalSince1970: 0), tool: .init(name: "stasis", version: "0"),
                 host: .init(hostname: "h", kernel: "k", machine: "x86_64", cpuModel: "c", cpuFlags: ["avx2"], pageSize: 4096),
                 criu: .init(version: "4.2.1", logFile: "criu-dump.log"),
                 options: .init(leaveRunning: false, tcpEstablished: false, shellJob: false),
                 processTree: .init(rootPID: 42, processes: [.init(pid: 42, ppid: 1, command: "job", arguments: [], threads: 1, residentBytes: 0)]),
                 memory: .init(residentBytes: 0, dumpedBytes: 0, imageBytes: 0), timings: .init(), gpu: .init(), files: [])
    }
}
