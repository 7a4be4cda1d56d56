import CStasisAgentProtocol
import Foundation
import Glibc
import StasisCore
@testable import StasisGPU
import StasisStore
import Testing

/// The other end of the control channel without a GPU: `ProtocolPeer` answers as libstasis-agent.so does
/// (stasis_agent_protocol.h), on the same socket name with this process's PID, with its "device memory" in
/// host buffers and its ring in this process's memory, so that AgentSession's evacuation, release and refill
/// (its threads, slots and messages) run for real against it. The agent itself runs on the GPU machine.
@Suite(.serialized) struct AgentProtocolTests {
    @Test func evacuationAndRefillGiveTheSameBytesBack() throws {
        let chunk = ChunkStore.chunkSize
        var random = SystemRandomNumberGenerator()
        let memory: [UInt64: [UInt8]] = [
            0x10: (0..<(5 * chunk / 2)).map { _ in UInt8.random(in: 0...255, using: &random) },  // 2.5 chunks
            0x11: [UInt8](repeating: 0, count: 2 * chunk),                                        // zeros: ZERO, no slot
            0x12: (0..<(3 * chunk)).map { UInt8(truncatingIfNeeded: $0 / 4096) },                  // compressible
        ]
        let peer = try ProtocolPeer(memory: memory, slots: 4)
        defer { peer.stop() }
        let directory = Harness.scratch("agent-protocol")
        let store = try ChunkStore(path: directory + "/store", create: true)
        let session = try #require(try AgentSession.open(pid: getpid()))
        try session.startQuiesce(timeoutMilliseconds: 1000)
        try session.finishQuiesce()
        #expect(session.allocations.map(\.id).sorted() == [0x10, 0x11, 0x12])
        let sink = ChunkSink(store: store, codec: .lz4, probe: true)
        let chunks = try session.evacuate(into: sink, threads: 3)
        try sink.commit()
        #expect(chunks[0x11] == ["", ""])
        #expect(chunks[0x10]?.count == 3 && chunks[0x12]?.count == 3)
        try session.release()
        #expect(peer.released)
        try session.refill(allocations: session.allocations, from: store, chunks: chunks, checkpoint: directory, threads: 3)
        try session.resume()
        session.disconnect()
        #expect(peer.written == memory)
        #expect(peer.zeroRequests == 2)
    }

    /// A process left held after its memory was released (a put-back that failed) is put back by `stasis resume`
    /// from the rescue entry the evacuation wrote; the entry then goes.
    @Test func stasisResumePutsBackWhatARescueEntryHolds() throws {
        let chunk = ChunkStore.chunkSize
        let memory: [UInt64: [UInt8]] = [0x30: (0..<(3 * chunk)).map { UInt8(truncatingIfNeeded: $0 &* 31 / 7) }, 0x31: [UInt8](repeating: 0, count: chunk)]
        let peer = try ProtocolPeer(memory: memory, slots: 4)
        defer { peer.stop() }
        let storePath = Harness.scratch("agent-rescue") + "/store"
        let store = try ChunkStore(path: storePath, create: true)
        let session = try #require(try AgentSession.open(pid: getpid()))
        try session.startQuiesce(timeoutMilliseconds: 1000)
        try session.finishQuiesce()
        let sink = ChunkSink(store: store, codec: .lz4, probe: true)
        let chunks = try session.evacuate(into: sink, threads: 2)
        try sink.commit()
        let record = Manifest.AgentMemory(
            allocations: session.allocations.map { .init(id: $0.id, bytes: $0.bytes, device: $0.device, file: AgentEvacuation.file(pid: getpid(), id: $0.id)) },
            evacuatedBytes: session.evacuableBytes, driverPathBytes: 0, ringBytes: 0, quiesceSeconds: 0, evacuateSeconds: 0, releaseSeconds: 0)
        try AgentEvacuation.writeRescue(pid: getpid(), memory: record, chunks: chunks, store: store)
        try session.release()
        session.disconnect()
        // gc keeps what the rescue entry lists.
        #expect(try Harness.stasis("gc", "--store", storePath, "--grace", "0").succeeded)
        let resumed = try Harness.stasis("resume", String(getpid()), "--store", storePath)
        #expect(resumed.succeeded, "\(resumed.stderr)")
        #expect(resumed.stdout.contains("resumed PID \(getpid())"))
        #expect(peer.written == memory)
        #expect(AgentEvacuation.rescue(pid: getpid(), in: store) == nil)
        let again = try Harness.stasis("resume", String(getpid()), "--store", storePath)
        #expect(!again.succeeded && again.stderr.contains("holds no device memory of PID"))
    }

