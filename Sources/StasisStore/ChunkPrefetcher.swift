import Foundation
import StasisCore
import StasisOS

/// Reads chunk files into the page cache ahead of the restore that needs them, so that a restore from a cold
/// disk keeps the disk busy from its first instant and overlaps its reads with its other steps. Started before
/// CRIU, it reads CRIU's images first (CRIU needs them at once), then the agents' device memory, in the order
/// the refill takes it, which the refill then finds in memory while CRIU still restores the tree. A chunk
/// whose first bytes are in the page cache is taken to be there whole and skipped. Each worker
/// reads one chunk file at a time to its end (the data is dropped; the page cache keeps it), so a few workers
/// keep a few reads in flight, in order, and CRIU's own reads are not queued behind gigabytes of device
/// memory (first seen on the H100 with WILLNEED hints for every chunk at once: CRIU's restore went from 3.1
/// to 7.4 s and the whole restore gained nothing). A chunk it did not reach is read as before, and it stops at
/// `budget` bytes (half the memory available, by default), so that it never pushes out what the restore needs.
public final class ChunkPrefetcher: @unchecked Sendable {
    // @unchecked Sendable: what changes is behind `state`'s lock; the rest is set once.
    private let store: ChunkStore
    private let digests: [String]
    private let budget: UInt64
    private let state = Locked<(next: Int, read: UInt64, stopped: Bool, started: Bool)>((0, 0, false, false))
    /// Signalled when the workers are done (started or not).
    private let finished = DispatchSemaphore(value: 0)

    /// The chunks of `items` in order, each once, zero chunks (empty digests) left out.
    public init(store: ChunkStore, items: [ChunkedFiles.Item], budget: UInt64? = nil) {
        var seen = Set<String>()
        digests = items.flatMap(\.chunks).filter { !$0.isEmpty && seen.insert($0).inserted }
        self.store = store
        self.budget = budget ?? (HostFacts.availableMemoryBytes() ?? 0) / 2
    }

    /// Starts `threads` workers (the store's `WorkerGroup`, run from a thread of its own); returns at once.
    public func start(threads: Int = 8) {
        guard state.withLock({ state in defer { state.started = true }; return !state.started }) else { return }
        Thread.detachNewThread { [self] in
            WorkerGroup.run(threads, name: "stasis-prefetch") { _ in self.readAhead() }
            finished.signal()
        }
    }

    /// One worker: takes the next chunk and reads it to its end, unless it is cached already.
    private func readAhead() {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        while let digest = take() {
            let read = store.readAhead(digest, buffer: buffer)
            state.withLock { $0.read += read }
        }
    }

    private func take() -> String? {
        state.withLock { state in
            guard !state.stopped, state.next < digests.count, state.read < budget else { return nil }
            defer { state.next += 1 }
            return digests[state.next]
        }
    }

    /// Stops handing out chunks and waits for the workers (each finishes the chunk it reads); returns the
    /// bytes read.
    @discardableResult
    public func stop() -> UInt64 {
        if state.withLock({ state in state.stopped = true; return state.started }) { finished.wait() }
        return state.withLock { $0.read }
    }
}
