import Foundation
import StasisCore
import StasisOS

/// Cuts files into chunks and puts them in a store, on every core, while another process (CRIU) is still
/// writing them front to back: a chunk is taken as soon as its bytes exist, so when the writer finishes only
/// the tails are left. Reading, hashing, compressing and writing overlap across the workers; memory stays
/// bounded at two chunk-sized buffers per worker. New chunks become visible in the store at `finish`, all
/// made durable by one syncfs (see `any ChunkBatch`).
///
/// A file may also arrive as a stream instead of in `directory` (`receive`, `endStream`: CRIU's pages through
/// its page-server protocol): its bytes are read once, into chunk buffers the workers take as they are, and
/// the file never exists on disk. Those buffers are bounded too: the queue's two per worker, one per worker
/// at work, and the one being filled, reused rather than freed until the end.
// @unchecked Sendable: its queue, offsets, streams and results are reached only under its condition's lock;
// buffers belong to one worker (or the one receiving thread of a stream) at a time.
public final class ChunkIngester: @unchecked Sendable {
    /// A file as chunks: `chunks[i]` is the digest of its i-th chunk, "" for a chunk of zeros. Fixed chunks
    /// (`lengths` nil) hold bytes [i * chunkSize, ...); content-defined ones are `lengths[i]` long, in order.
    public struct File: Sendable {
        public var size: UInt64
        public var chunks: [String]
        public var lengths: [Int]?
    }

    public struct Statistics: Codable, Sendable, Equatable {
        /// Bytes of the files cut into chunks.
        public var plainBytes: UInt64 = 0
        /// Bytes of new chunk files written to the store (compressed).
        public var storedBytes: UInt64 = 0
        public var newChunks = 0
        public var reusedChunks = 0
        public var zeroChunks = 0
        public init() {}

        public static func - (a: Statistics, b: Statistics) -> Statistics {
            var difference = a
            difference.plainBytes -= b.plainBytes
            difference.storedBytes -= b.storedBytes
            difference.newChunks -= b.newChunks
            difference.reusedChunks -= b.reusedChunks
            difference.zeroChunks -= b.zeroChunks
            return difference
        }

        public static func + (a: Statistics, b: Statistics) -> Statistics {
            var sum = a
            sum.plainBytes += b.plainBytes
            sum.storedBytes += b.storedBytes
            sum.newChunks += b.newChunks
            sum.reusedChunks += b.reusedChunks
            sum.zeroChunks += b.zeroChunks
            return sum
        }
    }

    private struct Job {
        var name: String
        var index: Int
        /// Where a job read from its file starts in it.
        var offset: UInt64
        var length: Int
        /// A streamed file's chunk, already in memory (the worker gives the buffer back); nil: read it from the file.
        var bytes: UnsafeMutableRawBufferPointer?
    }

    /// A file arriving through `receive`: the chunk being filled, and how far it has come.
    private struct Stream {
        var buffer: UnsafeMutableRawBufferPointer?
        var filled = 0
        /// Content-defined: the bytes of `buffer` the cutter has seen (whole pages), all without a cut.
        var scanned = 0
        var index = 0
        var size: UInt64 = 0
        var ended = false
        /// A file in `directory` read as a stream (content-defined chunks), not bytes from a socket.
        var followed = false
        /// A followed file: where the bytes not yet punched out of it begin.
        var punched: UInt64 = 0
    }