    @Test func anAgentErrorDuringTheEvacuationIsReportedWithItsWords() throws {
        let chunk = ChunkStore.chunkSize
        let peer = try ProtocolPeer(memory: [0x20: [UInt8](repeating: 7, count: 6 * chunk)], slots: 2, failAfter: 3)
        defer { peer.stop() }
        let store = try ChunkStore(path: Harness.scratch("agent-protocol-error") + "/store", create: true)
        let session = try #require(try AgentSession.open(pid: getpid()))
        try session.startQuiesce(timeoutMilliseconds: 1000)
        try session.finishQuiesce()
        let error = #expect(throws: StasisError.self) { _ = try session.evacuate(into: ChunkSink(store: store, codec: .lz4), threads: 2) }
        #expect(error?.message.contains("copy failed on purpose") == true, "\(String(describing: error))")
        #expect(!peer.released)
    }
}

/// Answers the control protocol on "@stasis-agent-<this PID>" from a thread of its own.
final class ProtocolPeer: @unchecked Sendable {
    typealias Message = stasis_agent_message
    private let listener: Int32
    private let memory: [UInt64: [UInt8]]
    private let ring: UnsafeMutableRawBufferPointer
    private let slots: Int
    private let failAfter: Int?
    private let lock = NSLock()
    private var _written: [UInt64: [UInt8]] = [:]
    private var _released = false
    private var _zeroRequests = 0
    private let done = DispatchSemaphore(value: 0)

    var written: [UInt64: [UInt8]] { lock.withLock { _written } }
    var released: Bool { lock.withLock { _released } }
    var zeroRequests: Int { lock.withLock { _zeroRequests } }

