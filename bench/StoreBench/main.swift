// stasis-store-bench: the chunk store's ingest and rebuild throughput, driven by bench/store-throughput.sh.
//
//   stasis-store-bench ingest  --images DIR --store S [--compress C] [--threads N] [--cache warm|cold]
//   stasis-store-bench rebuild --images DIR --store S [--threads N] [--into DIR] [--cache warm|cold] [--no-compare]
//
// ingest cuts every regular file of DIR (a CRIU image directory) into a new store S (S is removed first when
// it is an earlier bench store, so dedup against an earlier run cannot hide work) with ChunkIngester, exactly
// as a dump does once CRIU has finished, including making the chunks durable. It records the chunk lists in
// S/bench-index.json and prints one JSON line: bytes in, bytes stored, ratios, seconds and GB/s.
//
// rebuild reads that index and rebuilds every file with ChunkedFiles.read (each chunk read, decompressed and
// checked against its SHA-256) into --into DIR, or only verifies the chunks without --into. It then syncs the
// rebuilt files (timed apart: a restore hands them to CRIU without a sync) and compares them byte for byte
// with the originals in --images (not timed). It prints one JSON line.
//
// --cache cold: sync and drop the page cache (/proc/sys/vm/drop_caches, needs root) right before the timer
// starts, so the input comes from the disk. --cache warm: read the input once first, so it comes from memory.
// Default: warm for ingest (a dump ingests what CRIU has just written), cold for rebuild (a restore on a
// machine that did not take the checkpoint). GB/s is decimal (1e9 bytes) plain bytes per wall second.
import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisStore

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ text: String) { description = text }
}

// MARK: arguments

struct Arguments {
    var command: String
    var values: [String: String] = [:]
    var flags: Set<String> = []

    static let takesValue: Set<String> = ["--images", "--store", "--compress", "--threads", "--into", "--cache", "--chunk-size"]
    static let isFlag: Set<String> = ["--no-compare"]

    init(_ raw: [String]) throws {
        guard let first = raw.first else { throw BenchError(Self.usage) }
        command = first
        var index = 1
        while index < raw.count {
            let word = raw[index]
            if Self.isFlag.contains(word) {
                flags.insert(word)
                index += 1
            } else if Self.takesValue.contains(word), index + 1 < raw.count {
                values[word] = raw[index + 1]
                index += 2
            } else {
                throw BenchError("unexpected argument '\(word)'\n" + Self.usage)
            }
        }
    }

    func required(_ name: String) throws -> String {
        guard let value = values[name] else { throw BenchError("\(command) needs \(name)\n" + Self.usage) }
        return value
    }

    func integer(_ name: String, default fallback: Int) throws -> Int {
        guard let text = values[name] else { return fallback }
        guard let value = Int(text), value > 0 else { throw BenchError("\(name) wants a positive integer, not '\(text)'") }
        return value
    }

    func cache(default fallback: String) throws -> String {
        let value = values["--cache"] ?? fallback
        guard value == "warm" || value == "cold" else { throw BenchError("--cache is warm or cold, not '\(value)'") }
        return value
    }

    static let usage = """
        usage: stasis-store-bench ingest  --images DIR --store S [--compress none|lz4|zstd:N] [--threads N] [--cache warm|cold]
               stasis-store-bench rebuild --images DIR --store S [--threads N] [--into DIR] [--cache warm|cold] [--no-compare]
        """
}

// MARK: files and the page cache

