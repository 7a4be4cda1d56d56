import Foundation
import Glibc
import StasisCore
@testable import StasisGPU
import StasisOS
import StasisStore
import StasisAgentStandIn
import StasisTestSupport
import Testing

/// The other end of the control channel without a GPU: `ProtocolPeer` answers as libstasis-agent.so does
/// (stasis_agent_protocol.h), on the same socket name with this process's PID, with its "device memory" in
/// host buffers and its ring in this process's memory, so that AgentSession's evacuation, release and refill
/// (its threads, slots and messages) run for real against it. The agent itself runs on the GPU machine.
@Suite(.serialized) struct AgentProtocolTests {
    /// Both ways to the ring: mapped here (one copy: the agent's memfd) and through process_vm_readv/writev.
    @Test(arguments: [true, false]) func evacuationAndRefillGiveTheSameBytesBack(sharedRing: Bool) throws {
        let chunk = ChunkFormat.chunkSize
        var random = SystemRandomNumberGenerator()
        let memory: [UInt64: [UInt8]] = [
            0x10: (0..<(5 * chunk / 2)).map { _ in UInt8.random(in: 0...255, using: &random) },  // 2.5 chunks
            0x11: [UInt8](repeating: 0, count: 2 * chunk),                                        // zeros: ZERO, no slot
            0x12: (0..<(3 * chunk)).map { UInt8(truncatingIfNeeded: $0 / 4096) },                  // compressible
        ]
        let peer = try ProtocolPeer(memory: memory, slots: 4, sharedRing: sharedRing)
        defer { peer.stop() }
        let directory = Harness.scratch("agent-protocol")
        let store = try DirectoryChunkStore(path: directory + "/store", create: true)
        let session = try #require(try AgentSession.open(pid: getpid()))
        try session.startQuiesce(timeoutMilliseconds: 1000)
        try session.finishQuiesce()
        #expect(session.allocations.map(\.id).sorted() == [0x10, 0x11, 0x12])
        let sink = ChunkSink(store: store, codec: .lz4, probe: true)
        let chunks = try session.evacuate(into: sink, threads: 3)
        #expect(session.ringMapped == sharedRing)
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

    /// A prepared restore refills and checks device memory but keeps the program's CUDA calls held after
    /// stasis disconnects; `stasis activate` lets them go later, over a connection of its own.
    @Test func aRefillCanLeaveTheCallsHeldUntilALaterConnectionLetsThemGo() throws {
        let chunk = ChunkFormat.chunkSize
        let memory: [UInt64: [UInt8]] = [0x20: (0..<(3 * chunk / 2)).map { UInt8(truncatingIfNeeded: $0 &* 7 / 4096) }]
        let peer = try ProtocolPeer(memory: memory, slots: 4, sharedRing: true)
        defer { peer.stop() }
        let directory = Harness.scratch("agent-held")
        let store = try DirectoryChunkStore(path: directory + "/store", create: true)
        let session = try #require(try AgentSession.open(pid: getpid()))
        try session.startQuiesce(timeoutMilliseconds: 1000)
        try session.finishQuiesce()
        let sink = ChunkSink(store: store, codec: .lz4, probe: true)
        let chunks = try session.evacuate(into: sink, threads: 2)
        try sink.commit()
        try session.release()
        try session.refill(allocations: session.allocations, from: store, chunks: chunks, checkpoint: directory, threads: 2)
        session.disconnect()
        #expect(peer.written == memory)
        #expect(!peer.running, "the calls stay held once the refilling stasis is gone")
        try CUDADeviceStep(lockTimeoutMilliseconds: 1000, gpuMap: [:]).letGo(pids: [getpid()])
        #expect(peer.running)
    }

    /// With the agent's digest kernel (the stand-in hashes as the GPU does), stasis stores the same chunks
    /// under the same names without hashing them, skips reading chunks the store has, never copies zeros, and
    /// checks the refill by the digests of what landed in the device.
    @Test func chunksHashedOnTheGPUAreTheSameChunks() throws {
        let chunk = ChunkFormat.chunkSize
        var random = SystemRandomNumberGenerator()
        let memory: [UInt64: [UInt8]] = [
            0x40: (0..<(5 * chunk / 2)).map { _ in UInt8.random(in: 0...255, using: &random) },
            0x41: [UInt8](repeating: 0, count: 2 * chunk) + [UInt8](repeating: 3, count: 100),
            0x42: (0..<(3 * chunk)).map { UInt8(truncatingIfNeeded: $0 / 4096) },
        ]
        let directory = Harness.scratch("agent-gpu-digests")
        let store = try DirectoryChunkStore(path: directory + "/store", create: true)
        func evacuate(hashes: Bool) throws -> (chunks: [UInt64: [String]], totals: ChunkIngester.Statistics, onGPU: Bool, peer: ProtocolPeer, session: AgentSession) {
            let peer = try ProtocolPeer(memory: memory, slots: 3, hashes: hashes)
            let (session, chunks, sink) = try Self.holdAndEvacuate(into: store)
            return (chunks, sink.totals, session.hashesOnGPU, peer, session)
        }
        let onCPU = try evacuate(hashes: false)
        #expect(!onCPU.onGPU && onCPU.session.noGPUHashing?.contains("no digest kernel") == true)
        try onCPU.session.resume()
        onCPU.session.disconnect()
        onCPU.peer.stop()

        let onGPU = try evacuate(hashes: true)
        defer { onGPU.peer.stop() }
        #expect(onGPU.onGPU)
        #expect(onGPU.chunks == onCPU.chunks)
        #expect(onGPU.chunks[0x41]?.prefix(2) == ["", ""])
        // Everything was stored by the first evacuation: nothing new, zeros counted without a copy.
        #expect(onGPU.totals.newChunks == 0 && onGPU.totals.zeroChunks == 2 && onGPU.totals.reusedChunks == onCPU.totals.newChunks + onCPU.totals.reusedChunks)
        for digest in Set(onGPU.chunks.values.joined()) where !digest.isEmpty { try store.check(digest) }
        try onGPU.session.release()
        try onGPU.session.refill(allocations: onGPU.session.allocations, from: store, chunks: onGPU.chunks, checkpoint: directory, threads: 2)
        #expect(onGPU.session.hashesOnGPU)
        try onGPU.session.resume()
        onGPU.session.disconnect()
        #expect(onGPU.peer.written == memory)
    }

    /// An agent with an arena in the store's reserve copies into pieces there; stasis takes each piece the
    /// store needs as a chunk file without reading it (the same chunks as through the ring, each one checks),
    /// leaves the rest (a chunk the store has already), and after RELEASE those are the reserve's blanks again.
    @Test func anArenaEvacuationTakesPiecesAsChunkFilesUnread() throws {
        let chunk = ChunkFormat.chunkSize
        var random = SystemRandomNumberGenerator()
        let twice = (0..<chunk).map { _ in UInt8.random(in: 0...255, using: &random) }
        let memory: [UInt64: [UInt8]] = [
            0x60: (0..<(5 * chunk / 2)).map { _ in UInt8.random(in: 0...255, using: &random) },
            0x61: [UInt8](repeating: 0, count: chunk) + twice + twice,   // zeros: no piece; the same chunk twice
            0x62: (0..<(3 * chunk)).map { UInt8(truncatingIfNeeded: $0 / 4096 + $0 / chunk * 31) },  // three different chunks
        ]
        let directory = Harness.scratch("agent-arena")
        let store = try DirectoryChunkStore(path: directory + "/store", create: true)
        try FileSystem.makePrivateDirectory(store.arenaDirectory)
        let peer = try ProtocolPeer(memory: memory, slots: 2, hashes: true, arena: true)
        defer { peer.stop() }
        let (session, chunks, sink) = try Self.holdAndEvacuate(into: store)
        // 3 + 2 + 3 chunks that are not zero, one of them twice: 7 taken, 1 piece left.
        #expect(sink.adoptedPieces == 7 && sink.totals.newChunks == 7 && sink.totals.reusedChunks == 1 && sink.totals.zeroChunks == 1)
        #expect(chunks[0x61]?.first == "" && chunks[0x61]?[1] == chunks[0x61]?[2])
        for digest in Set(chunks.values.joined()) where !digest.isEmpty {
            try store.check(digest)
            #expect(store.storedSize(digest) == UInt64(12 + (digest == chunks[0x60]![2] ? chunk / 2 : chunk)))
        }
        try session.release()
        let left = try FileSystem.namesOrNone(in: store.arenaDirectory)
        #expect(left.count == 1 && left[0].hasPrefix("blank-"), "\(left)")
        #expect(try store.reserve.status().blanks == 1)
        try session.refill(allocations: session.allocations, from: store, chunks: chunks, checkpoint: directory, threads: 2)
        try session.resume()
        session.disconnect()
        #expect(peer.written == memory)
    }

    /// An agent may name only a piece of its arena: a name with a path in it, or any other file, is refused and
    /// the evacuation fails (the job then runs on, as after any failed evacuation).
    @Test func onlyArenaPieceNamesAreTaken() {
        #expect(ArenaPieces.isPieceName("arena-0123456789abcdef-0"))
        #expect(ArenaPieces.isPieceName("arena-0123456789abcdef-16383"))
        for bad in ["arena-0123456789abcdef-", "arena-0123456789abcde-1", "arena-0123456789abcdef-1/../x", "../arena-0123456789abcdef-1",
                    "blank-0123456789abcdef-1", "arena-0123456789abcdef-1-2", "arena-0123456789abcdeg-1", "arena-0123456789abcdef.lock"] {
            #expect(!ArenaPieces.isPieceName(bad), "\(bad)")
        }
    }

    /// Bytes that reach the device wrong are caught by the GPU's digests, though the store's copy was not hashed on read.
    @Test func aRefillTheGPUDoesNotConfirmFails() throws {
        let chunk = ChunkFormat.chunkSize
        let memory: [UInt64: [UInt8]] = [0x50: (0..<(2 * chunk)).map { UInt8(truncatingIfNeeded: $0 &* 7 / 3) }]
        let peer = try ProtocolPeer(memory: memory, slots: 2, hashes: true, damageWrites: true)
        defer { peer.stop() }
        let directory = Harness.scratch("agent-gpu-verify")
        let store = try DirectoryChunkStore(path: directory + "/store", create: true)
        let (session, chunks, _) = try Self.holdAndEvacuate(into: store)
        try session.release()
        let error = #expect(throws: StasisError.self) {
            try session.refill(allocations: session.allocations, from: store, chunks: chunks, checkpoint: directory, threads: 2)
        }
        #expect(error?.message.contains("the GPU holds") == true, "\(String(describing: error))")
        session.disconnect()
    }

