import CStasisAgentProtocol
import Foundation
import StasisCore
import StasisOS
import StasisStore

/// What stasis does with the agent of one GPU process (see stasis_agent_protocol.h): hold its CUDA calls,
/// copy its device memory out through the agent's pinned staging ring into the chunk store, give the physical
/// memory back; and later re-create that memory at the same addresses, fill it from the store, and let the
/// calls go on.
///
/// The ring is the agent's (pinned once, when the program first allocates), a slot a 2 MiB chunk, worked on
/// every core so that the agent's copies, stasis's compression and the store's writes overlap. It is a memfd
/// the agent maps shared, and stasis maps the same pages (`ForeignMapping`): a chunk goes from its slot
/// straight into the store's file and back, one copy on the CPU, the slot given back once that copy is done.
/// A ring stasis cannot map (the driver's pinned memory, where the agent could not make a memfd) is read and
/// written with process_vm_readv/writev through a buffer, the slot given back as soon as it is read. Host
/// memory stays bounded by the ring plus two chunk buffers per worker.
///
/// One thread drives a session (its methods are not safe to call concurrently); they use threads of their own.
/// Any failure of the connection drops it, so the next call starts from a fresh connection and a HELLO.
// @unchecked Sendable: one thread drives it (below); its transfers' threads share only Sendable kit types.
public final class AgentSession: @unchecked Sendable {
    public struct Allocation: Sendable {
        public var id: UInt64
        /// Bytes to copy out: 0 for memory imported from another process (its owner moves it).
        public var bytes: UInt64
        public var device: Int32
        /// Shared with other processes through POSIX descriptors: exported (this process owns it) or imported.
        public var exported = false
        public var imported = false
        /// The agent's duplicates of the descriptors it is shared through, as numbers in the process's table.
        public var shareDescriptors: [Int32] = []
        public init(id: UInt64, bytes: UInt64, device: Int32) {
            self.id = id
            self.bytes = bytes
            self.device = device
        }
    }

    public let pid: Int32
    private var channel: AgentChannel?
    public private(set) var allocations: [Allocation] = []
    public private(set) var ringAddress: UInt64 = 0
    public private(set) var slotBytes = 0
    public private(set) var slotCount = 0
    /// The device memory the agent holds, as it said in its last HELLO or table.
    public private(set) var trackedBytes: UInt64 = 0
    /// Set once RELEASE was asked for: from then on only a refill gives the program its memory back.
    public private(set) var released = false
    /// The agent's state in its last HELLO (a stasis_agent_state).
    public private(set) var agentState: UInt32 = 0
    /// Driver entry points the agent had to hand out without its gate (its trampoline table was full).
    public private(set) var ungatedFunctions: UInt64 = 0
    /// The agent takes RESCUE_STORE and puts its memory back itself should this stasis die after RELEASE.
    public private(set) var resumesItself = false
    /// QUIESCE was sent and its answer not read yet.
    private var quiescing = false
    /// The agent hashes chunks on the GPU (`prepareDigests` said so): stasis then does not hash them on its CPUs.
    public private(set) var hashesOnGPU = false
    /// Why it does not, when it was asked and said no.
    public private(set) var noGPUHashing: String?
    /// How long the last refill's check on the GPU took (nil: the chunks were checked on the CPUs as read).
    public private(set) var gpuCheckSeconds: Double?
    /// The ring mapped here (nil: not mapped yet, or not mappable).
    private var mappedRing: ForeignMapping?
    /// The last transfer worked on the ring in place (one CPU copy), not through process_vm_readv/writev.
    public private(set) var ringMapped = false

    private init(pid: Int32, channel: AgentChannel) {
        self.pid = pid
        self.channel = channel
    }

    /// Opens a session with the agent of `pid`, or nil when the process has none.
    public static func open(pid: Int32) throws -> AgentSession? {
        guard let channel = try AgentChannel.connect(pid: pid) else { return nil }
        let session = AgentSession(pid: pid, channel: channel)
        try session.hello()
        return session
    }

    /// A session over a connection made by another process (a test's controller, whose death the agent
    /// must notice: its SO_PEERCRED names that process).
    static func open(pid: Int32, connection: FileDescriptor) throws -> AgentSession {
        let session = AgentSession(pid: pid, channel: AgentChannel.adopting(pid: pid, fd: connection))
        try session.hello()
        return session
    }

