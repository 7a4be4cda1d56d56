import Foundation
import Glibc
import StasisCore
import StasisOS

/// Hashes the files of a directory while another process (CRIU) is still writing them front to back, so
/// that when the writer finishes little is left to hash. `stop()` hands the partial hashes over to
/// `ParallelHasher`, which completes them.
public final class GrowingFilesHasher: @unchecked Sendable {
    private let directory: String
    private let matches: @Sendable (String) -> Bool
    private let lock = NSLock()
    private var running = true
    private var hashers: [String: IncrementalFileHash] = [:]
    private let finished = DispatchSemaphore(value: 0)

    /// Starts following the files of `directory` whose names satisfy `matches`.
    public init(directory: String, matches: @escaping @Sendable (String) -> Bool) {
        self.directory = directory
        self.matches = matches
        let thread = Thread { [self] in follow() }
        thread.name = "stasis-hash-follow"
        thread.start()
    }

    /// Stops following (waiting for the thread's current step) and returns the partial hashes, keyed by file
    /// name. Calling it again returns the same hashes at once.
    public func stop() -> [String: IncrementalFileHash] {
        let first = lock.withLock { () -> Bool in
            defer { running = false }
            return running
        }
        if first { finished.wait() }
        return lock.withLock { hashers }
    }

    private func follow() {
        let buffer = IncrementalFileHash.makeBuffer()
        defer { buffer.deallocate(); finished.signal() }
        while lock.withLock({ running }) {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
            var progressed = false
            for name in names where matches(name) {
                guard lock.withLock({ running }) else { return }
                let hasher = lock.withLock { () -> IncrementalFileHash in
                    if let existing = hashers[name] { return existing }
                    let created = IncrementalFileHash(path: directory + "/" + name)
                    hashers[name] = created
                    return created
                }
                // A read error here is not fatal: ParallelHasher retries the file and reports it properly.
                // A bounded step, so stop() never waits for a whole file to be read on this one thread.
                if let got = try? hasher.advance(buffer: buffer, limit: 64 << 20, startWriteback: true), got > 0 {
                    progressed = true
                }
            }
            if !progressed { usleep(20_000) }
        }
    }
}
