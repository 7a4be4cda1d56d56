import Foundation
import StasisCore
import StasisOS

/// Reading chunked files back: verifying every chunk, and rebuilding the plain files (for CRIU) in parallel.
public enum ChunkedFiles {
    public struct Item: Sendable {
        public var path: String
        public var size: UInt64
        public var chunks: [String]
        /// Content-defined chunks: where each begins in the file, and where the file ends (one more than
        /// `chunks`); nil for fixed ones, at multiples of the store's chunk size.
        private var offsets: [UInt64]?

        /// `lengths`: content-defined chunks' lengths (`Manifest.FileEntry.chunkLengths`); nil for fixed ones.
        public init(path: String, size: UInt64, chunks: [String], lengths: [Int]? = nil) {
            self.path = path
            self.size = size
            self.chunks = chunks
            offsets = lengths.map { lengths in lengths.reduce(into: [0]) { $0.append($0.last! + UInt64($1)) } }
        }

        /// A manifest entry's chunks; nil for a whole file.
        public init?(_ entry: Manifest.FileEntry) {
            guard let chunks = entry.chunks else { return nil }
            self.init(path: entry.path, size: entry.size, chunks: chunks, lengths: entry.chunkLengths)
        }

        /// Refuses a chunk list whose length does not fit the file's size (a damaged manifest).
        func checkChunkCount(chunkSize: Int, checkpoint: String) throws {
            let fits = offsets.map { $0.count == chunks.count + 1 && $0.last == size }
                ?? (UInt64(chunks.count) == (size + UInt64(chunkSize) - 1) / UInt64(chunkSize))
            guard fits else {
                throw StasisError(.integrity, "\(checkpoint)/\(path): the manifest lists \(chunks.count) chunks for \(size) bytes",
                                  hint: "the manifest is damaged")
            }
        }

        /// Where chunk `index` lies in the file.
        public func place(_ index: Int, chunkSize: Int, checkpoint: String) -> ChunkPlace {
            if let offsets {
                return ChunkPlace(checkpoint: checkpoint, file: path, offset: offsets[index], length: Int(offsets[index + 1] - offsets[index]))
            }
            let offset = UInt64(index) * UInt64(chunkSize)
            return ChunkPlace(checkpoint: checkpoint, file: path, offset: offset, length: Int(min(UInt64(chunkSize), size - offset)))
        }
    }

    /// What is wrong with a manifest entry's chunk list that the manifest's shape check cannot see: whether it
    /// matches the file's SHA-256 (which needs hashing). Its count and names are `Manifest.validate`'s, which
    /// every decoded manifest has passed.
    public static func problem(with entry: Manifest.FileEntry) -> String? {
        guard let chunks = entry.chunks, ChunkDigest.ofFile(chunks: chunks) != entry.sha256 else { return nil }
        return "the chunk list of \(entry.path) does not match its SHA-256"
    }

    /// Refuses, naming the first one, when a chunk of `items` is not in the store: the one check a streamed
    /// restore can make before CRIU starts without reading every chunk.
    public static func requirePresent(_ items: [Item], in store: ChunkStore, checkpoint: String, chunkSize: Int) throws {
        for item in items {
            for (index, digest) in item.chunks.enumerated() where !digest.isEmpty && !store.contains(digest) {
                throw StasisError(.integrity, "chunk \(digest) of \(item.place(index, chunkSize: chunkSize, checkpoint: checkpoint).text) is missing from the store \(store.path)",
                                  hint: "the store lost chunks (removed by hand?); restore from another copy")
            }
        }
    }