    private let directory: String
    private let store: ChunkStore
    private let codec: Codec
    private let follows: @Sendable (String) -> Bool
    private let chunkSize: Int
    /// Content-defined chunk boundaries, or nil for fixed `chunkSize` pieces.
    private let cuts: ContentDefinedChunking?
    /// The plain length of each queued chunk, beside `files` (reported for content-defined chunks).
    private var lengths: [String: [Int]] = [:]
    private let releaseIngested: Bool
    private let sink: ChunkSink
    private let condition = Monitor()
    private var queue: [Job] = []
    private var closed = false
    private var following = true
    private var failure: Error?
    private var files: [String: [String?]] = [:]
    private var queuedUpTo: [String: Int] = [:]  // per file: the chunks handed out so far
    private var descriptors: [String: FileDescriptor] = [:]
    private var running = 0
    private let followerDone = DispatchSemaphore(value: 0)
    private var streams: [String: Stream] = [:]
    /// Chunk buffers of streamed files that workers gave back, for the next chunk to fill.
    private var spareBuffers: [UnsafeMutableRawBufferPointer] = []

    /// Starts `threads` workers and a follower of the files in `directory` whose names satisfy `follows`.
    /// With `releaseIngested`, each chunk's bytes are punched out of its file once stored (the files are
    /// scratch, deleted afterwards): the disk holds at most what is not yet chunked, and CRIU's pages are
    /// mostly dropped from the page cache before they are ever written back. With `contentDefined`, chunks
    /// end where the content says (`ContentDefinedChunking`), at most `chunkSize` long; else every chunk but a
    /// file's last is `chunkSize` long.
    public init(directory: String, store: ChunkStore, codec: Codec, chunkSize: Int = ChunkFormat.chunkSize,
                contentDefined: ContentDefinedChunking? = nil,
                threads: Int = ProcessInfo.processInfo.activeProcessorCount, releaseIngested: Bool = false,
                follows: @escaping @Sendable (String) -> Bool) {
        precondition(contentDefined.map { $0.maximum <= chunkSize } ?? true, "content-defined chunks must fit a chunk buffer")
        self.cuts = contentDefined
        self.releaseIngested = releaseIngested
        self.sink = ChunkSink(store: store, codec: codec)
        self.directory = directory
        self.store = store
        self.codec = codec
        self.chunkSize = chunkSize
        self.follows = follows
        running = max(1, threads)
        for number in 0..<running {
            let thread = Thread { [self] in work() }
            thread.name = "stasis-ingest-\(number)"
            thread.start()
        }
        let follower = Thread { [self] in follow() }
        follower.name = "stasis-ingest-follow"
        follower.start()
    }

    /// Stops following, ingests the rest of the followed files and the whole of `alsoIngest` (names in the
    /// directory, now complete), waits for the workers and returns every file's chunks.
    public func finish(alsoIngest: [String] = []) throws -> (files: [String: File], statistics: Statistics) {
        stopFollowing()
        let (followed, unended, streamed) = condition.withLock {
            (files.keys.filter { streams[$0] == nil || streams[$0]!.followed },
             streams.filter { !$0.value.ended && !$0.value.followed }.keys.sorted(),
             streams.mapValues(\.size))
        }
        var sizes = streamed
        if let name = unended.first {
            cancel()
            throw StasisError(.io, "\(directory)/\(name): its stream of bytes never ended")
        }
        for name in Set(followed + alsoIngest) {
            guard let size = FileSystem.size(directory + "/" + name) else {
                let error = systemError("cannot stat", directory + "/" + name)
                cancel()
                throw error
            }
            sizes[name] = size
            enqueueChunks(of: name, upTo: size, final: true)
        }
        let (error, result, cutLengths) = condition.withLock {
            closed = true
            condition.broadcast()
            while running > 0 { condition.wait() }
            let outcome = (failure, files, lengths)
            for fd in descriptors.values { fd.closeQuietly() }
            descriptors = [:]
            releaseBuffers()
            return outcome
        }
        if let error {
            sink.abandon()
            throw error
        }
        try sink.commit()
        var out: [String: File] = [:]
        for (name, chunks) in result {
            // Every queued chunk has its digest ("" for zeros) once the workers are done without a failure.
            let digests = chunks.compactMap { $0 }
            guard digests.count == chunks.count, let size = sizes[name] else {
                throw StasisError(.io, "\(directory)/\(name): \(chunks.count - digests.count) chunk(s) were never stored")
            }
            out[name] = File(size: size, chunks: digests, lengths: cuts == nil ? nil : cutLengths[name] ?? [])
        }
        return (out, sink.totals)
    }