/// The regular files directly in `directory`, sorted by name.
func regularFiles(in directory: String) throws -> [String] {
    let names = try FileManager.default.contentsOfDirectory(atPath: directory)
    return names.filter { name in
        var st = stat()
        return lstat(directory + "/" + name, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
    }.sorted()
}

func fileSize(_ path: String) throws -> UInt64 {
    guard let size = FileSystem.size(path) else { throw BenchError("cannot stat \(path): \(String(cString: strerror(errno)))") }
    return size
}

/// Flushes dirty pages and drops clean ones, so that what is read next comes from the disk.
func dropPageCache() throws {
    sync()
    let fd = open("/proc/sys/vm/drop_caches", O_WRONLY)
    guard fd >= 0 else { throw BenchError("cannot open /proc/sys/vm/drop_caches (--cache cold needs root)") }
    defer { close(fd) }
    let three: [UInt8] = Array("3\n".utf8)
    guard write(fd, three, three.count) == three.count else { throw BenchError("cannot drop the page cache") }
}

/// Reads files once so that their pages are cached.
func readThrough(_ paths: [String]) throws {
    let size = 8 << 20
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
    defer { buffer.deallocate() }
    for path in paths {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BenchError("cannot open \(path)") }
        defer { close(fd) }
        while true {
            let got = read(fd, buffer, size)
            if got < 0 && errno == EINTR { continue }
            if got < 0 { throw BenchError("cannot read \(path)") }
            if got == 0 { break }
        }
    }
}

func prepare(cache: String, inputs: [String]) throws {
    if cache == "cold" {
        try dropPageCache()
    } else {
        try readThrough(inputs)
        sync()
    }
}

/// Compares two files byte for byte; names the first differing offset.
func compareFiles(_ left: String, _ right: String) throws {
    let (a, b) = (open(left, O_RDONLY | O_CLOEXEC), open(right, O_RDONLY | O_CLOEXEC))
    defer { if a >= 0 { close(a) }; if b >= 0 { close(b) } }
    guard a >= 0, b >= 0 else { throw BenchError("cannot open \(a < 0 ? left : right) to compare") }
    let size = 8 << 20
    let x = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
    let y = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
    defer { x.deallocate(); y.deallocate() }
    var offset: UInt64 = 0
    while true {
        let gotX = readAll(a, x, size)
        let gotY = readAll(b, y, size)
        guard gotX >= 0, gotY >= 0 else { throw BenchError("cannot read \(left) or \(right)") }
        guard gotX == gotY else { throw BenchError("\(right) and \(left) differ in length (around byte \(offset + UInt64(min(gotX, gotY))))") }
        if gotX == 0 { return }
        if memcmp(x, y, gotX) != 0 {
            var at = 0
            while x.load(fromByteOffset: at, as: UInt8.self) == y.load(fromByteOffset: at, as: UInt8.self) { at += 1 }
            throw BenchError("\(right) differs from \(left) at byte \(offset + UInt64(at))")
        }
        offset += UInt64(gotX)
    }
}

/// Reads up to `count` bytes (fewer only at the end of the file); -1 on an error.
func readAll(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int) -> Int {
    var done = 0
    while done < count {
        let got = read(fd, buffer + done, count - done)
        if got < 0 && errno == EINTR { continue }
        if got < 0 { return -1 }
        if got == 0 { break }
        done += got
    }
    return done
}

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// User and system CPU seconds of this process so far (all threads).
func cpuTimes() -> (user: Double, system: Double) {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    let seconds = { (t: timeval) in Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
    return (seconds(usage.ru_utime), seconds(usage.ru_stime))
}

func rounded(_ value: Double, _ digits: Int = 3) -> Double {
    let scale = pow(10, Double(digits))
    return (value * scale).rounded() / scale
}

func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}

// MARK: the index an ingest leaves for rebuild

struct Index: Codable {
    struct Entry: Codable {
        var name: String
        var size: UInt64
        var chunks: [String]
    }
    var images: String
    var codec: String
    var chunkSize: Int
    var files: [Entry]

    static func path(store: String) -> String { store + "/bench-index.json" }
}


// MARK: ingest

struct IngestReport: Codable {
    var command = "ingest"
    var images: String
    var codec: String
    var threads: Int
    var cache: String
    var files: Int
    var plainBytes: UInt64
    /// Bytes in chunks that are all zeros (stored as nothing), in chunks already stored by this run (dedup),
    /// and the rest, which went through the codec.
    var zeroBytes: UInt64
    var duplicateBytes: UInt64
    var codecInputBytes: UInt64
    var storedBytes: UInt64
    /// plainBytes / storedBytes, and codecInputBytes / storedBytes (the codec alone).
    var ratio: Double
    var codecRatio: Double
    var newChunks: Int
    var reusedChunks: Int
    var zeroChunks: Int
    var seconds: Double
    var gbps: Double
    /// CPU time of the timed part, all threads: (user + system) / seconds near the core count means CPU-bound.
    var userSeconds: Double
    var systemSeconds: Double
}

