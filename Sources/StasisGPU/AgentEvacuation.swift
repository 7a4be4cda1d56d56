import CStasisAgentProtocol
import Foundation
import StasisCore
import StasisOS
import StasisStore

/// The agent half of a CUDA dump: for the processes started by `stasis run`, their device memory leaves
/// through their agents before the driver checkpoint, which then carries only the remainder (contexts,
/// modules, small allocations, pools). Keeps what it needs to put the memory back, on a rollback, after a
/// --leave-running dump, or after a restore.
// @unchecked Sendable: one thread drives it; `processes` changes only on that thread, between the parallel steps (each of
// which uses a session of its own).
final class AgentEvacuation: @unchecked Sendable {
    struct Evacuated {
        var session: AgentSession
        var chunks: [UInt64: [String]]
        var memory: Manifest.AgentMemory
    }

    private(set) var processes: [Int32: Evacuated] = [:]
    /// Where the device memory went: the checkpoint's store, or a stage in memory (`MemoryStage`).
    private var store: DeviceStore?
    /// The stage in memory, when the memory went there (until `settle` or `dropStage`).
    private var stage: ChunkStore?
    /// Device memory shared between the processes, by importer (`SharePlan`).
    private var imports: [Int32: [Manifest.AgentImport]] = [:]

    /// The file of the checkpoint that holds allocation `id` of `pid`.
    static func file(pid: Int32, id: UInt64) -> String { "gpu/\(pid)/\(String(id, radix: 16))" }

    static var threads: Int { ProcessInfo.processInfo.activeProcessorCount }