    /// Stops everything without finishing (the dump failed); chunks already written stay for gc.
    public func cancel() {
        stopFollowing()
        condition.withLock {
            closed = true
            dropQueue()
            condition.broadcast()
            while running > 0 { condition.wait() }
            for fd in descriptors.values { fd.closeQuietly() }
            descriptors = [:]
            releaseBuffers()
        }
        sink.abandon()
    }

    deinit {
        for job in queue { job.bytes?.deallocate() }
        for buffer in spareBuffers + streams.values.compactMap(\.buffer) { buffer.deallocate() }
    }

    // MARK: streamed files

    /// Reads `count` more bytes of file `name` from `source` (a socket) and queues each chunk as it fills.
    /// Throws when `source` ends first, cannot be read, or the ingester has failed or been cancelled.
    public func receive(_ name: String, from source: FileDescriptor, count: Int) throws {
        try receive(name, from: source, count: count, followed: false)
    }

    /// `receive`; `followed`: `source` is the file `name` in `directory`, read from where the last read
    /// ended, and with `releaseIngested` each piece read is punched out of it at once (it is in a buffer).
    private func receive(_ name: String, from source: FileDescriptor, count: Int, followed: Bool) throws {
        var state = try condition.withLock {
            if let failure { throw failure }
            if closed { throw StasisError(.interrupted, "\(directory)/\(name): the chunking was stopped") }
            if files[name] == nil { files[name] = [] }
            var state = streams.removeValue(forKey: name) ?? Stream()
            state.followed = followed
            return state
        }
        // Kept out of `streams` while bytes are read into its buffer; put back on every exit.
        defer { condition.withLock { streams[name] = state } }
        var left = count
        while left > 0 {
            let buffer = try state.buffer ?? takeBuffer()
            state.buffer = buffer
            // Content-defined: read in steps, so that what follows a cut (copied to the next buffer) is short.
            let step = min(chunkSize - state.filled, left, cuts == nil ? Int.max : Self.cutReadStep)
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[state.filled..<state.filled + step])
            let got = try attempt("cannot read the stream of", directory + "/" + name) { try source.read(filling: part) }
            state.filled += got
            state.size += UInt64(got)
            left -= got
            if got < part.count {
                throw StasisError(.io, "\(directory)/\(name): its stream ended \(left) bytes early")
            }
            // Best effort, as for fixed chunks: a filesystem without hole punching keeps the bytes until the end.
            // In steps of a few MiB: each punch takes the file's lock, which CRIU's writes to it need too
            // (punching every 128 KiB read made a dump through files 1.6x slower).
            if followed && releaseIngested && state.size - state.punched >= Self.punchStep {
                source.punchHole(offset: state.punched, length: state.size - state.punched)
                state.punched = state.size
            }
            if let cuts {
                try cutStreamed(name, &state, cuts)
            } else if state.filled == chunkSize {
                try queueStreamed(name, &state)
            }
        }
    }

    static let cutReadStep = 128 << 10
    static let punchStep: UInt64 = 8 << 20

    /// Queues every chunk that the bytes just received end; what follows a cut moves to a fresh buffer.
    private func cutStreamed(_ name: String, _ state: inout Stream, _ cuts: ContentDefinedChunking) throws {
        while let buffer = state.buffer {
            let (consumed, cut) = cuts.scan(UnsafeRawBufferPointer(rebasing: buffer[state.scanned..<state.filled]), chunkLength: state.scanned)
            state.scanned += consumed
            guard cut else { return }
            let rest = state.filled - state.scanned
            let next = rest > 0 ? try takeBuffer() : nil
            next?.copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[state.scanned..<state.filled]))
            state.filled = state.scanned
            do { try queueStreamed(name, &state) } catch { next?.deallocate(); throw error }
            (state.buffer, state.filled) = (next, rest)
        }
    }

    /// File `name` is complete: its last, shorter chunk is queued.
    public func endStream(_ name: String) throws {
        var state = condition.withLock {
            if files[name] == nil { files[name] = [] }
            return streams.removeValue(forKey: name) ?? Stream()
        }
        defer { condition.withLock { streams[name] = state } }
        if state.filled > 0 { try queueStreamed(name, &state) }
        state.ended = true
    }

    /// Bytes received by `receive` so far, over every streamed file (followed files not counted: they are in
    /// `directory`).
    public var streamedBytes: UInt64 { condition.withLock { streams.values.filter { !$0.followed }.reduce(0) { $0 + $1.size } } }

    /// Queues the filled part of `state`'s buffer as its next chunk; waits while the queue is full.
    private func queueStreamed(_ name: String, _ state: inout Stream) throws {
        try condition.withLock {
            while queue.count >= running * 2 && failure == nil && !closed { condition.wait() }
            if let failure { throw failure }
            if closed { throw StasisError(.interrupted, "\(directory)/\(name): the chunking was stopped") }
            // In memory: the job reads no file, so it has no offset to read at.
            queue.append(Job(name: name, index: state.index, offset: 0, length: state.filled, bytes: state.buffer))
            files[name]!.append(nil)
            lengths[name, default: []].append(state.filled)
            (state.buffer, state.filled, state.scanned, state.index) = (nil, 0, 0, state.index + 1)
            condition.broadcast()
        }
    }

    private func takeBuffer() throws -> UnsafeMutableRawBufferPointer {
        if let spare = condition.withLock({ spareBuffers.popLast() }) { return spare }
        return UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
    }

    /// Empties the queue, freeing the buffers its streamed chunks hold. Called with the lock held.
    private func dropQueue() {
        for job in queue { job.bytes?.deallocate() }
        queue.removeAll()
    }

    /// Frees the spare buffers and those of streams left half-filled. Called with the lock held, workers gone.
    private func releaseBuffers() {
        for buffer in spareBuffers { buffer.deallocate() }
        spareBuffers = []
        for name in streams.keys {
            streams[name]?.buffer?.deallocate()
            streams[name]?.buffer = nil
            streams[name]?.filled = 0
            streams[name]?.scanned = 0
        }
    }

    private func stopFollowing() {
        let was = condition.withLock {
            let was = following
            following = false
            return was
        }
        if was { followerDone.wait() }
    }

    // MARK: follower

    private func follow() {
        defer { followerDone.signal() }
        while condition.withLock({ following && failure == nil }) {
            // Polling while CRIU writes: a listing that fails is tried again at the next poll, and `finish`
            // lists the directory once more and throws what it cannot read.
            let names = (try? FileSystem.namesOrNone(in: directory)) ?? []
            var progressed = false
            for name in names where follows(name) {
                guard let size = FileSystem.size(directory + "/" + name) else { continue }
                if enqueueChunks(of: name, upTo: size, final: false) > 0 { progressed = true }
            }
            if !progressed { Thread.sleep(forTimeInterval: 0.02) }
        }
    }

    /// Queues the chunks of `name` that lie below `size` (with `final`, also the last, shorter one); waits
    /// while the queue is full, which bounds memory. Returns how many were queued.
    @discardableResult
    private func enqueueChunks(of name: String, upTo size: UInt64, final: Bool) -> Int {
        if cuts != nil { return enqueueCuts(of: name, upTo: size, final: final) }
        return condition.withLock {
            let start = queuedUpTo[name] ?? 0
            let complete = Int(size / UInt64(chunkSize))
            let end = final ? Int((size + UInt64(chunkSize) - 1) / UInt64(chunkSize)) : complete
            if files[name] == nil { files[name] = [] }
            guard end > start else { return 0 }
            for index in start..<end {
                while queue.count >= running * 2 && failure == nil && !closed { condition.wait() }
                if failure != nil || (closed && !final) { return index - start }
                let length = Int(min(UInt64(chunkSize), size - UInt64(index) * UInt64(chunkSize)))
                queue.append(Job(name: name, index: index, offset: UInt64(index) * UInt64(chunkSize), length: length))
                if files[name]!.count < end { files[name]!.append(contentsOf: [String?](repeating: nil, count: end - files[name]!.count)) }
                queuedUpTo[name] = index + 1
                condition.broadcast()
            }
            return end - start
        }
    }

    /// `enqueueChunks` for content-defined chunks: the file is read front to back as a stream, once (its
    /// cuts depend on what came before), up to the last whole page below `size` (with `final`, to `size`,
    /// and the stream ends). A read that fails fails the ingester, as a worker's would.
    private func enqueueCuts(of name: String, upTo size: UInt64, final: Bool) -> Int {
        let page = UInt64(ContentDefinedChunking.pageSize)
        let limit = final ? size : size / page * page
        let (read, before) = condition.withLock { (streams[name]?.size ?? 0, files[name]?.count ?? 0) }
        do {
            if limit > read { try receive(name, from: try descriptor(name), count: Int(limit - read), followed: true) }
            if final { try endStream(name) }
        } catch {
            condition.withLock {
                if failure == nil { failure = error }
                dropQueue()
                condition.broadcast()
            }
        }
        return condition.withLock { (files[name]?.count ?? 0) - before }
    }

    // MARK: workers

    private func work() {
        let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkSink.scratchSize(chunkSize: chunkSize), alignment: 4096)
        defer {
            plain.deallocate()
            scratch.deallocate()
            condition.withLock {
                running -= 1
                condition.broadcast()
            }
        }
        while let job = nextJob() {
            do {
                let digest: String
                if let streamed = job.bytes {
                    defer { condition.withLock { spareBuffers.append(streamed) } }
                    digest = try sink.put(UnsafeRawBufferPointer(rebasing: streamed[0..<job.length]), scratch: scratch)
                } else {
                    let fd = try descriptor(job.name)
                    let bytes = UnsafeMutableRawBufferPointer(rebasing: plain[0..<job.length])
                    try readFully(fd, into: bytes, at: job.offset, name: job.name)
                    digest = try sink.put(UnsafeRawBufferPointer(bytes), scratch: scratch)
                    if releaseIngested {
                        // Best effort: a filesystem without hole punching keeps the bytes until the file is deleted.
                        fd.punchHole(offset: job.offset, length: UInt64(job.length))
                    }
                }
                condition.withLock { files[job.name]![job.index] = digest }
            } catch {
                condition.withLock {
                    if failure == nil { failure = error }
                    dropQueue()
                    condition.broadcast()
                }
                return
            }
        }
    }

    /// Waits for the next job and takes it; nil when the worker should stop: the queue is closed and empty,
    /// or the ingester failed.
    private func nextJob() -> Job? {
        condition.withLock {
            while queue.isEmpty && !closed { condition.wait() }
            if queue.isEmpty || failure != nil { return nil }
            let job = queue.removeFirst()
            condition.broadcast()
            return job
        }
    }

    private func descriptor(_ name: String) throws -> FileDescriptor {
        try condition.withLock {
            if let fd = descriptors[name] { return fd }
            let path = directory + "/" + name
            let fd = try attempt("cannot open", path) { try FileDescriptor.open(path, releaseIngested ? .readWrite : .readOnly) }
            descriptors[name] = fd
            return fd
        }
    }

    private func readFully(_ fd: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, name: String) throws {
        let got = try attempt("cannot read", directory + "/" + name) { try fd.read(filling: buffer, at: Int64(offset)) }
        if got < buffer.count { throw StasisError(.io, "\(directory)/\(name) ended at \(offset + UInt64(got)) bytes while being cut into chunks") }
    }
}
