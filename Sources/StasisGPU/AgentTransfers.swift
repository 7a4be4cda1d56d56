import CStasisAgentProtocol
import Foundation
import StasisCore
import StasisOS
import StasisStore

// The transfers through the agent's staging ring: an evacuation (device memory out into the store) and a
// refill (back from the store), each a receiver thread that takes the agent's messages and workers that move
// the chunks between the ring's slots and the store.
extension AgentSession {
    /// Copies every allocation out into `sink`; returns each allocation's chunk digests ("" for zeros).
    public func evacuate(into sink: ChunkSink, threads: Int) throws -> [UInt64: [String]] {
        try onChannel { channel in try evacuate(channel, into: sink, threads: threads) }
    }

    private func evacuate(_ channel: AgentChannel, into sink: ChunkSink, threads: Int) throws -> [UInt64: [String]] {
        let chunk = ChunkFormat.chunkSize
        let digests = DigestTable(ownAllocations, chunkSize: chunk)
        let filled = BlockingQueue<AgentChannel.Message>()
        let failure = FirstFailure()
        // An agent with an arena in this store's reserve copies into its pieces, which stasis takes as they are.
        let arena = hashesOnGPU ? sink.arenaDirectory : nil
        try channel.send(STASIS_AGENT_EVACUATE, length: hashesOnGPU ? 1 : 0, text: arena ?? "")
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
                    case STASIS_AGENT_FILLED.rawValue where message.chunk_flags & UInt32(STASIS_AGENT_CHUNK_ARENA.rawValue) != 0:
                        // A piece of the arena, taken (or left) by a worker; nothing to give back.
                        guard arena != nil, message.chunk_flags & UInt32(STASIS_AGENT_CHUNK_DIGEST.rawValue) != 0 else {
                            throw StasisError(.gpu, "the agent of PID \(pid) copied into its arena unasked, or without a digest")
                        }
                        filled.push(message)
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
                    if message.chunk_flags & UInt32(STASIS_AGENT_CHUNK_ARENA.rawValue) != 0 {
                        let length = try Self.checkChunk(message, sizes: sizes, chunk: chunk, pid: pid)
                        let digest = Self.hex(message)
                        if sink.needs(digest, length: length) { try sink.adoptPiece(AgentChannel.text(message), length: length, digest: digest) }
                        try digests.set(id: message.id, offset: message.offset, digest: digest, pid: pid)
                        continue
                    }
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
    static func checkChunk(_ message: AgentChannel.Message, sizes: [UInt64: UInt64], chunk: Int, pid: Int32) throws -> Int {
        let length = Int(message.length)
        guard message.offset % UInt64(chunk) == 0, let size = sizes[message.id], message.offset < size,
              UInt64(length) == min(UInt64(chunk), size - message.offset) else {
            throw StasisError(.gpu, "the agent of PID \(pid) reported \(length) bytes at offset \(message.offset) of allocation \(String(message.id, radix: 16)), which does not fit what it listed")
        }
        return length
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
        let chunk = ChunkFormat.chunkSize
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
                        // The agent refused an earlier one and closed: its reason is waiting to be read. Best effort:
                        // when no reason comes, the send's own error is the one thrown.
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
                    let place = ChunkPlace(checkpoint: checkpoint, file: job.file, offset: job.offset, length: job.length)
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

    /// The ring's first byte in this process, when it can be mapped here; set up once a session.
    func ringHere() -> UnsafeMutableRawPointer? {
        if mappedRing == nil, ringAddress != 0, slotBytes > 0, slotCount > 0 {
            mappedRing = ForeignMapping(pid: pid, address: ringAddress, length: slotBytes * slotCount, memfd: STASIS_AGENT_RING_NAME)
        }
        ringMapped = mappedRing != nil
        return mappedRing?.base
    }
}

// MARK: what the transfers' threads share

/// The ring's address here, handed to the transfer's threads (set before they start, never changed).
private struct RingHere: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer?
    init(_ pointer: UnsafeMutableRawPointer?) { self.pointer = pointer }
}

/// Each allocation's digests, filled in by the workers as chunks are stored.
private final class DigestTable: Sendable {
    private let table: Locked<[UInt64: [String?]]>
    private let chunkSize: Int

    init(_ allocations: [AgentSession.Allocation], chunkSize: Int) {
        self.chunkSize = chunkSize
        var table: [UInt64: [String?]] = [:]
        for allocation in allocations {
            table[allocation.id] = [String?](repeating: nil, count: Int((allocation.bytes + UInt64(chunkSize) - 1) / UInt64(chunkSize)))
        }
        self.table = Locked(table)
    }

    func set(id: UInt64, offset: UInt64, digest: String, pid: Int32) throws {
        let index = Int(offset / UInt64(chunkSize))
        try table.withLock { table in
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
        try table.withLock { table in
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
