import CStasisAgentProtocol
import CStasisLinux
import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisStore

/// A stand-in for the other end of the agent's control channel, for tests and benchmarks without a GPU: it
/// answers as libstasis-agent.so does (stasis_agent_protocol.h), on the same socket name with this process's
/// PID, with its "device memory" in host buffers and its ring in this process's memory (a shared memfd as the
/// agent's, or with `sharedRing: false` plain memory as where the agent cannot make one). stasis's side of an
/// evacuation or a refill (AgentSession: its threads, slots, the ring mapped or process_vm_readv/writev, the chunk store) then
/// runs for real; only the GPU copies become memcpy, and with `hashes` the GPU's digest kernel becomes
/// SHA-256 on this CPU. The agent itself is tested on the GPU machine.
/// Answers the control protocol on "@stasis-agent-<this PID>" from a thread of its own.
// @unchecked Sendable: its state is reached only from its own thread, or under its lock.
public final class ProtocolPeer: @unchecked Sendable {
    public typealias Message = stasis_agent_message
    private let listener: Int32
    private let memory: [UInt64: [UInt8]]
    private let ring: UnsafeMutableRawBufferPointer
    private let sharedRing: Bool
    private let slots: Int
    private let failAfter: Int?
    private let hashes: Bool
    private let damageWrites: Bool
    /// Copies into arena pieces (as files in the reserve directory EVACUATE names) instead of the ring.
    private let arena: Bool
    /// The pieces the last evacuation made, given back as blanks at RELEASE (those stasis did not take).
    private var arenaPieces: [String] = []
    private var arenaDirectory = ""
    private let orphanWatch: OrphanWatch?
    private let lock = NSLock()
    /// Released and not refilled yet (RELEASE until RESUME): only a refill can let the program go on.
    private var _contentsLost = false
    public var contentsLost: Bool { lock.withLock { _contentsLost } }
    public var running: Bool { lock.withLock { state == STASIS_AGENT_RUNNING.rawValue } }
    // What the refill wrote, per allocation (the "device memory" after REBACK), in buffers of their own.
    private var _written: [UInt64: UnsafeMutableRawBufferPointer] = [:]
    private var _released = false
    private var _zeroRequests = 0
    private var state = STASIS_AGENT_RUNNING.rawValue
    private let done = DispatchSemaphore(value: 0)

    public var written: [UInt64: [UInt8]] { lock.withLock { _written.mapValues { [UInt8]($0) } } }
    public var released: Bool { lock.withLock { _released } }
    public var zeroRequests: Int { lock.withLock { _zeroRequests } }
    /// The descriptors EXPORT handed out and IMPORT received, by allocation (kept open until `stop`).
    private var _exports: [UInt64: Int32] = [:], _imports: [UInt64: Int32] = [:]
    public var exports: [UInt64: Int32] { lock.withLock { _exports } }
    public var imports: [UInt64: Int32] { lock.withLock { _imports } }
    /// The descriptor that came with the last message, if any.
    private var passed: FileDescriptor?

    /// `hashes`: answers DIGESTS with yes and hashes chunks as the agent's GPU kernel does. `damageWrites`:
    /// flips a byte of every chunk the refill writes (a device that does not hold what was sent).
    /// One peer at a time in a process: they all listen on the same name (this PID's). Suites that run in
    /// parallel wait here for each other.
    private static let turn = DispatchSemaphore(value: 1)

    /// The agent's watch for a stasis that died after RELEASE (orphan.c), as the real agent's functions (a test
    /// dlopens libstasis-agent.so for them): the stand-in calls them where the agent's control thread does,
    /// and says in HELLO that it can resume by itself.
    public struct OrphanWatch: Sendable {
        public var released: @Sendable (Int32) -> Void
        public var storePiece: @Sendable (UnsafeRawPointer) -> Void
        public var resumed: @Sendable () -> Void
        /// Given whether the contents are lost, how long to wait for a connection before the next call (-1: no limit).
        public var step: @Sendable (Bool) -> Int32
        public init(released: @escaping @Sendable (Int32) -> Void, storePiece: @escaping @Sendable (UnsafeRawPointer) -> Void,
                    resumed: @escaping @Sendable () -> Void, step: @escaping @Sendable (Bool) -> Int32) {
            self.released = released
            self.storePiece = storePiece
            self.resumed = resumed
            self.step = step
        }
    }