    /// Reads and checks every chunk of `items`; with `target`, also writes each file there (zero chunks stay
    /// holes). Throws the first problem, naming the checkpoint, file and byte range. Returns the plain bytes.
    /// `threads` workers each read, decode, check and place one chunk at a time (a chunk-sized buffer or two
    /// each); the default keeps many reads in flight for a cold store (`WorkerGroup.ioDepth`).
    @discardableResult
    public static func read(_ items: [Item], from store: ChunkStore, checkpoint: String, chunkSize: Int, into target: String? = nil,
                            threads: Int = WorkerGroup.ioDepth,
                            progress: (@Sendable (UInt64) -> Void)? = nil) throws -> UInt64 {
        for item in items { try item.checkChunkCount(chunkSize: chunkSize, checkpoint: checkpoint) }
        // Every file first gets its size, so the workers can place any chunk at its offset.
        var outputs: [RebuiltFile] = []
        defer { for output in outputs { output.close() } }
        if let target {
            for item in items { outputs.append(try RebuiltFile(path: target + "/" + item.path, size: item.size)) }
        }
        var jobs: [(file: Int, index: Int)] = []
        for (file, item) in items.enumerated() {
            for (index, digest) in item.chunks.enumerated() where !digest.isEmpty { jobs.append((file, index)) }
        }
        let nextJob = Locked(0)
        let failure = FirstFailure()  // the first problem found is named
        let (allJobs, files) = (jobs, outputs)
        let workers = max(1, min(threads, jobs.count))
        WorkerGroup.run(workers, name: "stasis-read") { _ in
            let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkFormat.scratchSize(chunkSize), alignment: 4096)
            defer { plain.deallocate(); scratch.deallocate() }
            while failure.error == nil, let next = nextJob.takeNext(below: allJobs.count) {
                let (file, index) = allJobs[next]
                let item = items[file]
                let place = item.place(index, chunkSize: chunkSize, checkpoint: checkpoint)
                do {
                    if files.isEmpty {
                        try store.read(item.chunks[index], into: UnsafeMutableRawBufferPointer(rebasing: plain[0..<place.length]), scratch: scratch, place: place)
                    } else {
                        try files[file].fill(offset: place.offset, length: place.length, bounce: plain) { output in
                            _ = try store.read(item.chunks[index], into: output, scratch: scratch, place: place)
                        }
                    }
                    progress?(UInt64(place.length))
                } catch {
                    failure.set(error)
                }
            }
        }
        try failure.check()
        return items.reduce(0) { $0 + $1.size }
    }

    /// A file being rebuilt. Chunks are decoded straight into a shared mapping of it: on tmpfs, where
    /// `restore --rebuild-dir /dev/shm` rebuilds, concurrent `pwrite`s to one file serialise on its inode lock (measured on the 16-core GPU
    /// machine: 2.4 GB/s with 14 cores busy, most of it system time), while faults in a mapping do not, and
    /// the copy out of a buffer goes away. Each range is populated (MADV_POPULATE_WRITE) before it is
    /// written, so a full filesystem is an error there, never a SIGBUS. Where the kernel cannot populate
    /// (before Linux 5.14) or the file cannot be mapped, chunks go through `pwrite` as before.
    // @unchecked Sendable: workers write disjoint ranges of the mapping (one chunk each); the descriptor and mapping are set once.
    final class RebuiltFile: @unchecked Sendable {
        let path: String
        private let fd: FileDescriptor
        private let mapping: SharedMapping?

        init(path: String, size: UInt64) throws {
            self.path = path
            fd = try attempt("cannot create", path) {
                try FileDescriptor.open(path, .readWrite, options: [.create, .truncate], permissions: .ownerReadWrite)
            }
            do {
                try fd.setSize(size)
            } catch {
                fd.closeQuietly()
                throw systemError("cannot size", path, error)
            }
            mapping = SharedMapping(fd, length: Int(size))
        }

        /// Gives `decode` the bytes [offset, offset + length) of the file to fill, and makes them the file's.
        func fill(offset: UInt64, length: Int, bounce: UnsafeMutableRawBufferPointer, _ decode: (UnsafeMutableRawBufferPointer) throws -> Void) throws {
            // madvise wants a page-aligned start: chunk sizes are whole pages (a damaged manifest aside).
            if let mapping, offset % 4096 == 0 {
                do {
                    try mapping.populate(offset: Int(offset), count: length)
                } catch {
                    throw [.badAddress, .noMemory, .noSpace].contains(error) ? noSpace() : systemError("cannot populate", path, error)
                }
                try decode(UnsafeMutableRawBufferPointer(start: mapping.base + Int(offset), count: length))
                return
            }
            let output = UnsafeMutableRawBufferPointer(rebasing: bounce[0..<length])
            try decode(output)
            do {
                try fd.write(all: UnsafeRawBufferPointer(output), at: Int64(offset))
            } catch {
                throw error.isNoSpace ? noSpace() : systemError("cannot write", path, error)
            }
        }

        private func noSpace() -> StasisError {
            StasisError(.noSpace, "no space left to rebuild \(path)", hint: "rebuild elsewhere with --rebuild-dir")
        }

        func close() {
            mapping?.unmap()
            fd.closeQuietly()
        }
    }

}

// MARK: - streaming