func ingest(_ arguments: Arguments) throws {
    let images = URL(fileURLWithPath: try arguments.required("--images")).standardizedFileURL.path
    let storePath = URL(fileURLWithPath: try arguments.required("--store")).standardizedFileURL.path
    let codec = try Codec(parsing: arguments.values["--compress"] ?? "lz4")
    let threads = try arguments.integer("--threads", default: ProcessInfo.processInfo.activeProcessorCount)
    let chunkSize = try arguments.integer("--chunk-size", default: ChunkFormat.chunkSize)
    let cache = try arguments.cache(default: "warm")

    // A fresh store every run: only an earlier bench store (or an empty or missing directory) is removed.
    if FileSystem.isDirectory(storePath) {
        let entries = try FileManager.default.contentsOfDirectory(atPath: storePath)
        guard entries.isEmpty || FileSystem.exists(Index.path(store: storePath)) else {
            throw BenchError("\(storePath) exists and is not a stasis-store-bench store; name a new directory")
        }
        FileSystem.removeTree(storePath)
    }
    let store = try DirectoryChunkStore(path: storePath, create: true)
    let names = try regularFiles(in: images)
    guard !names.isEmpty else { throw BenchError("no files in \(images)") }
    try prepare(cache: cache, inputs: names.map { images + "/" + $0 })

    let cpuStart = cpuTimes()
    let start = now()
    let ingester = ChunkIngester(directory: images, store: store, codec: codec, chunkSize: chunkSize, threads: threads, follows: { _ in false })
    // finish() also makes the new chunks durable and names them (one syncfs, then renames and directory fsyncs).
    let (files, statistics) = try ingester.finish(alsoIngest: names)
    let seconds = now() - start
    let cpu = cpuTimes()

    // Zero and duplicate bytes, from the chunk lists (a chunk's first appearance is the one that was stored).
    var zeroBytes: UInt64 = 0
    var duplicateBytes: UInt64 = 0
    var seen = Set<String>()
    var entries: [Index.Entry] = []
    for name in names {
        guard let file = files[name] else { throw BenchError("the ingester returned no chunks for \(name)") }
        for (index, digest) in file.chunks.enumerated() {
            let length = min(UInt64(chunkSize), file.size - UInt64(index) * UInt64(chunkSize))
            if digest.isEmpty { zeroBytes += length } else if !seen.insert(digest).inserted { duplicateBytes += length }
        }
        entries.append(Index.Entry(name: name, size: file.size, chunks: file.chunks))
    }
    let index = Index(images: images, codec: codec.description, chunkSize: chunkSize, files: entries)
    try FileSystem.writeAtomically(try JSONEncoder().encode(index), to: Index.path(store: storePath))

    let plain = statistics.plainBytes
    let stored = statistics.storedBytes
    let codecInput = plain - zeroBytes - duplicateBytes
    try printJSON(IngestReport(
        images: images, codec: codec.description, threads: threads, cache: cache, files: names.count,
        plainBytes: plain, zeroBytes: zeroBytes, duplicateBytes: duplicateBytes, codecInputBytes: codecInput, storedBytes: stored,
        ratio: rounded(stored == 0 ? 0 : Double(plain) / Double(stored)),
        codecRatio: rounded(stored == 0 ? 0 : Double(codecInput) / Double(stored)),
        newChunks: statistics.newChunks, reusedChunks: statistics.reusedChunks, zeroChunks: statistics.zeroChunks,
        seconds: rounded(seconds, 4), gbps: rounded(Double(plain) / seconds / 1e9),
        userSeconds: rounded(cpu.user - cpuStart.user), systemSeconds: rounded(cpu.system - cpuStart.system)))
}