    /// Holds, copies out and releases the device memory of every process in `pids` that has an agent.
    /// Anything failing puts every one of them back as it was, and rethrows. `tree`: every process of the
    /// checkpointed tree (memory shared with a process outside it is refused).
    func evacuate(_ pids: [Int32], into destination: DeviceStore, timeoutMilliseconds: UInt32, tree: Set<Int32>) throws {
        var store = destination
        self.store = store
        var sessions: [AgentSession] = []
        var quiesceSeconds: [Int32: Double] = [:]
        do {
            // Everything that can refuse comes first. Every agent is asked to hold its calls before any answer
            // is awaited, so processes that wait on one another drain together.
            for pid in pids {
                guard let session = try AgentSession.open(pid: pid) else { continue }
                guard session.agentState == UInt32(STASIS_AGENT_RUNNING.rawValue) else {
                    throw StasisError(.gpu, "the agent of PID \(pid) is not running free (state \(session.agentState)): an earlier checkpoint did not finish",
                                      hint: "its CUDA calls are held; restore the process from its last checkpoint")
                }
                guard session.ungatedFunctions == 0 else {
                    throw StasisError(.gpu, "the agent of PID \(pid) handed out \(session.ungatedFunctions) driver entry point(s) without its gate, so it cannot hold every CUDA call; nothing was touched",
                                      hint: "checkpoint this program without `stasis run` (the driver path)")
                }
                sessions.append(session)
            }
            guard !sessions.isEmpty else { return }
            if store.stageInMemory, let stage = MemoryStage.make(bytes: sessions.reduce(0) { $0 + $1.trackedBytes }, beside: store.store) {
                self.stage = stage
                store.store = stage
                self.store = store
            }
            let watch = Stopwatch()
            for session in sessions { try session.startQuiesce(timeoutMilliseconds: timeoutMilliseconds) }
            for session in sessions {
                try session.finishQuiesce()
                quiesceSeconds[session.pid] = watch.seconds
            }
            // Shared memory: every import paired with its export (or adopted, its exporter gone), before any
            // byte moves. A refusal here lets every process run on.
            let plan = try SharePlan.make(sessions.map { ($0.pid, $0.allocations) },
                                          outsideHolder: { pid, fd in ProcessFiles.holder(of: fd, in: pid, excluding: tree)?.pid })
            for adoption in plan.adoptions { try sessions.first { $0.pid == adoption.pid }!.adopt(adoption.id) }
            imports = plan.imports
            for session in sessions where !session.ownAllocations.isEmpty { try session.prepareDigests() }
            // One sink for all: a chunk two processes share (replicated weights) is stored once.
            let sink = ChunkSink(store: store.store, codec: store.codec, probe: true)
            var copied: [Int32: (chunks: [UInt64: [String]], seconds: Double, cpu: Double, totals: ChunkIngester.Statistics, pieces: Int)] = [:]
            for session in sessions {
                let watch = Stopwatch(), cpu = ProcessCPU.seconds, before = sink.totals, pieces = sink.adoptedPieces
                let chunks = try session.evacuate(into: sink, threads: Self.threads)
                copied[session.pid] = (chunks, watch.seconds, ProcessCPU.seconds - cpu, sink.totals - before, sink.adoptedPieces - pieces)
            }
            // Durable before any physical memory goes: from here on the store holds the only copy.
            do { try sink.commit() } catch { sink.abandon(); throw error }
            statistics = sink.totals
            for session in sessions {
                let watch = Stopwatch(), done = copied[session.pid]!
                var memory = Manifest.AgentMemory(
                    allocations: session.ownAllocations.map {
                        Manifest.AgentAllocation(id: $0.id, bytes: $0.bytes, device: $0.device, file: Self.file(pid: session.pid, id: $0.id))
                    },
                    evacuatedBytes: session.evacuableBytes, driverPathBytes: 0,
                    ringBytes: UInt64(session.slotBytes * session.slotCount),
                    quiesceSeconds: quiesceSeconds[session.pid] ?? 0, evacuateSeconds: done.seconds, releaseSeconds: 0)
                memory.storedBytes = done.totals.storedBytes
                memory.zeroBytes = UInt64(done.totals.zeroChunks) * UInt64(ChunkFormat.chunkSize)
                memory.evacuateCPUSeconds = done.cpu
                memory.hashedOnGPU = session.hashesOnGPU
                memory.ringMapped = session.ringMapped
                memory.arenaChunks = done.pieces > 0 ? done.pieces : nil
                memory.imports = imports[session.pid]
                processes[session.pid] = Evacuated(session: session, chunks: done.chunks, memory: memory)
                // Listed in the store's catalog before the memory goes, so that gc keeps it and `stasis
                // resume` finds it should putting it back fail (or stasis die) before the dump completes.
                // A rescue entry stands alone: what it imports comes back only with its owner (a restore).
                var alone = memory
                alone.imports = nil
                try Self.writeRescue(pid: session.pid, memory: alone, chunks: done.chunks, store: store.store)
                try session.release(rescueStore: store.store.path)
                processes[session.pid]!.memory.releaseSeconds = watch.seconds
                // A test's way to "stasis died right after RELEASE": the agent must put its memory back itself.
                FaultInjection.die("released")
            }
            // CRIU must find no connection to a process outside the tree.
            for session in sessions { session.disconnect() }
        } catch {
            let problems = putBack(sessions)
            processes = [:]
            imports = [:]
            dropStage()
            guard problems.isEmpty else {
                throw StasisError(.gpu, "\(error); putting device memory back also failed: \(problems.joined(separator: "; "))")
            }
            throw error
        }
    }

    /// What the evacuation added to the store (to the stage, when it went there).
    private(set) var statistics = ChunkIngester.Statistics()

    /// Copies the chunks of `files` from the stage into `store`, durable there, and removes the stage (unless
    /// it holds a rescue entry: memory that could not be put back, which `stasis resume` takes from there).
    /// Returns what the copy added to `store`; nil when nothing was staged.
    func settle(files: [Manifest.FileEntry], into store: ChunkStore) throws -> ChunkIngester.Statistics? {
        guard let stage else { return nil }
        defer { dropStage() }
        let copied = try store.copyChunks(files.flatMap { $0.chunks ?? [] }, from: stage, threads: Self.threads)
        var settled = statistics
        settled.reusedChunks += settled.newChunks - copied.newChunks
        settled.newChunks = copied.newChunks
        settled.storedBytes = copied.storedBytes
        return settled
    }

    /// The stage goes (unless it holds a rescue entry).
    func dropStage() {
        if let stage { MemoryStage.removeUnlessRescuing(stage) }
        stage = nil
    }

    /// The chunked files for the manifest.
    var files: [Manifest.FileEntry] {
        processes.values.flatMap { process in
            process.memory.allocations.map { allocation in
                let chunks = process.chunks[allocation.id] ?? []
                return Manifest.FileEntry(path: allocation.file, size: allocation.bytes, sha256: ChunkDigest.ofFile(chunks: chunks), chunks: chunks)
            }
        }.sorted { $0.path < $1.path }
    }