extension ChunkedFiles {
    /// Writes the plain bytes of `item` to `fd` (a pipe to CRIU), in order, decoding and checking chunks ahead
    /// on up to `threads` workers. Zero chunks go by vmsplice from `zeroPages`. Throws the first problem, naming
    /// the checkpoint, file and byte range; what was written before it stays written (the reader sees the
    /// stream end early).
    ///
    /// Memory: every stream has two chunk buffers of its own, so it always makes progress whatever other
    /// streams hold (CRIU restores the processes of a tree at once, each reading its own image), and borrows
    /// up to 2 x `threads` - 2 more from `StreamBudget` while they are free. All streams together hold at most
    /// 2 per stream plus the budget, however many run. `written` is told the length of each chunk once it
    /// is in the pipe (a restore's progress).
    public static func stream(_ item: Item, from store: ChunkStore, checkpoint: String, chunkSize: Int, to fd: FileDescriptor,
                              threads: Int = ProcessInfo.processInfo.activeProcessorCount,
                              written: (@Sendable (Int) -> Void)? = nil) throws {
        try item.checkChunkCount(chunkSize: chunkSize, checkpoint: checkpoint)
        guard !item.chunks.isEmpty else { return }
        let borrowed = StreamBudget.shared.take(upTo: min(2 * threads, item.chunks.count) - 2, chunkSize: chunkSize)
        defer { StreamBudget.shared.give(borrowed, chunkSize: chunkSize) }
        let window = OrderedWindow(slots: 2 + borrowed, chunkSize: chunkSize, count: item.chunks.count)
        defer { window.release() }
        let zerosBySplice = chunkSize <= zeroPages.count  // else zero chunks are decoded as zeros like any other
        // Worker 0 writes in order; the others decode ahead.
        let decoders = max(1, min(threads, 2 + borrowed))
        WorkerGroup.run(1 + decoders, name: "stasis-stream") { worker in
            if worker == 0 {
                for index in 0..<item.chunks.count {
                    guard let decoded = window.next(index) else { return }
                    let length = item.place(index, chunkSize: chunkSize, checkpoint: checkpoint).length
                    do throws(Errno) {
                        if item.chunks[index].isEmpty && zerosBySplice {
                            try fd.vmspliceAll(UnsafeRawBufferPointer(rebasing: zeroPages[0..<length]))
                        } else {
                            try fd.write(all: UnsafeRawBufferPointer(rebasing: decoded[0..<length]))
                        }
                    } catch {
                        window.fail(systemError("cannot stream \(item.path) to CRIU", "the pipe", error))
                        return
                    }
                    window.written(index)
                    written?(length)
                }
                return
            }
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkFormat.scratchSize(chunkSize), alignment: 4096)
            defer { scratch.deallocate() }
            while let (index, buffer) = window.claim() {
                let place = item.place(index, chunkSize: chunkSize, checkpoint: checkpoint)
                let output = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<place.length])
                do {
                    if item.chunks[index].isEmpty {
                        if !zerosBySplice { output.initializeMemory(as: UInt8.self, repeating: 0) }
                    } else {
                        try store.read(item.chunks[index], into: output, scratch: scratch, place: place)
                    }
                    window.ready(index)
                } catch {
                    window.fail(error)
                }
            }
        }
        if let error = window.failure { throw error }
    }

    /// Chunk buffers that streams may borrow beyond their own two: 64 MiB, or 4 per core if that is more.
    final class StreamBudget: Sendable {
        static let shared = StreamBudget(bytes: max(64 << 20, 4 * ProcessInfo.processInfo.activeProcessorCount * ChunkFormat.chunkSize))
        private let free: Locked<Int>
        init(bytes: Int) { free = Locked(bytes) }

        /// Takes up to `count` buffers of `chunkSize` bytes without waiting; returns how many it took.
        func take(upTo count: Int, chunkSize: Int) -> Int {
            free.withLock { free in
                let taken = max(0, min(count, free / chunkSize))
                free -= taken * chunkSize
                return taken
            }
        }

        func give(_ count: Int, chunkSize: Int) { free.withLock { $0 += count * chunkSize } }
    }

    /// Zeros for zero chunks, handed to pipes by reference: allocated once, never written after.
    nonisolated(unsafe) static let zeroPages: UnsafeMutableRawBufferPointer = {
        let pages = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkFormat.chunkSize, alignment: 4096)
        pages.initializeMemory(as: UInt8.self, repeating: 0)
        return pages
    }()

    /// Chunk buffers decoded out of order and written in order: slot `i % slots` holds chunk `i`, and a worker
    /// may claim chunk `i` only once chunk `i - slots` has been written.
    // @unchecked Sendable: its slots' states are reached only under its condition's lock; a slot's buffer belongs to the one thread that claimed it.
    private final class OrderedWindow: @unchecked Sendable {
        private let condition = Monitor()
        private let buffers: [UnsafeMutableRawBufferPointer]
        private let count: Int
        private var claimed = 0        // chunks handed to workers so far
        private var writtenUpTo = 0    // chunks written so far
        private var isReady: [Bool]
        private(set) var failure: Error?

        init(slots: Int, chunkSize: Int, count: Int) {
            buffers = (0..<min(slots, count)).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096) }
            self.count = count
            isReady = Array(repeating: false, count: count)
        }

        func release() { for buffer in buffers { buffer.deallocate() } }

        /// The next chunk to decode and its buffer; nil when all are claimed or the stream failed.
        func claim() -> (Int, UnsafeMutableRawBufferPointer)? {
            condition.withLock {
                while failure == nil, claimed < count, claimed >= writtenUpTo + buffers.count { condition.wait() }
                guard failure == nil, claimed < count else { return nil }
                defer { claimed += 1 }
                return (claimed, buffers[claimed % buffers.count])
            }
        }

        func ready(_ index: Int) {
            condition.withLock {
                isReady[index] = true
                condition.broadcast()
            }
        }

        /// Waits until chunk `index` is decoded; nil when the stream failed.
        func next(_ index: Int) -> UnsafeMutableRawBufferPointer? {
            condition.withLock {
                while failure == nil, !isReady[index] { condition.wait() }
                return failure == nil ? buffers[index % buffers.count] : nil
            }
        }

        func written(_ index: Int) {
            condition.withLock {
                writtenUpTo = index + 1
                condition.broadcast()
            }
        }

        func fail(_ error: Error) {
            condition.withLock {
                if failure == nil { failure = error }
                condition.broadcast()
            }
        }
    }
}