    init(memory: [UInt64: [UInt8]], slots: Int, failAfter: Int? = nil) throws {
        self.memory = memory
        self.slots = slots
        self.failAfter = failAfter
        ring = .allocate(byteCount: slots * ChunkStore.chunkSize, alignment: 4096)
        listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let name = Array((STASIS_AGENT_SOCKET_PREFIX + "\(getpid())").utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { path in
            path[0] = 0
            for (index, byte) in name.enumerated() { path[index + 1] = byte }
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + 1 + name.count)
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) } }
        guard bound == 0, listen(listener, 4) == 0 else { throw StasisError(.io, "the protocol peer cannot listen: \(String(cString: strerror(errno)))") }
        let thread = Thread { [self] in serve() }
        thread.start()
    }

    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        done.wait()
        ring.deallocate()
    }

    private func serve() {
        defer { done.signal() }
        while true {
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            session(fd)
            close(fd)
        }
    }

    private func send(_ fd: Int32, _ op: stasis_agent_op, configure: (inout Message) -> Void = { _ in }) {
        var message = Message()
        message.op = op.rawValue
        message.version = UInt32(STASIS_AGENT_PROTOCOL_VERSION)
        message.ring_address = UInt64(UInt(bitPattern: ring.baseAddress!))
        message.slot_bytes = UInt32(ChunkStore.chunkSize)
        message.slot_count = UInt32(slots)
        message.tracked_bytes = memory.values.reduce(0) { $0 + UInt64($1.count) }
        configure(&message)
        _ = withUnsafeBytes(of: &message) { Glibc.send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    private func receive(_ fd: Int32) -> Message? {
        var message = Message()
        let got = withUnsafeMutableBytes(of: &message) { recv(fd, $0.baseAddress!, $0.count, Int32(MSG_WAITALL)) }
        return got == MemoryLayout<Message>.size ? message : nil
    }

    private func session(_ fd: Int32) {
        let ids = memory.keys.sorted()
        while let message = receive(fd) {
            switch message.op {
            case STASIS_AGENT_HELLO.rawValue:
                send(fd, STASIS_AGENT_HELLO)
            case STASIS_AGENT_QUIESCE.rawValue:
                for id in ids { send(fd, STASIS_AGENT_TABLE_ENTRY) { $0.id = id; $0.length = UInt64(self.memory[id]!.count) } }
                send(fd, STASIS_AGENT_TABLE_END) { $0.id = UInt64(ids.count) }
            case STASIS_AGENT_EVACUATE.rawValue:
                guard evacuate(fd, ids) else { return }
            case STASIS_AGENT_RELEASE.rawValue:
                lock.withLock { _released = true }
                send(fd, STASIS_AGENT_OK)
            case STASIS_AGENT_REBACK.rawValue:
                lock.withLock { for id in ids { _written[id] = [UInt8](repeating: 0xEE, count: memory[id]!.count) } }
                send(fd, STASIS_AGENT_OK)
            case STASIS_AGENT_WRITE.rawValue:
                let slot = ring.baseAddress! + Int(message.slot) * ChunkStore.chunkSize
                lock.withLock {
                    let bytes = UnsafeRawBufferPointer(start: slot, count: Int(message.length))
                    _written[message.id]!.replaceSubrange(Int(message.offset)..<Int(message.offset + message.length), with: bytes)
                }
                send(fd, STASIS_AGENT_WRITTEN) { $0.slot = message.slot }
            case STASIS_AGENT_ZERO.rawValue:
                lock.withLock {
                    _zeroRequests += 1
                    _written[message.id]!.replaceSubrange(Int(message.offset)..<Int(message.offset + message.length),
                                                          with: [UInt8](repeating: 0, count: Int(message.length)))
                }
            case STASIS_AGENT_FLUSH.rawValue, STASIS_AGENT_RESUME.rawValue:
                send(fd, STASIS_AGENT_OK)
            default:
                send(fd, STASIS_AGENT_ERROR)
                return
            }
        }
    }

    /// Copies every allocation through the ring as the agent does: FILLED per slot, FREE back, EVACUATED.
    private func evacuate(_ fd: Int32, _ ids: [UInt64]) -> Bool {
        let chunk = ChunkStore.chunkSize
        var free = Array(0..<slots)
        var filled = 0
        for id in ids {
            let bytes = memory[id]!
            for offset in stride(from: 0, to: bytes.count, by: chunk) {
                if let failAfter, filled == failAfter {
                    send(fd, STASIS_AGENT_ERROR) { message in
                        withUnsafeMutableBytes(of: &message.text) { text in
                            for (index, byte) in "copy failed on purpose".utf8.enumerated() { text[index] = byte }
                        }
                    }
                    return false
                }
                while free.isEmpty {
                    guard let back = receive(fd), back.op == STASIS_AGENT_FREE.rawValue else { return false }
                    free.append(Int(back.slot))
                }
                let slot = free.removeLast(), length = min(chunk, bytes.count - offset)
                bytes.withUnsafeBytes { source in
                    (ring.baseAddress! + slot * chunk).copyMemory(from: source.baseAddress! + offset, byteCount: length)
                }
                send(fd, STASIS_AGENT_FILLED) { $0.slot = Int32(slot); $0.id = id; $0.offset = UInt64(offset); $0.length = UInt64(length) }
                filled += 1
            }
        }
        while free.count < slots {
            guard let back = receive(fd), back.op == STASIS_AGENT_FREE.rawValue else { return false }
            free.append(Int(back.slot))
        }
        send(fd, STASIS_AGENT_EVACUATED)
        return true
    }
}
