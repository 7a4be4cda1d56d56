import Crypto
import Foundation
import Glibc
import StasisCore

/// SHA-256 of a file that may still be growing. `advance()` hashes what has been appended since the last
/// call, so a caller can hash CRIU's images while CRIU is still writing them (they are written front to
/// back); `finish()` hashes the rest and returns the digest. Hashing a finished file is `finish()` alone.
public final class IncrementalFileHash {
    public let path: String
    public private(set) var offset: UInt64 = 0
    private var hasher = SHA256()
    private var fd: Int32 = -1
    private static let bufferSize = 4 << 20

    public init(path: String) { self.path = path }
    deinit { if fd >= 0 { close(fd) } }

    /// Hashes the bytes appended since the last call; returns how many.
    @discardableResult
    public func advance(buffer: UnsafeMutableRawBufferPointer) throws -> UInt64 {
        if fd < 0 {
            fd = retryingEINTR { open(path, O_RDONLY | O_CLOEXEC) }
            guard fd >= 0 else { throw systemError("cannot open", path) }
            posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL)
        }
        var total: UInt64 = 0
        while true {
            let got = retryingEINTR { pread(fd, buffer.baseAddress, buffer.count, off_t(offset)) }
            guard got >= 0 else { throw systemError("cannot read", path) }
            if got == 0 { return total }
            hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: buffer[0..<got]))
            offset += UInt64(got)
            total += UInt64(got)
        }
    }

    /// Hashes the rest of the file and returns the hex digest and the size hashed.
    public func finish(buffer: UnsafeMutableRawBufferPointer) throws -> (sha256: String, size: UInt64) {
        try advance(buffer: buffer)
        if fd >= 0 { close(fd); fd = -1 }
        return (Self.hex(hasher.finalize()), offset)
    }

    public static func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 {
        digest.map { String(format: "%02x", $0) }.joined()
    }

    /// A read buffer sized for these hashers; the caller owns and frees it.
    public static func makeBuffer() -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096)
    }
}

/// Hashes many files on several threads, the largest first so one big file does not finish last.
public enum ParallelHasher {
    public struct Result: Sendable {
        public var path: String
        public var size: UInt64
        public var sha256: String
    }

    /// Hashes `relativePaths` under `root`, resuming any partial hashes in `started`.
    public static func hash(_ relativePaths: [String], under root: String, started: [String: IncrementalFileHash] = [:],
                            threads: Int = ProcessInfo.processInfo.activeProcessorCount,
                            progress: (@Sendable (UInt64) -> Void)? = nil) throws -> [Result] {
        let order = relativePaths.sorted { (FileSystem.size(root + "/" + $0) ?? 0) > (FileSystem.size(root + "/" + $1) ?? 0) }
        let state = HashState(count: order.count)
        let workers = max(1, min(threads, order.count))
        nonisolated(unsafe) let jobs = order.map { started[$0] ?? IncrementalFileHash(path: root + "/" + $0) }
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
            let buffer = IncrementalFileHash.makeBuffer()
            defer { buffer.deallocate() }
            while let index = state.next() {
                do {
                    let (digest, size) = try jobs[index].finish(buffer: buffer)
                    state.store(index, Result(path: order[index], size: size, sha256: digest))
                    progress?(size)
                } catch let error as StasisError {
                    state.fail(error)
                } catch {
                    state.fail(StasisError(.io, "hashing \(order[index]): \(error)"))
                }
            }
        }
        return try state.results().sorted { $0.path < $1.path }
    }
}

/// Work queue and results shared by the hashing threads.
private final class HashState: @unchecked Sendable {
    private let lock = NSLock()
    private var nextIndex = 0
    private var slots: [ParallelHasher.Result?]
    private var failure: StasisError?

    init(count: Int) { slots = Array(repeating: nil, count: count) }

    func next() -> Int? {
        lock.withLock {
            guard failure == nil, nextIndex < slots.count else { return nil }
            defer { nextIndex += 1 }
            return nextIndex
        }
    }

    func store(_ index: Int, _ result: ParallelHasher.Result) { lock.withLock { slots[index] = result } }
    func fail(_ error: StasisError) { lock.withLock { if failure == nil { failure = error } } }

    func results() throws -> [ParallelHasher.Result] {
        try lock.withLock {
            if let failure { throw failure }
            return slots.compactMap { $0 }
        }
    }
}