    public init(memory: [UInt64: [UInt8]], slots: Int, failAfter: Int? = nil, hashes: Bool = false, damageWrites: Bool = false,
                sharedRing: Bool = true, arena: Bool = false, orphanWatch: OrphanWatch? = nil) throws {
        Self.turn.wait()
        self.arena = arena
        self.orphanWatch = orphanWatch
        self.memory = memory
        self.slots = slots
        self.failAfter = failAfter
        self.hashes = hashes
        self.damageWrites = damageWrites
        self.sharedRing = sharedRing
        ring = sharedRing ? Self.sharedRing(bytes: slots * ChunkFormat.chunkSize) : .allocate(byteCount: slots * ChunkFormat.chunkSize, alignment: 4096)
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
        guard bound == 0, listen(listener, 4) == 0 else {
            let reason = String(cString: strerror(errno))
            close(listener)
            freeRing()
            Self.turn.signal()
            throw StasisError(.io, "the protocol peer cannot listen: \(reason)")
        }
        let thread = Thread { [self] in serve() }
        thread.start()
    }

    public func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        done.wait()
        freeRing()
        for buffer in _written.values { buffer.deallocate() }
        for fd in Array(_exports.values) + Array(_imports.values) { close(fd) }
        Self.turn.signal()
    }

    /// A memfd named as the agent's ring, mapped shared.
    private static func sharedRing(bytes: Int) -> UnsafeMutableRawBufferPointer {
        let fd = stasis_memfd(STASIS_AGENT_RING_NAME)
        precondition(fd >= 0 && ftruncate(fd, off_t(bytes)) == 0, "memfd_create: \(String(cString: strerror(errno)))")
        defer { close(fd) }
        let address = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        precondition(address != MAP_FAILED, "mmap: \(String(cString: strerror(errno)))")
        return UnsafeMutableRawBufferPointer(start: address, count: bytes)
    }

    private func freeRing() {
        if sharedRing { munmap(ring.baseAddress, ring.count) } else { ring.deallocate() }
    }

    private func serve() {
        defer { done.signal() }
        while true {
            // As the agent's control thread: while the contents are lost, wait for a connection in turns.
            if let orphanWatch {
                let turn = orphanWatch.step(contentsLost)
                var waiting = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
                if turn >= 0 && poll(&waiting, 1, turn) <= 0 { continue }
            }
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
        message.slot_bytes = UInt32(ChunkFormat.chunkSize)
        message.slot_count = UInt32(slots)
        message.tracked_bytes = memory.values.reduce(0) { $0 + UInt64($1.count) }
        message.state = lock.withLock { state }
        configure(&message)
        _ = withUnsafeBytes(of: &message) { Glibc.send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    private func receive(_ fd: Int32) -> Message? {
        var message = Message()
        passed?.closeQuietly()
        let (failure, descriptor) = withUnsafeMutableBytes(of: &message) { UnixSocket.receive(FileDescriptor(rawValue: fd), into: $0) }
        passed = descriptor
        return failure == nil ? message : nil
    }

    private func session(_ fd: Int32) {
        let ids = memory.keys.sorted()
        while let message = receive(fd) {
            switch message.op {
            case STASIS_AGENT_HELLO.rawValue:
                send(fd, STASIS_AGENT_HELLO) { $0.chunk_flags = self.orphanWatch == nil ? 0 : UInt32(STASIS_AGENT_CAN_RESUME_ITSELF.rawValue) }
            case STASIS_AGENT_RESCUE_STORE.rawValue:
                var piece = message
                withUnsafePointer(to: &piece) { orphanWatch?.storePiece(UnsafeRawPointer($0)) }
            case STASIS_AGENT_QUIESCE.rawValue:
                lock.withLock { state = STASIS_AGENT_HELD.rawValue }
                for id in ids { send(fd, STASIS_AGENT_TABLE_ENTRY) { $0.id = id; $0.length = UInt64(self.memory[id]!.count) } }
                send(fd, STASIS_AGENT_TABLE_END) { $0.id = UInt64(ids.count) }
            case STASIS_AGENT_DIGESTS.rawValue:
                send(fd, STASIS_AGENT_OK) { message in
                    message.length = self.hashes ? 1 : 0
                    if !self.hashes { Self.setText(&message, "this stand-in has no digest kernel") }
                }
            case STASIS_AGENT_EVACUATE.rawValue:
                let directory = withUnsafeBytes(of: message.text) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if arena, hashes, message.length == 1, !directory.isEmpty {
                    guard evacuateIntoArena(fd, ids, directory: directory) else { return }
                } else {
                    guard evacuate(fd, ids, withDigests: hashes && message.length == 1) else { return }
                }
            case STASIS_AGENT_VERIFY.rawValue:
                let chunk = ChunkFormat.chunkSize
                for id in ids {
                    let contents = lock.withLock { _written[id]! }
                    for offset in stride(from: 0, to: contents.count, by: chunk) {
                        let piece = UnsafeRawBufferPointer(rebasing: contents[offset..<min(contents.count, offset + chunk)])
                        send(fd, STASIS_AGENT_DIGEST) { message in
                            message.id = id
                            message.offset = UInt64(offset)
                            message.length = UInt64(piece.count)
                            Self.setDigest(&message, of: piece)
                        }
                    }
                }
                send(fd, STASIS_AGENT_OK)
            case STASIS_AGENT_RELEASE.rawValue:
                // As the agent drops its arena: the pieces stasis did not take go back to the reserve.
                for name in arenaPieces { rename(arenaDirectory + "/" + name, arenaDirectory + "/blank-" + name.dropFirst(6)) }
                arenaPieces = []
                lock.withLock { _released = true; _contentsLost = true; state = STASIS_AGENT_RELEASED.rawValue }
                orphanWatch?.released(fd)
                send(fd, STASIS_AGENT_OK)
            case STASIS_AGENT_REBACK.rawValue:
                lock.withLock {
                    state = STASIS_AGENT_HELD.rawValue
                    for id in ids {
                        _written[id]?.deallocate()
                        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: memory[id]!.count, alignment: 4096)
                        buffer.initializeMemory(as: UInt8.self, repeating: 0xEE)
                        _written[id] = buffer
                    }
                }
                send(fd, STASIS_AGENT_OK)
            case STASIS_AGENT_WRITE.rawValue:
                let slot = ring.baseAddress! + Int(message.slot) * ChunkFormat.chunkSize
                let target = lock.withLock { _written[message.id]! }
                (target.baseAddress! + Int(message.offset)).copyMemory(from: slot, byteCount: Int(message.length))
                if damageWrites { target[Int(message.offset)] ^= 0x5A }
                send(fd, STASIS_AGENT_WRITTEN) { $0.slot = message.slot }
            case STASIS_AGENT_ZERO.rawValue:
                let target = lock.withLock { () -> UnsafeMutableRawBufferPointer in
                    _zeroRequests += 1
                    return _written[message.id]!
                }
                (target.baseAddress! + Int(message.offset)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(message.length))
            case STASIS_AGENT_FLUSH.rawValue:
                send(fd, STASIS_AGENT_OK)
            case STASIS_AGENT_EXPORT.rawValue:
                // A fresh open file stands for the driver's export.
                let exported = open("/dev/null", O_RDONLY | O_CLOEXEC)
                lock.withLock { _exports[message.id] = exported }
                var answer = Message()
                answer.op = STASIS_AGENT_OK.rawValue
                answer.id = message.id
                _ = withUnsafeBytes(of: &answer) { UnixSocket.send(FileDescriptor(rawValue: fd), $0, passing: FileDescriptor(rawValue: exported)) }
            case STASIS_AGENT_IMPORT.rawValue:
                guard let descriptor = passed else { send(fd, STASIS_AGENT_ERROR); return }
                passed = nil
                lock.withLock { _imports[message.id] = descriptor.rawValue }
                send(fd, STASIS_AGENT_OK)
            case STASIS_AGENT_RESUME.rawValue:
                lock.withLock { state = STASIS_AGENT_RUNNING.rawValue; _contentsLost = false }
                orphanWatch?.resumed()
                send(fd, STASIS_AGENT_OK)
            default:
                send(fd, STASIS_AGENT_ERROR)
                return
            }
        }
    }

    private static func setText(_ message: inout Message, _ text: String) {
        withUnsafeMutableBytes(of: &message.text) { bytes in
            for (index, byte) in text.utf8.prefix(bytes.count - 1).enumerated() { bytes[index] = byte }
        }
    }

    /// What the agent's digest kernel reports of a chunk: its SHA-256, and whether it is all zeros.
    private static func setDigest(_ message: inout Message, of bytes: UnsafeRawBufferPointer) {
        let hex = Array(ChunkDigest.hex(bytes).utf8)
        withUnsafeMutableBytes(of: &message.digest) { digest in
            for index in 0..<32 { digest[index] = UInt8(String(decoding: hex[(2 * index)..<(2 * index + 2)], as: UTF8.self), radix: 16)! }
        }
        let zero = !bytes.contains { $0 != 0 }
        message.chunk_flags = UInt32(STASIS_AGENT_CHUNK_DIGEST.rawValue) | (zero ? UInt32(STASIS_AGENT_CHUNK_ZERO.rawValue) : 0)
    }

    /// Copies every chunk that is not zero into a piece of an arena in `directory` as the agent does (there by
    /// DMA into the piece's mapping, here with pwrite after the header's room): FILLED with CHUNK_ARENA, the
    /// piece's name in text, nothing given back; EVACUATED.
    private func evacuateIntoArena(_ fd: Int32, _ ids: [UInt64], directory: String) -> Bool {
        let chunk = ChunkFormat.chunkSize
        let id = String(format: "%016llx", UInt64.random(in: 0...UInt64.max))
        arenaDirectory = directory
        for allocation in ids {
            let bytes = memory[allocation]!
            for offset in stride(from: 0, to: bytes.count, by: chunk) {
                let length = min(chunk, bytes.count - offset)
                var sum = Message()
                bytes.withUnsafeBytes { Self.setDigest(&sum, of: UnsafeRawBufferPointer(rebasing: $0[offset..<(offset + length)])) }
                if sum.chunk_flags & UInt32(STASIS_AGENT_CHUNK_ZERO.rawValue) != 0 {
                    send(fd, STASIS_AGENT_FILLED) {
                        $0.slot = -1; $0.id = allocation; $0.offset = UInt64(offset); $0.length = UInt64(length)
                        $0.chunk_flags = UInt32(STASIS_AGENT_CHUNK_ZERO.rawValue)
                    }
                    continue
                }
                let name = "arena-\(id)-\(arenaPieces.count)"
                let file = open(directory + "/" + name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
                guard file >= 0 else { return false }
                let written = bytes.withUnsafeBytes { pwrite(file, $0.baseAddress! + offset, length, 12) }
                let sized = ftruncate(file, off_t(12 + chunk))
                close(file)
                guard written == length, sized == 0 else { return false }
                arenaPieces.append(name)
                send(fd, STASIS_AGENT_FILLED) {
                    $0.slot = Int32(self.arenaPieces.count - 1); $0.id = allocation; $0.offset = UInt64(offset); $0.length = UInt64(length)
                    $0.digest = sum.digest
                    $0.chunk_flags = sum.chunk_flags | UInt32(STASIS_AGENT_CHUNK_ARENA.rawValue)
                    Self.setText(&$0, name)
                }
            }
        }
        send(fd, STASIS_AGENT_EVACUATED)
        return true
    }

    /// Copies every allocation through the ring as the agent does: FILLED per slot, FREE back, EVACUATED;
    /// `withDigests`: each chunk hashed first, zeros reported without a slot.
    private func evacuate(_ fd: Int32, _ ids: [UInt64], withDigests: Bool) -> Bool {
        let chunk = ChunkFormat.chunkSize
        var free = Array(0..<slots)
        var filled = 0
        for id in ids {
            let bytes = memory[id]!
            for offset in stride(from: 0, to: bytes.count, by: chunk) {
                if let failAfter, filled == failAfter {
                    send(fd, STASIS_AGENT_ERROR) { Self.setText(&$0, "copy failed on purpose") }
                    return false
                }
                let length = min(chunk, bytes.count - offset)
                var sum = Message()
                if withDigests {
                    bytes.withUnsafeBytes { Self.setDigest(&sum, of: UnsafeRawBufferPointer(rebasing: $0[offset..<(offset + length)])) }
                    if sum.chunk_flags & UInt32(STASIS_AGENT_CHUNK_ZERO.rawValue) != 0 {
                        send(fd, STASIS_AGENT_FILLED) {
                            $0.slot = -1; $0.id = id; $0.offset = UInt64(offset); $0.length = UInt64(length)
                            $0.chunk_flags = UInt32(STASIS_AGENT_CHUNK_ZERO.rawValue)
                        }
                        filled += 1
                        continue
                    }
                }
                while free.isEmpty {
                    guard let back = receive(fd), back.op == STASIS_AGENT_FREE.rawValue else { return false }
                    free.append(Int(back.slot))
                }
                let slot = free.removeLast()
                bytes.withUnsafeBytes { source in
                    (ring.baseAddress! + slot * chunk).copyMemory(from: source.baseAddress! + offset, byteCount: length)
                }
                send(fd, STASIS_AGENT_FILLED) {
                    $0.slot = Int32(slot); $0.id = id; $0.offset = UInt64(offset); $0.length = UInt64(length)
                    $0.digest = sum.digest
                    $0.chunk_flags = sum.chunk_flags
                }
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
