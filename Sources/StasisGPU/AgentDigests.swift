import CStasisAgentProtocol
import Foundation
import StasisCore
import StasisOS
import StasisStore

// Chunk digests on the GPU: the agent's kernel hashes chunks where they lie, so that an evacuation need not
// hash them on stasis's CPUs (nor read a chunk the store holds already), and a refill is checked without
// reading the device memory back.
extension AgentSession {
    /// Asks the agent to load its chunk-digest kernel on its GPUs (held or released-and-rebacked only). An
    /// agent that cannot is no failure: stasis then hashes on its CPUs, and `noGPUHashing` says why.
    public func prepareDigests() throws {
        try onChannel { channel in try prepareDigests(channel) }
    }

    func prepareDigests(_ channel: AgentChannel) throws {
        try channel.send(STASIS_AGENT_DIGESTS)
        let answer = try channel.expect(STASIS_AGENT_OK, doing: "load its digest kernel")
        hashesOnGPU = answer.length == 1
        noGPUHashing = hashesOnGPU ? nil : AgentChannel.text(answer)
    }

    /// Asks the agent for the SHA-256 of every chunk now in the device and compares each with the checkpoint's.
    func verifyOnGPU(_ channel: AgentChannel, allocations: [Allocation], chunks: [UInt64: [String]], checkpoint: String) throws {
        let chunk = ChunkFormat.chunkSize
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

    /// A FILLED's or DIGEST's SHA-256, as the store names chunks.
    static func hex(_ message: AgentChannel.Message) -> String {
        withUnsafeBytes(of: message.digest) { SegmentedDigest.hex($0) }
    }
}