    private func connected() throws -> AgentChannel {
        if let channel { return channel }
        guard let fresh = try AgentChannel.connect(pid: pid) else {
            throw StasisError(.gpu, "the agent of PID \(pid) is not listening any more")
        }
        channel = fresh
        try hello()
        return fresh
    }

    private func hello() throws {
        let channel = try connected()
        try channel.send(STASIS_AGENT_HELLO)
        let answer = try channel.expect(STASIS_AGENT_HELLO, doing: "say hello")
        guard answer.version == STASIS_AGENT_PROTOCOL_VERSION else {
            throw StasisError(.gpu, "the agent of PID \(pid) speaks protocol \(answer.version); this stasis speaks \(STASIS_AGENT_PROTOCOL_VERSION)",
                              hint: "start the program with the agent that comes with this stasis")
        }
        adopt(answer)
        ungatedFunctions = answer.ungated_functions
        resumesItself = answer.chunk_flags & UInt32(STASIS_AGENT_CAN_RESUME_ITSELF.rawValue) != 0
    }

    private func adopt(_ facts: AgentChannel.Message) {
        ringAddress = facts.ring_address
        slotBytes = Int(facts.slot_bytes)
        slotCount = Int(facts.slot_count)
        trackedBytes = facts.tracked_bytes
        agentState = facts.state
    }

    /// Ends the connection and waits for the agent to close its end; the agent keeps its state and waits for
    /// the next one (CRIU must not find a connection to a process outside the tree).
    public func disconnect() {
        channel?.closeAndWait()
        channel = nil
        mappedRing = nil
    }

    /// The ring's first byte in this process, when it can be mapped here; set up once a session.
    private func ringHere() -> UnsafeMutableRawPointer? {
        if mappedRing == nil, ringAddress != 0, slotBytes > 0, slotCount > 0 {
            mappedRing = ForeignMapping(pid: pid, address: ringAddress, length: slotBytes * slotCount, memfd: STASIS_AGENT_RING_NAME)
        }
        ringMapped = mappedRing != nil
        return mappedRing?.base
    }

    /// Runs `body` on the connection; a failure drops it, so that a late answer is never taken for the next
    /// request's.
    private func onChannel<T>(_ body: (AgentChannel) throws -> T) throws -> T {
        let channel = try connected()
        do {
            return try body(channel)
        } catch {
            channel.close()
            self.channel = nil
            throw error
        }
    }

    /// Asks the agent to hold new CUDA calls, wait for running ones and synchronise; `finishQuiesce` takes the
    /// answer. Split so that every process of a tree is asked before any answer is awaited: processes that
    /// wait on one another (collectives) then drain together.
    public func startQuiesce(timeoutMilliseconds: UInt32) throws {
        try onChannel { channel in
            // The agent answers within the drain time, plus the synchronisation it allows the same time.
            channel.setTimeout(seconds: Int(timeoutMilliseconds / 1000) * 2 + 60)
            try channel.send(STASIS_AGENT_QUIESCE, length: UInt64(timeoutMilliseconds))
            quiescing = true
        }
    }

    /// The answer to QUIESCE: what memory there is. A refusal (CUDA IPC memory, a thread that stays inside the
    /// driver, a GPU that does not finish) leaves the program running as it was.
    public func finishQuiesce() throws {
        defer { quiescing = false }
        try onChannel { channel in
            defer { channel.setTimeout(seconds: 120) }
            var table: [Allocation] = []
            while true {
                let message = try channel.receive()
                switch message.op {
                case STASIS_AGENT_TABLE_ENTRY.rawValue:
                    var allocation = Allocation(id: message.id, bytes: message.length, device: message.device)
                    allocation.exported = message.chunk_flags & UInt32(STASIS_AGENT_SHARE_EXPORTED.rawValue) != 0
                    allocation.imported = message.chunk_flags & UInt32(STASIS_AGENT_SHARE_IMPORTED.rawValue) != 0
                    let count = min(Int(message.share_count), Int(STASIS_AGENT_MAX_SHARE_FDS))
                    allocation.shareDescriptors = withUnsafeBytes(of: message.digest) { bytes in
                        (0..<count).map { bytes.load(fromByteOffset: $0 * 4, as: Int32.self) }
                    }
                    table.append(allocation)
                case STASIS_AGENT_TABLE_END.rawValue:
                    adopt(message)
                    allocations = table
                    guard table.isEmpty || (ringAddress != 0 && slotBytes == ChunkStore.chunkSize && slotCount > 0) else {
                        throw StasisError(.gpu, "the agent of PID \(pid) has no usable staging ring (\(slotCount) slots of \(slotBytes) bytes)")
                    }
                    return
                case STASIS_AGENT_ERROR.rawValue:
                    throw AgentChannel.error(message, pid: pid, doing: "hold its CUDA calls")
                default:
                    throw StasisError(.gpu, "the agent of PID \(pid) answered \(message.op) to QUIESCE")
                }
            }
        }
    }

