import Glibc
import StasisCore
@testable import StasisGPU
import StasisStore

/// What a dump does with an agent up to its RELEASE, as the tests that leave a job held need it: quiesce,
/// evacuate into `store`, and list the memory there as a rescue entry. Returns the entry's record and chunks
/// (a test may write the entry again).
func evacuateIntoRescue(_ session: AgentSession, store: ChunkStore) throws -> (record: Manifest.AgentMemory, chunks: [UInt64: [String]]) {
    try session.startQuiesce(timeoutMilliseconds: 1000)
    try session.finishQuiesce()
    let sink = ChunkSink(store: store, codec: .lz4, probe: true)
    let chunks = try session.evacuate(into: sink, threads: 2)
    try sink.commit()
    let record = Manifest.AgentMemory(
        allocations: session.allocations.map { .init(id: $0.id, bytes: $0.bytes, device: $0.device, file: AgentEvacuation.file(pid: getpid(), id: $0.id)) },
        evacuatedBytes: session.evacuableBytes, driverPathBytes: 0, ringBytes: 0, quiesceSeconds: 0, evacuateSeconds: 0, releaseSeconds: 0)
    try AgentEvacuation.writeRescue(pid: getpid(), memory: record, chunks: chunks, store: store)
    return (record, chunks)
}
