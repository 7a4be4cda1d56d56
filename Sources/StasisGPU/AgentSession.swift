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
///
/// This file holds the session's life: the connection, QUIESCE, the table, sharing, RELEASE and RESUME.
/// AgentTransfers.swift moves the memory through the ring (evacuate, refill); AgentDigests.swift has the GPU
/// hash chunks.
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
    public internal(set) var released = false
    /// The agent's state in its last HELLO (a stasis_agent_state).
    public private(set) var agentState: UInt32 = 0
    /// Driver entry points the agent had to hand out without its gate (its trampoline table was full).
    public private(set) var ungatedFunctions: UInt64 = 0
    /// The agent takes RESCUE_STORE and puts its memory back itself should this stasis die after RELEASE.
    public private(set) var resumesItself = false
    /// QUIESCE was sent and its answer not read yet.
    private var quiescing = false
    /// The agent hashes chunks on the GPU (`prepareDigests` said so): stasis then does not hash them on its CPUs.
    public internal(set) var hashesOnGPU = false
    /// Why it does not, when it was asked and said no.
    public internal(set) var noGPUHashing: String?
    /// How long the last refill's check on the GPU took (nil: the chunks were checked on the CPUs as read).
    public internal(set) var gpuCheckSeconds: Double?
    /// The ring mapped here (nil: not mapped yet, or not mappable).
    var mappedRing: ForeignMapping?
    /// The last transfer worked on the ring in place (one CPU copy), not through process_vm_readv/writev.
    public internal(set) var ringMapped = false

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

    /// Runs `body` on the connection; a failure drops it, so that a late answer is never taken for the next
    /// request's.
    func onChannel<T>(_ body: (AgentChannel) throws -> T) throws -> T {
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
                    guard table.isEmpty || (ringAddress != 0 && slotBytes == ChunkFormat.chunkSize && slotCount > 0) else {
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

    /// Lets the held CUDA calls go on.
    public func resume() throws {
        // An unread answer to QUIESCE comes first (another process's refusal may have stopped the dump
        // before it was read). Its error is ignored: whatever it says, the calls are let go next.
        if quiescing, channel != nil { try? finishQuiesce() }
        try onChannel { channel in
            try channel.send(STASIS_AGENT_RESUME)
            try channel.expect(STASIS_AGENT_OK, doing: "let its CUDA calls go on")
        }
    }
}
