import Foundation
import StasisOS

/// The source's side of sending chunks during the dump: the dump's writers hand each new chunk over
/// (`offer`, on their threads; they wait when 32 are queued, so memory stays bounded), and one thread asks the
/// receiver which of a few it lacks and sends those. A failure stops the sending and is thrown by `finish`;
/// the writers are never left waiting.
// @unchecked Sendable: its queue and failure are reached only under its condition's lock.
final class ChunkPreloader: @unchecked Sendable {
    private let connection: TCPConnection
    private let condition = NSCondition()
    private var queue: [(digest: String, file: Data)] = []
    private var closed = false
    private var failure: Error?
    private var asked = Set<String>()
    private var sent = Set<String>()
    private var bytes: UInt64 = 0
    private let done = DispatchSemaphore(value: 0)
    private var finished = false
    static let capacity = 32, batch = 16

    init(_ connection: TCPConnection) {
        self.connection = connection
        let thread = Thread { [self] in
            run()
            done.signal()
        }
        thread.name = "stasis-migrate-send"
        thread.start()
    }

    func offer(_ digest: String, _ file: Data) {
        condition.lock()
        defer { condition.unlock() }
        while queue.count >= Self.capacity && !closed && failure == nil { condition.wait() }
        if !closed && failure == nil { queue.append((digest, file)) }
        condition.broadcast()
    }

    private func run() {
        while true {
            condition.lock()
            while queue.isEmpty && !closed { condition.wait() }
            if queue.isEmpty && closed {
                condition.unlock()
                return
            }
            let next = Array(queue.prefix(Self.batch))
            queue.removeFirst(next.count)
            let skip = failure != nil
            condition.broadcast()
            condition.unlock()
            if skip { continue }
            do {
                let fresh = next.filter { asked.insert($0.digest).inserted }
                guard !fresh.isEmpty else { continue }
                try Migration.send(connection, .query, Array(fresh.map(\.digest).joined(separator: "\n").utf8))
                let lacking = Set(String(decoding: try Migration.receive(connection, .need), as: UTF8.self).split(separator: "\n").map(String.init))
                for chunk in fresh where lacking.contains(chunk.digest) {
                    let digest = Array(chunk.digest.utf8)
                    try digest.withUnsafeBytes { name in
                        try chunk.file.withUnsafeBytes { file in try Migration.send(connection, .chunk, parts: [name, file]) }
                    }
                    bytes += UInt64(chunk.file.count)
                    sent.insert(chunk.digest)
                }
            } catch {
                condition.lock()
                failure = error
                queue.removeAll()
                condition.broadcast()
                condition.unlock()
            }
        }
    }

    /// Sends what is queued, stops, and says what went: the chunks sent and their bytes.
    func finish() throws -> (digests: Set<String>, bytes: UInt64) {
        condition.lock()
        closed = true
        condition.broadcast()
        let wait = !finished
        finished = true
        condition.unlock()
        if wait { done.wait() }
        if let failure { throw failure }
        return (sent, bytes)
    }
}