    public var evacuableBytes: UInt64 { allocations.reduce(0) { $0 + $1.bytes } }

    /// The allocations this process owns (moved by this agent), and those it imported from others.
    public var ownAllocations: [Allocation] { allocations.filter { !$0.imported } }
    public var importedAllocations: [Allocation] { allocations.filter(\.imported) }

    /// Makes imported allocation `id` this process's own (its exporter is gone): this agent then moves,
    /// re-creates and exports it. Between QUIESCE and EVACUATE only.
    public func adopt(_ id: UInt64) throws {
        let bytes = try onChannel { channel -> UInt64 in
            try channel.send(STASIS_AGENT_ADOPT, id: id)
            return try channel.expect(STASIS_AGENT_OK, doing: "adopt imported memory \(String(id, radix: 16))").length
        }
        guard let index = allocations.firstIndex(where: { $0.id == id }) else { return }
        allocations[index].imported = false
        allocations[index].exported = true
        allocations[index].bytes = bytes
    }

    /// A new POSIX descriptor for own allocation `id`, re-created by a refill (for its importers).
    public func exportAgain(_ id: UInt64) throws -> FileDescriptor {
        try onChannel { channel in
            try channel.send(STASIS_AGENT_EXPORT, id: id)
            let (answer, descriptor) = try channel.receivePassed()
            if answer.op == STASIS_AGENT_ERROR.rawValue {
                descriptor?.closeQuietly()
                throw AgentChannel.error(answer, pid: pid, doing: "export its allocation \(String(id, radix: 16)) again")
            }
            guard answer.op == STASIS_AGENT_OK.rawValue, let descriptor else {
                descriptor?.closeQuietly()
                throw StasisError(.gpu, "the agent of PID \(pid) answered EXPORT without a descriptor")
            }
            return descriptor
        }
    }

    /// Imports `descriptor` (the owner's new export) in place of imported allocation `id`, mapped where it was.
    public func importAgain(_ id: UInt64, from descriptor: FileDescriptor) throws {
        try onChannel { channel in
            try channel.send(STASIS_AGENT_IMPORT, id: id, passing: descriptor)
            try channel.expect(STASIS_AGENT_OK, doing: "map imported memory \(String(id, radix: 16)) again")
        }
    }

    /// Asks the agent to load its chunk-digest kernel on its GPUs (held or released-and-rebacked only). An
    /// agent that cannot is no failure: stasis then hashes on its CPUs, and `noGPUHashing` says why.
    public func prepareDigests() throws {
        try onChannel { channel in try prepareDigests(channel) }
    }

    private func prepareDigests(_ channel: AgentChannel) throws {
        try channel.send(STASIS_AGENT_DIGESTS)
        let answer = try channel.expect(STASIS_AGENT_OK, doing: "load its digest kernel")
        hashesOnGPU = answer.length == 1
        noGPUHashing = hashesOnGPU ? nil : AgentChannel.text(answer)
    }

    /// Copies every allocation out into `sink`; returns each allocation's chunk digests ("" for zeros).
    public func evacuate(into sink: ChunkSink, threads: Int) throws -> [UInt64: [String]] {
        try onChannel { channel in try evacuate(channel, into: sink, threads: threads) }
    }