    /// Every evacuated process back as it was: memory re-created and refilled where it was released, calls
    /// let go. Returns what could not be put back.
    func putBackAll(except skipped: Set<Int32> = []) -> [String] {
        let problems = putBack(processes.values.map(\.session).filter { !skipped.contains($0.pid) })
        processes = [:]
        imports = [:]
        return problems
    }

    /// In three steps, so that shared memory finds its owner's copy: every released process gets its own
    /// memory back; every importer maps its owner's memory again; then every process goes on.
    private func putBack(_ sessions: [AgentSession]) -> [String] {
        var problems: [String] = []
        var failed = Set<Int32>()
        func note(_ session: AgentSession, _ error: Error) {
            failed.insert(session.pid)
            let kept = session.released ? store.map { Self.rescueID(pid: session.pid, in: $0.store) } ?? nil : nil
            problems.append("\(error)" + (kept.map { "; its device memory is kept in the store as \($0): run `stasis resume \(session.pid)` once the GPU has room" } ?? ""))
        }
        // Both ends of a shared allocation must come back from the same copy: an importer still mapping the
        // old memory of an owner that released and re-creates it would part from it. Such importers release too.
        let byPID = Dictionary(sessions.map { ($0.pid, $0) }, uniquingKeysWith: { first, _ in first })
        for (pid, list) in imports {
            guard let importer = byPID[pid], !importer.released,
                  list.contains(where: { byPID[$0.ownerPID]?.released == true }) else { continue }
            do { try importer.release() } catch { note(importer, error) }
        }
        let released = sessions.filter(\.released)
        for session in sessions where session.released && !failed.contains(session.pid) {
            do {
                guard let store, let evacuated = processes[session.pid] else {
                    throw StasisError(.gpu, "PID \(session.pid) gave its device memory back before its copy was complete")
                }
                try session.refill(allocations: session.ownAllocations, from: store.store, chunks: evacuated.chunks,
                                   checkpoint: store.checkpoint, threads: Self.threads)
            } catch { note(session, error) }
        }
        let reconnecting = imports.filter { pid, _ in released.contains { $0.pid == pid } && !failed.contains(pid) }
        do {
            try SharePlan.reconnect(reconnecting, sessions: byPID.filter { !failed.contains($0.key) })
        } catch {
            problems.append("\(error)")
        }
        for session in sessions where !failed.contains(session.pid) {
            do {
                try session.resume()
                if let store { Self.forgetRescue(pid: session.pid, store: store.store) }
            } catch { note(session, error) }
        }
        for session in sessions { session.disconnect() }
        return problems
    }

    /// Of `pids`, those whose agent released its memory (they keep their rescue entries when skipped).
    func heldPIDs(_ pids: Set<Int32>) -> [Int32] { processes.keys.filter { pids.contains($0) && processes[$0]!.session.released }.sorted() }

    /// The dump is complete and the processes are gone (or running again): their rescue entries go.
    func forgetRescues() {
        guard let store else { return }
        for pid in processes.keys { Self.forgetRescue(pid: pid, store: store.store) }
    }

    // MARK: rescue entries

    /// Catalog ids of rescue entries start with this; `stasis ls` lists them, gc keeps their chunks.
    public static let rescuePrefix = "rescue-"

    /// Lists the device memory of `pid` that is about to be released, as a checkpoint with only that memory.
    static func writeRescue(pid: Int32, memory: Manifest.AgentMemory, chunks: [UInt64: [String]], store: ChunkStore) throws {
        let files = memory.allocations.map { allocation in
            let list = chunks[allocation.id] ?? []
            return Manifest.FileEntry(path: allocation.file, size: allocation.bytes, sha256: ChunkDigest.ofFile(chunks: list), chunks: list)
        }
        let processes = [Manifest.Process(pid: pid, ppid: ProcFS.stat(pid)?.ppid ?? 0, command: ProcFS.stat(pid)?.command ?? "?",
                                          arguments: ProcFS.arguments(pid), threads: 0, residentBytes: 0)]
        var manifest = Manifest(
            // The id names the process and the stasis writing it: `stasis resume` leaves alone what a running dump holds.
            id: "\(rescuePrefix)\(pid)-by-\(ThisProcess.pid)-\(UUID().uuidString.prefix(8).lowercased())", createdAt: Date(),
            tool: .init(name: "stasis", version: "rescue"), host: HostFacts.current(),
            criu: .init(version: "", logFile: ""), options: .init(leaveRunning: true, tcpEstablished: false, shellJob: false),
            processTree: .init(rootPID: pid, processes: processes),
            memory: .init(residentBytes: 0, dumpedBytes: 0, imageBytes: memory.evacuatedBytes),
            timings: .init(), gpu: .init(processes: [.init(pid: pid, devices: [], deviceMemoryBytes: memory.evacuatedBytes, agent: memory)]),
            files: files)
        manifest.store = .init(path: store.path, chunkSize: ChunkFormat.chunkSize, codec: "", plainBytes: memory.evacuatedBytes,
                               storedBytes: memory.storedBytes ?? 0, newChunks: 0, reusedChunks: 0, zeroChunks: 0)
        try StoreCatalog(store: store).register(manifest, directory: "(device memory of PID \(pid), held by its agent)")
    }

