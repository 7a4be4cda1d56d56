import Crypto
import Foundation
import Glibc
import StasisCore

/// How stasis fingerprints a file: SHA-256 over fixed 64 MiB segments, so one big file can be hashed (and
/// verified) on every core at once and a mismatch can be placed at an offset. A file of one segment (up to
/// 64 MiB, or empty) has the plain SHA-256 of its content as its digest, the same as `sha256sum` prints; a
/// longer one has SHA-256 over its segments' 32-byte digests, in order.
public enum SegmentedDigest {
    public static let segmentSize: UInt64 = 64 << 20

    public static func combine(_ segments: [SHA256.Digest]) -> String {
        if segments.count == 1 { return hex(segments[0]) }
        var outer = SHA256()
        for digest in segments { digest.withUnsafeBytes { outer.update(bufferPointer: $0) } }
        return hex(outer.finalize())
    }

    public static func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 {
        let table = hexDigits
        var out = [UInt8]()
        out.reserveCapacity(64)
        for byte in digest {
            out.append(table[Int(byte >> 4)])
            out.append(table[Int(byte & 0xf)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    private static let hexDigits = Array("0123456789abcdef".utf8)

    public static func segmentCount(size: UInt64) -> Int { max(1, Int((size + segmentSize - 1) / segmentSize)) }

    /// The same digest computed front to back, for bytes that stream past once (bundles).
    public struct Streaming {
        private var completed: [SHA256.Digest] = []
        private var current = SHA256()
        private var inSegment: UInt64 = 0

        public init() {}

        public mutating func update(_ bytes: UnsafeRawBufferPointer) {
            var rest = bytes
            while !rest.isEmpty {
                let take = Int(min(UInt64(rest.count), segmentSize - inSegment))
                current.update(bufferPointer: UnsafeRawBufferPointer(rebasing: rest[0..<take]))
                inSegment += UInt64(take)
                rest = UnsafeRawBufferPointer(rebasing: rest[take...])
                if inSegment == segmentSize {
                    completed.append(current.finalize())
                    current = SHA256()
                    inSegment = 0
                }
            }
        }

        public mutating func finish() -> String {
            // An empty file is one empty segment; a file ending on a boundary has no extra one.
            if inSegment > 0 || completed.isEmpty { completed.append(current.finalize()) }
            return combine(completed)
        }
    }
}

/// Hashes many files on several threads, one 64 MiB segment per work item, so a single large image uses
/// every core.
public enum ParallelHasher {
    public struct Result: Sendable {
        public var path: String
        public var size: UInt64
        public var sha256: String
        /// The per-segment digests, for files of more than one segment.
        public var segments: [String]?
    }

    public static func hash(_ relativePaths: [String], under root: String,
                            threads: Int = ProcessInfo.processInfo.activeProcessorCount,
                            progress: (@Sendable (UInt64) -> Void)? = nil) throws -> [Result] {
        // Plan: a work item for every segment of every file.
        var plans: [FilePlan] = []
        var items: [WorkItem] = []
        for (fileIndex, relative) in relativePaths.enumerated() {
            let path = root + "/" + relative
            guard let size = FileSystem.size(path) else { throw systemError("cannot stat", path) }
            let count = SegmentedDigest.segmentCount(size: size)
            for segment in 0..<count { items.append(WorkItem(file: fileIndex, segment: segment)) }
            plans.append(FilePlan(path: path, relative: relative, size: size, digests: [SHA256.Digest?](repeating: nil, count: count)))
        }
        let state = HashState(plans: plans, items: items)
        let workers = max(1, min(threads, items.count))
        WorkerGroup.run(workers, name: "stasis-hash") { _ in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 << 20, alignment: 4096)
            defer { buffer.deallocate() }
            while let item = state.next() {
                do {
                    let plan = state.plan(item.file)
                    let from = UInt64(item.segment) * SegmentedDigest.segmentSize
                    let end = min(plan.size, from + SegmentedDigest.segmentSize)
                    let digest = try hashRange(plan.path, from: from, to: end, buffer: buffer)
                    state.store(item, digest: digest)
                    progress?(end - from)
                } catch let error as StasisError {
                    state.fail(error)
                } catch {
                    state.fail(StasisError(.io, "hashing \(state.plan(item.file).path): \(error)"))
                }
            }
        }
        return try state.results()
    }

    static func hashRange(_ path: String, from: UInt64, to end: UInt64, buffer: UnsafeMutableRawBufferPointer) throws -> SHA256.Digest {
        let fd = retryingEINTR { open(path, O_RDONLY | O_CLOEXEC) }
        guard fd >= 0 else { throw systemError("cannot open", path) }
        defer { close(fd) }
        var hasher = SHA256()
        var offset = from
        while offset < end {
            let want = Int(min(UInt64(buffer.count), end - offset))
            let got = retryingEINTR { pread(fd, buffer.baseAddress, want, off_t(offset)) }
            guard got >= 0 else { throw systemError("cannot read", path) }
            guard got > 0 else {
                throw StasisError(.integrity, "\(path) ended at byte \(offset) while being hashed (expected \(end) bytes)")
            }
            hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: buffer[0..<got]))
            offset += UInt64(got)
        }
        return hasher.finalize()
    }
}

private struct FilePlan {
    var path: String
    var relative: String
    var size: UInt64
    var digests: [SHA256.Digest?]
}

private struct WorkItem {
    var file: Int
    var segment: Int
}

/// Work queue and results shared by the hashing threads.
private final class HashState: Sendable {
    private let plans: Locked<[FilePlan]>
    private let items: [WorkItem]
    private let nextIndex = Locked(0)
    private let failure = FirstFailure()

    init(plans: [FilePlan], items: [WorkItem]) {
        self.plans = Locked(plans)
        self.items = items
    }

    func next() -> WorkItem? {
        guard failure.error == nil, let index = nextIndex.takeNext(below: items.count) else { return nil }
        return items[index]
    }

    func plan(_ index: Int) -> FilePlan { plans.withLock { $0[index] } }
    func store(_ item: WorkItem, digest: SHA256.Digest) { plans.withLock { $0[item.file].digests[item.segment] = digest } }
    func fail(_ error: StasisError) { failure.set(error) }

    func results() throws -> [ParallelHasher.Result] {
        try failure.check()
        return plans.current.map { plan in
            let digests = plan.digests.map { $0! }
            return ParallelHasher.Result(path: plan.relative, size: plan.size, sha256: SegmentedDigest.combine(digests),
                                         segments: digests.count > 1 ? digests.map { SegmentedDigest.hex($0) } : nil)
        }.sorted { $0.path < $1.path }
    }
}