    private func evacuate(_ channel: AgentChannel, into sink: ChunkSink, threads: Int) throws -> [UInt64: [String]] {
        let chunk = ChunkStore.chunkSize
        let digests = DigestTable(ownAllocations, chunkSize: chunk)
        let filled = BlockingQueue<AgentChannel.Message>()
        let failure = FirstFailure()
        try channel.send(STASIS_AGENT_EVACUATE, length: hashesOnGPU ? 1 : 0)
        let pid = self.pid, ring = ringAddress, slotBytes = self.slotBytes, slotCount = self.slotCount
        let here = RingHere(ringHere())
        let sizes = Dictionary(allocations.map { ($0.id, $0.bytes) }, uniquingKeysWith: { first, _ in first })
        WorkerGroup.run(max(1, threads) + 1, name: "stasis-evacuate") { worker in
            if worker == 0 {
                // The receiver: FILLED slots to the workers, until EVACUATED; chunks the GPU found zero (no slot)
                // it records itself.
                defer { filled.close() }
                Self.receive(on: channel, pid: pid, doing: "copy its device memory out", failure: failure) { message in
                    switch message.op {
                    case STASIS_AGENT_FILLED.rawValue where message.slot == -1:
                        let length = try Self.checkChunk(message, sizes: sizes, chunk: chunk, pid: pid)
                        guard message.chunk_flags & UInt32(STASIS_AGENT_CHUNK_ZERO.rawValue) != 0 else {
                            throw StasisError(.gpu, "the agent of PID \(pid) reported a chunk without a slot that is not zero")
                        }
                        sink.countZero(length: length)
                        try digests.set(id: message.id, offset: message.offset, digest: "", pid: pid)
                        return false
                    case STASIS_AGENT_FILLED.rawValue: filled.push(message); return false
                    case STASIS_AGENT_EVACUATED.rawValue: return true
                    default: throw StasisError(.gpu, "the agent of PID \(pid) sent \(message.op) during the evacuation")
                    }
                }
                return
            }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkSink.scratchSize(), alignment: 4096)
            defer { buffer.deallocate(); scratch.deallocate() }
            while let message = filled.pop() {
                guard failure.error == nil else { continue }
                do {
                    guard message.slot >= 0, Int(message.slot) < slotCount else {
                        throw StasisError(.gpu, "the agent of PID \(pid) reported slot \(message.slot) of \(slotCount)")
                    }
                    let length = try Self.checkChunk(message, sizes: sizes, chunk: chunk, pid: pid)
                    let free = { Self.send(channel, failure, { try $0.send(STASIS_AGENT_FREE, slot: message.slot) }) }
                    // Runs `store` on the chunk's bytes and gives the slot back: the slot itself where the ring is
                    // mapped here (given back once stored), else a copy (given back at once). False when the
                    // agent has gone (the receiver reports why).
                    func storing(_ store: (UnsafeRawBufferPointer) throws -> Void) throws -> Bool {
                        if let base = here.pointer {
                            try store(UnsafeRawBufferPointer(start: base + Int(message.slot) * slotBytes, count: length))
                            return free()
                        }
                        let bytes = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])
                        try ProcessMemory.read(pid: pid, address: ring + UInt64(message.slot) * UInt64(slotBytes), into: bytes)
                        guard free() else { return false }
                        try store(UnsafeRawBufferPointer(bytes))
                        return true
                    }
                    var digest = ""
                    if message.chunk_flags & UInt32(STASIS_AGENT_CHUNK_DIGEST.rawValue) != 0 {
                        // Hashed by the GPU: a chunk the store has already is not even read.
                        digest = Self.hex(message)
                        let stored = sink.needs(digest, length: length)
                            ? try storing { try sink.putHashed($0, digest: digest, scratch: scratch) } : free()
                        guard stored else { continue }
                    } else {
                        guard try storing({ digest = try sink.put($0, scratch: scratch) }) else { continue }
                    }
                    try digests.set(id: message.id, offset: message.offset, digest: digest, pid: pid)
                } catch {
                    failure.set(error)
                    // The agent sees the end of the connection, stops copying and lets the program run on.
                    channel.shutdown()
                }
            }
        }
        if let error = failure.error { throw error }
        return try digests.complete(pid: pid)
    }

    /// The length of the chunk a FILLED or DIGEST names, checked against the table the agent listed.
    private static func checkChunk(_ message: AgentChannel.Message, sizes: [UInt64: UInt64], chunk: Int, pid: Int32) throws -> Int {
        let length = Int(message.length)
        guard message.offset % UInt64(chunk) == 0, let size = sizes[message.id], message.offset < size,
              UInt64(length) == min(UInt64(chunk), size - message.offset) else {
            throw StasisError(.gpu, "the agent of PID \(pid) reported \(length) bytes at offset \(message.offset) of allocation \(String(message.id, radix: 16)), which does not fit what it listed")
        }
        return length
    }

    /// A FILLED's or DIGEST's SHA-256, as the store names chunks.
    static func hex(_ message: AgentChannel.Message) -> String {
        withUnsafeBytes(of: message.digest) { SegmentedDigest.hex($0) }
    }

    /// Gives the physical memory back to the driver (the addresses stay reserved). `rescueStore`: the store
    /// holding the process's rescue entry, told to an agent that runs `stasis resume` itself should this
    /// stasis die before the memory is back (docs/AGENT.md, "Rescue").
    public func release(rescueStore: String? = nil) throws {
        released = true
        try onChannel { channel in
            if let rescueStore, resumesItself { try channel.sendText(STASIS_AGENT_RESCUE_STORE, rescueStore) }
            try channel.send(STASIS_AGENT_RELEASE)
            try channel.expect(STASIS_AGENT_OK, doing: "give its device memory back")
        }
    }

    /// Re-creates the memory at the same addresses and fills `allocations` from `store` (`chunks`: each
    /// allocation's digests, as `evacuate` returned them); CUDA calls stay held until `resume`. The agent
    /// re-creates all it knows; an allocation it does not know is an error.
    public func refill(allocations: [Allocation], from store: ChunkStore, chunks: [UInt64: [String]], checkpoint: String, threads: Int) throws {
        try onChannel { channel in
            try refill(channel, allocations: allocations, from: store, chunks: chunks, checkpoint: checkpoint, threads: threads)
        }
        released = false
    }

    private func refill(_ channel: AgentChannel, allocations: [Allocation], from store: ChunkStore, chunks: [UInt64: [String]],
                        checkpoint: String, threads: Int) throws {
        for allocation in allocations where chunks[allocation.id] == nil {
            throw StasisError(.gpu, "the checkpoint has no contents for allocation \(String(allocation.id, radix: 16)) (\(Format.bytes(allocation.bytes))) of PID \(pid)")
        }
        try channel.send(STASIS_AGENT_REBACK)
        try channel.expect(STASIS_AGENT_OK, doing: "re-create its device memory")
        // Where the GPU can hash what lands in it, that is the check; else each chunk is checked as it is read.
        try prepareDigests(channel)
        let checkOnGPU = hashesOnGPU
        let chunk = ChunkStore.chunkSize
        var jobs: [(id: UInt64, offset: UInt64, length: Int, digest: String, file: String)] = []
        for allocation in allocations {
            let expected = Int((allocation.bytes + UInt64(chunk) - 1) / UInt64(chunk))
            guard chunks[allocation.id]!.count == expected else {
                throw StasisError(.integrity, "allocation \(String(allocation.id, radix: 16)) of PID \(pid) has \(chunks[allocation.id]!.count) chunks for \(allocation.bytes) bytes (\(expected) expected)")
            }
        }
        for allocation in allocations {
            for (index, digest) in chunks[allocation.id]!.enumerated() {
                let offset = UInt64(index) * UInt64(chunk)
                let length = Int(min(UInt64(chunk), allocation.bytes - offset))
                if digest.isEmpty {
                    do {
                        try channel.send(STASIS_AGENT_ZERO, id: allocation.id, offset: offset, length: UInt64(length))
                    } catch {
                        // The agent refused an earlier one and closed: its reason is waiting to be read.
                        if let answer = try? channel.receive(), answer.op == STASIS_AGENT_ERROR.rawValue {
                            throw AgentChannel.error(answer, pid: pid, doing: "zero its device memory")
                        }
                        throw error
                    }
                } else {
                    jobs.append((allocation.id, offset, length, digest, AgentEvacuation.file(pid: pid, id: allocation.id)))
                }
            }
        }
        let work = jobs
        // The ring's free slots; closed (no slot given out after) once the agent has answered FLUSH or failed.
        let slots = BlockingQueue<Int32>(capacity: slotCount, (0..<Int32(slotCount)).reversed())
        let next = Locked(0), finished = Locked(0)
        let failure = FirstFailure()
        let pid = self.pid, ring = ringAddress, slotBytes = self.slotBytes
        let here = RingHere(ringHere())
        let workers = max(1, threads)
        WorkerGroup.run(workers + 1, name: "stasis-refill") { worker in
            if worker == 0 {
                // The receiver: WRITTEN slots back to the pool, until the OK that ends FLUSH.
                defer { slots.close() }
                Self.receive(on: channel, pid: pid, doing: "fill its device memory", failure: failure) { message in
                    switch message.op {
                    case STASIS_AGENT_WRITTEN.rawValue: slots.push(message.slot); return false
                    case STASIS_AGENT_OK.rawValue: return true
                    default: throw StasisError(.gpu, "the agent of PID \(pid) sent \(message.op) during the refill")
                    }
                }
                return
            }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkSink.scratchSize(), alignment: 4096)
            defer { buffer.deallocate(); scratch.deallocate() }
            while failure.error == nil, let index = next.takeNext(below: work.count) {
                let job = work[index]
                do {
                    let place = ChunkStore.Place(checkpoint: checkpoint, file: job.file, offset: job.offset, length: job.length)
                    let slot: Int32
                    if let base = here.pointer {
                        // Read (and decompressed) straight into the slot.
                        guard let free = slots.pop(draining: false) else { break }
                        slot = free
                        let bytes = UnsafeMutableRawBufferPointer(start: base + Int(slot) * slotBytes, count: job.length)
                        try store.readChunk(job.digest, into: bytes, scratch: scratch, place: place, checkDigest: !checkOnGPU)
                    } else {
                        let bytes = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<job.length])
                        try store.readChunk(job.digest, into: bytes, scratch: scratch, place: place, checkDigest: !checkOnGPU)
                        guard let free = slots.pop(draining: false) else { break }
                        slot = free
                        try ProcessMemory.write(pid: pid, address: ring + UInt64(slot) * UInt64(slotBytes), from: UnsafeRawBufferPointer(bytes))
                    }
                    guard Self.send(channel, failure, { try $0.send(STASIS_AGENT_WRITE, slot: slot, id: job.id, offset: job.offset, length: UInt64(job.length)) }) else { break }
                } catch {
                    failure.set(error)
                    channel.shutdown()
                }
            }
            // The last worker out asks the agent to finish its copies.
            if finished.withLock({ $0 += 1; return $0 == workers }), failure.error == nil {
                _ = Self.send(channel, failure, { try $0.send(STASIS_AGENT_FLUSH) })
            }
        }
        if let error = failure.error { throw error }
        gpuCheckSeconds = nil
        if checkOnGPU {
            let watch = Stopwatch()
            try verifyOnGPU(channel, allocations: allocations, chunks: chunks, checkpoint: checkpoint)
            gpuCheckSeconds = watch.seconds
        }
    }

    /// Asks the agent for the SHA-256 of every chunk now in the device and compares each with the checkpoint's.
    private func verifyOnGPU(_ channel: AgentChannel, allocations: [Allocation], chunks: [UInt64: [String]], checkpoint: String) throws {
        let chunk = ChunkStore.chunkSize
        let sizes = Dictionary(allocations.map { ($0.id, $0.bytes) }, uniquingKeysWith: { first, _ in first })
        var unchecked = Dictionary(allocations.map { ($0.id, Set(0..<chunks[$0.id]!.count)) }, uniquingKeysWith: { first, _ in first })
        try channel.send(STASIS_AGENT_VERIFY)
        while true {
            let message = try channel.receive()
            switch message.op {
            case STASIS_AGENT_DIGEST.rawValue:
                _ = try Self.checkChunk(message, sizes: sizes, chunk: chunk, pid: pid)
                let index = Int(message.offset / UInt64(chunk))
                guard unchecked[message.id]?.remove(index) != nil else { continue }
                let expected = chunks[message.id]![index]
                let zero = message.chunk_flags & UInt32(STASIS_AGENT_CHUNK_ZERO.rawValue) != 0
                let found = zero ? "" : Self.hex(message)
                guard found == expected else {
                    throw StasisError(.integrity, "\(checkpoint)/\(AgentEvacuation.file(pid: pid, id: message.id)) bytes \(message.offset)..<\(message.offset + message.length): the GPU holds \(zero ? "zeros" : found) after the refill, the checkpoint \(expected.isEmpty ? "zeros" : expected)",
                                      hint: "the store's copy is damaged (run `stasis verify`); restore from another copy of the checkpoint")
                }
            case STASIS_AGENT_OK.rawValue:
                let left = unchecked.values.reduce(0) { $0 + $1.count }
                guard left == 0 else { throw StasisError(.gpu, "the agent of PID \(pid) hashed all but \(left) chunk(s) after the refill") }
                return
            case STASIS_AGENT_ERROR.rawValue:
                throw AgentChannel.error(message, pid: pid, doing: "hash its device memory after the refill")
            default:
                throw StasisError(.gpu, "the agent of PID \(pid) answered \(message.op) to VERIFY")
            }
        }
    }

    /// The receiving side of a transfer: gives each message to `handle` until it returns true (the end). The
    /// agent's ERROR (its words, with `doing`) is the failure to report; a connection that ends is one only if
    /// nothing better is known.
    private static func receive(on channel: AgentChannel, pid: Int32, doing: String, failure: FirstFailure,
                                _ handle: (AgentChannel.Message) throws -> Bool) {
        while true {
            let message: AgentChannel.Message
            do {
                message = try channel.receive()
            } catch {
                failure.set(error, cause: false)
                return
            }
            do {
                if message.op == STASIS_AGENT_ERROR.rawValue { throw AgentChannel.error(message, pid: pid, doing: doing) }
                if try handle(message) { return }
            } catch {
                failure.set(error)
                return
            }
        }
    }

    /// A worker's send: when it fails, the agent has closed the connection, and the receiver is about to read
    /// why (its ERROR), which is the failure to report; the broken pipe is kept only in case it is not.
    private static func send(_ channel: AgentChannel, _ failure: FirstFailure, _ body: (AgentChannel) throws -> Void) -> Bool {
        do {
            try body(channel)
            return true
        } catch {
            failure.set(error, cause: false)
            return false
        }
    }

    /// Lets the held CUDA calls go on.
    public func resume() throws {
        // An unread answer to QUIESCE comes first (another process's refusal may have stopped the dump
        // before it was read); whatever it says, the calls are let go next.
        if quiescing, channel != nil { try? finishQuiesce() }
        try onChannel { channel in
            try channel.send(STASIS_AGENT_RESUME)
            try channel.expect(STASIS_AGENT_OK, doing: "let its CUDA calls go on")
        }
    }
}