    /// A dump's first steps against the stand-in of this process: hold, load the digest kernel, evacuate, commit.
    private static func holdAndEvacuate(into store: ChunkStore) throws -> (AgentSession, [UInt64: [String]], ChunkSink) {
        let session = try #require(try AgentSession.open(pid: getpid()))
        try session.startQuiesce(timeoutMilliseconds: 1000)
        try session.finishQuiesce()
        try session.prepareDigests()
        let sink = ChunkSink(store: store, codec: .lz4, probe: true)
        let chunks = try session.evacuate(into: sink, threads: 2)
        try sink.commit()
        return (session, chunks, sink)
    }

    /// A --leave-running dump into a store on disk: the device memory goes to a stage in memory, the job's
    /// memory comes back from there, and only then are the chunks copied into the store and the stage removed.
    @Test func aLeaveRunningDumpStagesDeviceMemoryInMemoryFirst() throws {
        let chunk = ChunkFormat.chunkSize
        var random = SystemRandomNumberGenerator()
        let memory: [UInt64: [UInt8]] = [
            0x40: (0..<(3 * chunk)).map { _ in UInt8.random(in: 0...255, using: &random) },
            0x41: [UInt8](repeating: 0, count: chunk),
        ]
        let peer = try ProtocolPeer(memory: memory, slots: 4)
        defer { peer.stop() }
        let directory = Harness.scratch("agent-stage")
        let store = try DirectoryChunkStore(path: directory + "/store", create: true)
        try #require(!FileSystem.isInMemory(store.path), "the test needs its scratch directory on a disk")
        let stagesBefore = Set(MemoryStage.all().map(\.path))
        let agents = AgentEvacuation()
        try agents.evacuate([getpid()], into: DeviceStore(store: store, codec: .lz4, checkpoint: directory, stageInMemory: true),
                            timeoutMilliseconds: 1000, tree: [getpid()])
        let files = agents.files
        let stages = MemoryStage.all().filter { !stagesBefore.contains($0.path) }
        try #require(stages.count == 1, "one stage in memory for this dump")
        let digests = files.flatMap { $0.chunks ?? [] }.filter { !$0.isEmpty }
        #expect(digests.count == 3)
        #expect(digests.allSatisfy { stages[0].has($0) && !store.has($0) }, "the chunks are staged, not yet in the store")
        #expect(peer.released)
        // The job gets its memory back from the stage (as after CRIU and the driver), then the stage settles.
        #expect(agents.putBackAll().isEmpty)
        #expect(peer.written == memory)
        let settled = try #require(try agents.settle(files: files, into: store))
        #expect(settled.newChunks == 3 && settled.zeroChunks == 1)
        #expect(digests.allSatisfy { store.has($0) })
        #expect(!FileSystem.exists(stages[0].path), "the stage is removed")
    }