    /// The newest rescue entry of `pid` in `store`, if any.
    public static func rescue(pid: Int32, in store: ChunkStore) -> StoreCatalog.Entry? {
        // A catalog that cannot be read holds no entry that could be used.
        ((try? StoreCatalog(store: store).entries()) ?? [])
            .filter { $0.manifest.id.hasPrefix(rescuePrefix) && $0.manifest.processTree.rootPID == pid }.last
    }

    static func rescueID(pid: Int32, in store: ChunkStore) -> String? { rescue(pid: pid, in: store)?.manifest.id }

    /// The stasis that wrote a rescue entry, when it still runs (a dump in progress owns its entry).
    static func writerRunning(_ entry: StoreCatalog.Entry) -> Int32? {
        let parts = entry.manifest.id.split(separator: "-")
        guard let index = parts.firstIndex(of: "by"), index + 1 < parts.count, let writer = Int32(parts[index + 1]),
              ProcFS.isLive(writer), ProcFS.stat(writer)?.command == "stasis" else { return nil }
        return writer
    }

    public static func forgetRescue(pid: Int32, store: ChunkStore) {
        let catalog = StoreCatalog(store: store)
        // Best effort: a catalog that cannot be read has no entry to forget.
        for entry in (try? catalog.entries()) ?? [] where entry.manifest.id.hasPrefix(rescuePrefix) && entry.manifest.processTree.rootPID == pid {
            catalog.unregister(id: entry.manifest.id)
        }
    }

    /// After a restore: re-creates and refills the memory of every process the checkpoint has agent memory
    /// for, then lets its calls go on; in parallel across processes.
    /// Returns the refill's seconds, and the longest check on a GPU (nil where the CPUs checked the chunks).
    /// Without `resume`, every agent keeps its program's CUDA calls held once its memory is back and checked
    /// (a prepared restore); a later connection's RESUME lets them go. A restored agent never lets them go by
    /// itself: its contents were released at the checkpoint, and only a RESUME says they are back (control.c).
    static func refill(_ section: Manifest.GPUSection, store: DeviceStore, files: [Manifest.FileEntry], resume: Bool = true) throws -> (seconds: Double, gpuCheck: Double?) {
        let watch = Stopwatch()
        let longestCheck = Locked<Double?>(nil)
        let chunksByPath = Dictionary(files.compactMap { entry in entry.chunks.map { (entry.path, $0) } }, uniquingKeysWith: { first, _ in first })
        let processes = section.processes.filter { $0.agent != nil }
        // Every process's own memory first (in parallel), then what they share, then every process goes on.
        let sessions = Locked<[Int32: AgentSession]>([:])
        defer { for session in sessions.current.values { session.disconnect() } }
        try WorkerGroup.run(processes.count, name: "stasis-agent-refill") { index, _ in
            let process = processes[index], memory = process.agent!
            guard let session = try AgentSession.open(pid: process.pid) else {
                throw StasisError(.gpu, "PID \(process.pid) was checkpointed with its agent, but no agent answers in the restored process")
            }
            sessions.withLock { $0[process.pid] = session }
            let expected = memory.allocations.reduce(0) { $0 + $1.bytes }
            guard session.trackedBytes == expected else {
                throw StasisError(.gpu, "the agent of restored PID \(process.pid) holds \(Format.bytes(session.trackedBytes)) of device memory; the checkpoint has \(Format.bytes(expected)) for it")
            }
            var chunks: [UInt64: [String]] = [:]
            for allocation in memory.allocations {
                guard let found = chunksByPath[allocation.file] else {
                    throw StasisError(.integrity, "the manifest lists no chunks for \(allocation.file)")
                }
                chunks[allocation.id] = found
            }
            try session.refill(allocations: memory.allocations.map { .init(id: $0.id, bytes: $0.bytes, device: $0.device) },
                               from: store.store, chunks: chunks, checkpoint: store.checkpoint, threads: max(1, threads / processes.count))
            if let seconds = session.gpuCheckSeconds { longestCheck.withLock { $0 = max($0 ?? 0, seconds) } }
        }
        let all = sessions.current
        try SharePlan.reconnect(Dictionary(processes.map { ($0.pid, $0.agent!.imports ?? []) }, uniquingKeysWith: { first, _ in first }),
                                sessions: all)
        if resume { for process in processes { try all[process.pid]!.resume() } }
        return (watch.seconds, longestCheck.current)
    }
}