// MARK: small synchronised helpers

/// The ring's address here, handed to the transfer's threads (set before they start, never changed).
private struct RingHere: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer?
    init(_ pointer: UnsafeMutableRawPointer?) { self.pointer = pointer }
}

/// Each allocation's digests, filled in by the workers as chunks are stored.
// @unchecked Sendable: `table` is reached only under its lock.
private final class DigestTable: @unchecked Sendable {
    private let lock = NSLock()
    private var table: [UInt64: [String?]] = [:]
    private let chunkSize: Int

    init(_ allocations: [AgentSession.Allocation], chunkSize: Int) {
        self.chunkSize = chunkSize
        for allocation in allocations {
            table[allocation.id] = [String?](repeating: nil, count: Int((allocation.bytes + UInt64(chunkSize) - 1) / UInt64(chunkSize)))
        }
    }

    func set(id: UInt64, offset: UInt64, digest: String, pid: Int32) throws {
        try lock.withLock {
            let index = Int(offset / UInt64(chunkSize))
            guard table[id] != nil, index < table[id]!.count else {
                throw StasisError(.gpu, "the agent of PID \(pid) sent bytes at \(offset) of an allocation it did not list (\(String(id, radix: 16)))")
            }
            guard table[id]![index] == nil else {
                throw StasisError(.gpu, "the agent of PID \(pid) sent bytes at \(offset) of allocation \(String(id, radix: 16)) twice")
            }
            table[id]![index] = digest
        }
    }

    func complete(pid: Int32) throws -> [UInt64: [String]] {
        try lock.withLock {
            var out: [UInt64: [String]] = [:]
            for (id, digests) in table {
                let present = digests.compactMap { $0 }
                guard present.count == digests.count else {
                    throw StasisError(.gpu, "the agent of PID \(pid) left \(digests.count - present.count) chunk(s) of allocation \(String(id, radix: 16)) uncopied")
                }
                out[id] = present
            }
            return out
        }
    }
}