    /// /dev/shm is anyone's: a link named like a stage is not taken for one, and removing stale stages leaves
    /// what it points to alone.
    @Test func aLinkNamedLikeAStageIsNotAStage() throws {
        let target = try DirectoryChunkStore(path: Harness.scratch("not-a-stage") + "/store", create: true)
        let link = "/dev/shm/stasis-stage-1-link\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: target.path)
        defer { unlink(link) }
        #expect(!MemoryStage.all().contains { $0.path == link })
        MemoryStage.removeStale()
        #expect(FileSystem.isDirectory(target.path + "/chunks"), "the link's target is untouched")
    }

    /// A --leave-running dump that could not put the memory back (or a stasis that died) leaves the rescue
    /// entry in its stage: `stasis resume` finds it there, puts the memory back, and the stage goes.
    @Test func stasisResumeFindsARescueEntryInAStage() throws {
        let chunk = ChunkFormat.chunkSize
        let memory: [UInt64: [UInt8]] = [0x50: (0..<(2 * chunk)).map { UInt8(truncatingIfNeeded: $0 &* 13 / 5) }]
        let peer = try ProtocolPeer(memory: memory, slots: 4)
        defer { peer.stop() }
        let directory = Harness.scratch("agent-stage-rescue")
        let store = try DirectoryChunkStore(path: directory + "/store", create: true)
        let stagesBefore = Set(MemoryStage.all().map(\.path))
        let agents = AgentEvacuation()
        try agents.evacuate([getpid()], into: DeviceStore(store: store, codec: .lz4, checkpoint: directory, stageInMemory: true),
                            timeoutMilliseconds: 1000, tree: [getpid()])
        let stage = try #require(MemoryStage.all().first { !stagesBefore.contains($0.path) })
        #expect(AgentEvacuation.rescue(pid: getpid(), in: stage) != nil && AgentEvacuation.rescue(pid: getpid(), in: store) == nil)
        // As if this stasis had died here: the memory is released and only the stage has it.
        let resumed = try Harness.stasis("resume", String(getpid()), "--store", store.path)
        #expect(resumed.succeeded, "\(resumed.stderr)")
        #expect(peer.written == memory)
        #expect(!FileSystem.exists(stage.path), "the stage goes once its rescue entry is used")
    }