/// Device memory an agent released and nobody put back: a dump whose put-back failed (the GPU memory was
/// taken in between), or a stasis that died after RELEASE. Its rescue entry in the store's catalog keeps the
/// chunks from gc and says what to refill; `stasis resume PID` does it.
public enum AgentRescue {
    public struct Report: Codable, Sendable {
        public var pid: Int32
        public var rescue: String
        public var bytes: UInt64
        public var seconds: Double
    }

    /// Lets the driver and then the agent of `pid` go on, refilling its memory from its rescue entry in `store`.
    public static func resume(pid: Int32, store given: ChunkStore) throws -> Report {
        // A --leave-running dump's rescue entry may be in its stage in memory rather than in the store.
        let store = AgentEvacuation.rescue(pid: pid, in: given) != nil ? given
            : MemoryStage.all().first { AgentEvacuation.rescue(pid: pid, in: $0) != nil } ?? given
        defer { MemoryStage.removeUnlessRescuing(store) }
        guard pid > 0, ProcFS.isLive(pid) else {
            throw StasisError(.processNotFound, "no running process with PID \(pid)",
                              hint: AgentEvacuation.rescueID(pid: pid, in: store).map { "its rescue entry \($0) is no longer needed: `stasis rm \($0)`" })
        }
        guard let entry = AgentEvacuation.rescue(pid: pid, in: store), let memory = entry.manifest.gpu.processes.first?.agent else {
            throw StasisError(.invalidArgument, "the store \(store.path) holds no device memory of PID \(pid) to put back",
                              hint: "`stasis ls` lists rescue entries (ids starting with \(AgentEvacuation.rescuePrefix))")
        }
        if let writer = AgentEvacuation.writerRunning(entry) {
            throw StasisError(.invalidArgument, "PID \(pid) is being checkpointed by stasis (PID \(writer)); its rescue entry \(entry.manifest.id) is that dump's",
                              hint: "wait for that dump to end")
        }
        // An agent that runs free holds nothing: the entry outlived a dump that ended without it (stasis died
        // before the memory was released, or after the process was gone).
        if let session = try AgentSession.open(pid: pid), session.agentState == UInt32(STASIS_AGENT_RUNNING.rawValue) {
            session.disconnect()
            AgentEvacuation.forgetRescue(pid: pid, store: store)
            throw StasisError(.invalidArgument, "the agent of PID \(pid) holds no released memory (its CUDA calls run); the stale rescue entry \(entry.manifest.id) was removed")
        }
        let storeLock = store.readerLock()
        defer { storeLock?.release() }
        // The driver first: an agent cannot re-create memory in a process the driver still holds.
        // No driver library (the error is not needed): no driver checkpoint to resume.
        if (try? CheckpointDriver.load()) != nil, let state = CheckpointDriver.state(pid), state != .running {
            try CheckpointDriver.resume(pid)
        }
        let seconds = try AgentEvacuation.refill(entry.manifest.gpu, store: DeviceStore(store: store, checkpoint: entry.directory),
                                                 files: entry.manifest.files).seconds
        AgentEvacuation.forgetRescue(pid: pid, store: store)
        return Report(pid: pid, rescue: entry.manifest.id, bytes: memory.evacuatedBytes, seconds: seconds)
    }
}