// MARK: rebuild

struct RebuildReport: Codable {
    var command = "rebuild"
    var images: String
    var codec: String
    var threads: Int
    var cache: String
    /// "rebuild" (files written into a directory) or "verify" (chunks read and checked only).
    var mode: String
    var files: Int
    var plainBytes: UInt64
    /// Bytes of the distinct chunk files the rebuild read.
    var chunkFileBytes: UInt64
    var seconds: Double
    var gbps: Double
    /// fsync of the rebuilt files afterwards (not in `seconds`; 0 for verify).
    var syncSeconds: Double
    /// CPU time of the timed part (not the sync), all threads.
    var userSeconds: Double
    var systemSeconds: Double
    /// Every rebuilt file was compared with its original and found equal.
    var identical: Bool?
}

func rebuild(_ arguments: Arguments) throws {
    let images = URL(fileURLWithPath: try arguments.required("--images")).standardizedFileURL.path
    let storePath = URL(fileURLWithPath: try arguments.required("--store")).standardizedFileURL.path
    let threads = try arguments.integer("--threads", default: ProcessInfo.processInfo.activeProcessorCount)
    let cache = try arguments.cache(default: "cold")
    let target = arguments.values["--into"].map { URL(fileURLWithPath: $0).standardizedFileURL.path }

    let index = try JSONDecoder().decode(Index.self, from: try FileSystem.readFile(Index.path(store: storePath)))
    let store = try DirectoryChunkStore(path: storePath, create: false)
    let items = index.files.map { ChunkedFiles.Item(path: $0.name, size: $0.size, chunks: $0.chunks) }
    let distinct = Set(index.files.flatMap { $0.chunks }.filter { !$0.isEmpty }).sorted()
    let chunkPaths = distinct.map { store.chunkPath($0) }
    var chunkBytes: UInt64 = 0
    for path in chunkPaths { chunkBytes += try fileSize(path) }

    if let target {
        if !FileSystem.isDirectory(target) { try FileSystem.makePrivateDirectory(target) }
        // The previous round's output goes first, so its pages are neither reused nor written back meanwhile.
        for item in items { unlink(target + "/" + item.path) }
    }
    try prepare(cache: cache, inputs: chunkPaths)

    let cpuStart = cpuTimes()
    let start = now()
    let plain = try ChunkedFiles.read(items, from: store, checkpoint: "bench", chunkSize: index.chunkSize, into: target, threads: threads)
    let seconds = now() - start
    let cpu = cpuTimes()

    var syncSeconds = 0.0
    var identical: Bool?
    if let target {
        let syncStart = now()
        for item in items {
            let fd = open(target + "/" + item.path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0, fsync(fd) == 0 else { throw BenchError("cannot sync \(target)/\(item.path)") }
            close(fd)
        }
        syncSeconds = now() - syncStart
        if !arguments.flags.contains("--no-compare") {
            for item in items { try compareFiles(images + "/" + item.path, target + "/" + item.path) }
            identical = true
        }
    }
    try printJSON(RebuildReport(
        images: images, codec: index.codec, threads: threads, cache: cache, mode: target == nil ? "verify" : "rebuild",
        files: items.count, plainBytes: plain, chunkFileBytes: chunkBytes,
        seconds: rounded(seconds, 4), gbps: rounded(Double(plain) / seconds / 1e9),
        syncSeconds: rounded(syncSeconds, 4), userSeconds: rounded(cpu.user - cpuStart.user),
        systemSeconds: rounded(cpu.system - cpuStart.system), identical: identical))
}

// MARK: main

do {
    let arguments = try Arguments(Array(CommandLine.arguments.dropFirst()))
    switch arguments.command {
    case "ingest": try ingest(arguments)
    case "rebuild": try rebuild(arguments)
    case "-h", "--help", "help": print(Arguments.usage)
    default: throw BenchError("unknown command '\(arguments.command)'\n" + Arguments.usage)
    }
} catch {
    FileHandle.standardError.write(Data("stasis-store-bench: \(error)\n".utf8))
    exit(1)
}