    /// A process left held after its memory was released (a put-back that failed) is put back by `stasis resume`
    /// from the rescue entry the evacuation wrote; the entry then goes.
    @Test func stasisResumePutsBackWhatARescueEntryHolds() throws {
        let chunk = ChunkFormat.chunkSize
        let memory: [UInt64: [UInt8]] = [0x30: (0..<(3 * chunk)).map { UInt8(truncatingIfNeeded: $0 &* 31 / 7) }, 0x31: [UInt8](repeating: 0, count: chunk)]
        let peer = try ProtocolPeer(memory: memory, slots: 4)
        defer { peer.stop() }
        let storePath = Harness.scratch("agent-rescue") + "/store"
        let store = try DirectoryChunkStore(path: storePath, create: true)
        let session = try #require(try AgentSession.open(pid: getpid()))
        let (record, chunks) = try evacuateIntoRescue(session, store: store)
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
        // An entry left behind while the agent runs free (stasis died before RELEASE) is stale: resume drops it.
        try AgentEvacuation.writeRescue(pid: getpid(), memory: record, chunks: chunks, store: store)
        let stale = try Harness.stasis("resume", String(getpid()), "--store", storePath)
        #expect(!stale.succeeded && stale.stderr.contains("stale rescue entry"), "\(stale.stderr)")
        #expect(AgentEvacuation.rescue(pid: getpid(), in: store) == nil)
    }

    @Test func anAgentErrorDuringTheEvacuationIsReportedWithItsWords() throws {
        let chunk = ChunkFormat.chunkSize
        let peer = try ProtocolPeer(memory: [0x20: [UInt8](repeating: 7, count: 6 * chunk)], slots: 2, failAfter: 3)
        defer { peer.stop() }
        let store = try DirectoryChunkStore(path: Harness.scratch("agent-protocol-error") + "/store", create: true)
        let session = try #require(try AgentSession.open(pid: getpid()))
        try session.startQuiesce(timeoutMilliseconds: 1000)
        try session.finishQuiesce()
        let error = #expect(throws: StasisError.self) { _ = try session.evacuate(into: ChunkSink(store: store, codec: .lz4), threads: 2) }
        #expect(error?.message.contains("copy failed on purpose") == true, "\(String(describing: error))")
        #expect(!peer.released)
    }
}
