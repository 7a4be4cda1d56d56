import Foundation
import StasisCore
import StasisOS

/// The source's side of sending chunks during the dump: the dump's writers hand each new chunk over
/// (`offer`, on their threads; they wait when 32 are queued, so memory stays bounded), and one thread asks the
/// receiver which of a few it lacks and sends those. A failure stops the sending and is thrown by `finish`;
/// the writers are never left waiting.
final class ChunkPreloader: Sendable {
    private let connection: TCPConnection
    private let queue = BlockingQueue<(digest: String, file: Data)>(capacity: ChunkPreloader.capacity)
    private let failure = FirstFailure()
    /// The chunks sent and their bytes (the sending thread's, read once it has ended).
    private let sent = Locked<(digests: Set<String>, bytes: UInt64)>(([], 0))
    private let done = DispatchGroup()
    static let capacity = 32, batch = 16

    init(_ connection: TCPConnection) {
        self.connection = connection
        done.enter()
        let thread = Thread { [self] in
            run()
            done.leave()
        }
        thread.name = "stasis-migrate-send"
        thread.start()
    }

    /// Queues a new chunk, waiting while 32 are; dropped once the sending has stopped (failed, or finished).
    func offer(_ digest: String, _ file: Data) {
        queue.push((digest, file))
    }

    private func run() {
        var asked = Set<String>()
        while let first = queue.pop() {
            // Whatever else is queued goes with it (only this thread pops: a count above 0 is there to take).
            var next = [first]
            while next.count < Self.batch, queue.count > 0, let more = queue.pop() { next.append(more) }
            do {
                let fresh = next.filter { asked.insert($0.digest).inserted }
                guard !fresh.isEmpty else { continue }
                try send(fresh)
            } catch {
                // Stop: what is queued and the writers' next chunks are dropped (the queue is closed), and
                // `finish` throws.
                failure.set(error)
                queue.close()
                return
            }
        }
    }

    /// Asks the receiver which of `chunks` it lacks, and sends those.
    private func send(_ chunks: [(digest: String, file: Data)]) throws {
        try Migration.send(connection, .query, Array(chunks.map(\.digest).joined(separator: "\n").utf8))
        let lacking = Set(String(decoding: try Migration.receive(connection, .need), as: UTF8.self).split(separator: "\n").map(String.init))
        for chunk in chunks where lacking.contains(chunk.digest) {
            let digest = Array(chunk.digest.utf8)
            try digest.withUnsafeBytes { name in
                try chunk.file.withUnsafeBytes { file in try Migration.send(connection, .chunk, parts: [name, file]) }
            }
            sent.withLock {
                $0.bytes += UInt64(chunk.file.count)
                $0.digests.insert(chunk.digest)
            }
        }
    }

    /// Sends what is queued, stops, and says what went: the chunks sent and their bytes. Called again, it
    /// answers the same.
    func finish() throws -> (digests: Set<String>, bytes: UInt64) {
        queue.close()
        done.wait()
        try failure.check()
        return sent.current
    }
}
