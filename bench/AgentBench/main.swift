// stasis-agent-bench: stasis's side of an agent's evacuation and refill, on this machine's CPU, against the
// stand-in agent (Tests/AgentStandIn): the same AgentSession, ring reads and writes, hashing, codec and chunk
// store as on the GPU machine, with memcpy where the GPU would copy. It shows what the CPU side costs per
// core, which bounds the agent's throughput there (docs/BENCHMARKS.md).
//
//   stasis-agent-bench --mib N --store DIR [--threads T] [--codec C] [--fill random|weights|zero] [--slots S]
//                      [--pause SECONDS] [--ring shared|copied] [--gpu-digests]
//
// --ring: the stand-in's ring as a shared memfd that stasis maps (one CPU copy, as the agent makes it; the
// default) or as plain memory read and written with process_vm_readv/writev (the agent's fallback).
// --gpu-digests: the stand-in reports each chunk's SHA-256 as the GPU does (computed on this CPU, by the
// stand-in's thread), so stasis stores chunks without hashing them.
//
// Prints one JSON line: bytes, seconds and GB/s of the evacuation (with commit) and of the refill, and the CPU
// seconds of each.
import Foundation
import Glibc
import StasisAgentStandIn
import StasisCore
import StasisGPU
import StasisOS
import StasisStore

func argument(_ name: String, _ fallback: String) -> String {
    let arguments = CommandLine.arguments
    guard let index = arguments.firstIndex(of: name), index + 1 < arguments.count else { return fallback }
    return arguments[index + 1]
}

let mib = Int(argument("--mib", "1024"))!
let storePath = argument("--store", "/dev/shm/stasis-agent-bench")
let threads = Int(argument("--threads", String(ProcessInfo.processInfo.activeProcessorCount)))!
let codec = try Codec(parsing: argument("--codec", "lz4"))
let fill = argument("--fill", "weights")
let slots = Int(argument("--slots", "32"))!
let sharedRing = argument("--ring", "shared") == "shared"
let gpuDigests = CommandLine.arguments.contains("--gpu-digests")

// "Device memory" in allocations of 64 MiB (PyTorch-like segments).
var generator = SplitMix(state: 42)
var memory: [UInt64: [UInt8]] = [:]
let allocation = 64 << 20
for index in 0..<max(1, (mib << 20) / allocation) {
    var bytes = [UInt8](repeating: 0, count: allocation)
    switch fill {
    case "zero": break
    case "random": bytes.withUnsafeMutableBytes { buffer in
        for word in 0..<(buffer.count / 8) { buffer.storeBytes(of: generator.next(), toByteOffset: word * 8, as: UInt64.self) }
    }
    default:  // fp32 weights around 0: random mantissas, few exponents (barely compressible, like real ones)
        bytes.withUnsafeMutableBytes { buffer in
            for word in 0..<(buffer.count / 4) {
                buffer.storeBytes(of: Float(Double(UInt32(truncatingIfNeeded: generator.next())) / Double(UInt32.max) - 0.5) * 0.02,
                                  toByteOffset: word * 4, as: Float.self)
            }
        }
    }
    memory[UInt64(0x1000 + index)] = bytes
}
let total = memory.values.reduce(0) { $0 + $1.count }

try? FileManager.default.removeItem(atPath: storePath)
let store = try DirectoryChunkStore(path: storePath, create: true)
let peer = try ProtocolPeer(memory: memory, slots: slots, hashes: gpuDigests, sharedRing: sharedRing)
defer { peer.stop() }
let session = try AgentSession.open(pid: getpid())!
try session.startQuiesce(timeoutMilliseconds: 10_000)
try session.finishQuiesce()

// --pause S: wait S seconds before the evacuation (to attach a profiler to this PID).
if let pause = Double(argument("--pause", "0")), pause > 0 {
    FileHandle.standardError.write(Data("stasis-agent-bench: PID \(getpid()) evacuates in \(pause) s\n".utf8))
    usleep(UInt32(pause * 1e6))
}
var watch = Stopwatch()
var cpu = ProcessCPU.seconds
let sink = ChunkSink(store: store, codec: codec, probe: true)
if gpuDigests { try session.prepareDigests() }
let chunks = try session.evacuate(into: sink, threads: threads)
try sink.commit()
let evacuation = (seconds: watch.seconds, cpu: ProcessCPU.seconds - cpu)
try session.release()

watch = Stopwatch()
cpu = ProcessCPU.seconds
try session.refill(allocations: session.allocations, from: store, chunks: chunks, checkpoint: storePath, threads: threads)
let refill = (seconds: watch.seconds, cpu: ProcessCPU.seconds - cpu)
try session.resume()
session.disconnect()
guard peer.written == memory else {
    FileHandle.standardError.write(Data("stasis-agent-bench: the refill did not give the same bytes back\n".utf8))
    exit(1)
}
let report: [String: Any] = [
    "bytes": total, "threads": threads, "codec": codec.description, "fill": fill, "slots": slots, "ringMapped": session.ringMapped, "gpuDigests": gpuDigests,
    "storedBytes": sink.totals.storedBytes,
    "evacuateSeconds": evacuation.seconds, "evacuateGBps": Double(total) / 1e9 / evacuation.seconds, "evacuateCPUSeconds": evacuation.cpu,
    "refillSeconds": refill.seconds, "refillGBps": Double(total) / 1e9 / refill.seconds, "refillCPUSeconds": refill.cpu,
]
print(String(decoding: try JSONSerialization.data(withJSONObject: report, options: [.sortedKeys]), as: UTF8.self))
try? FileManager.default.removeItem(atPath: storePath)
