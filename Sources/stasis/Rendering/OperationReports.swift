import Foundation
import StasisCore
import StasisEngine

// How the reports of dump and restore read on a terminal: one line per subject, built from short pieces.
// `--json` prints the reports themselves instead (Output.json).

extension DumpOperation.Report {
    var textLines: [String] {
        let t = timings
        var lines = [
            "checkpointed \(container.map { "container \($0), root " } ?? "")PID \(rootPID) (\(plural(processes, "process", "processes")), \(threads) threads) into \(directory)",
            "  memory: \(Format.bytes(memory.residentBytes)) resident, \(Format.bytes(memory.dumpedBytes)) dumped; image \(Format.bytes(memory.imageBytes))",
        ]
        if let info = store {
            lines.append("  store:  \(info.path): \(Format.bytes(info.storedBytes)) added (\(info.codec)); "
                + "chunks \(info.newChunks) new, \(info.reusedChunks) already there, \(info.zeroChunks) zero")
        }
        let criu = ["freeze \(Format.seconds(t.freeze))", "memory dump \(Format.seconds(t.memoryDump))", "memory write \(Format.seconds(t.memoryWrite))",
                    "frozen \(Format.seconds(t.frozen))"]
        lines.append("  time:   \(criu.joined(separator: ", ")); chunking tail \(Format.seconds(t.hash)), sync \(Format.seconds(t.sync)); total \(Format.seconds(t.total))"
            + (t.stalled.map { "; the job stalled \(Format.seconds($0)), then ran while the checkpoint was made durable" } ?? ""))
        if !gpu.processes.isEmpty {
            let bytes = gpu.processes.reduce(0) { $0 + $1.deviceMemoryBytes }
            lines.append("  gpu:    \(gpu.processes.count) CUDA process(es), \(Format.bytes(bytes)) device memory; "
                + "driver lock \(Format.seconds(gpu.lockSeconds ?? 0)), checkpoint \(Format.seconds(gpu.checkpointSeconds ?? 0)), all device steps \(Format.seconds(t.devices))")
        }
        for process in gpu.processes {
            guard let agent = process.agent else { continue }
            let cores = String(format: "%.1f", (agent.evacuateCPUSeconds ?? 0) / max(agent.evacuateSeconds, 1e-9))
            let copied = [Format.throughput(bytes: agent.evacuatedBytes, seconds: agent.evacuateSeconds), "\(cores) cores busy",
                          "\(Format.bytes(agent.storedBytes ?? 0)) stored", "\(Format.bytes(agent.zeroBytes ?? 0)) zero",
                          "hashed on the \(agent.hashedOnGPU == true ? "GPU" : "CPUs")",
                          agent.ringMapped == true ? "stored from its ring in place" : "copied out of its ring"]
            lines.append("  agent:  PID \(process.pid): \(Format.bytes(agent.evacuatedBytes)) in \(agent.allocations.count) allocation(s) copied out by its agent "
                + "in \(Format.seconds(agent.evacuateSeconds)) (\(copied.joined(separator: ", "))); calls held in \(Format.seconds(agent.quiesceSeconds)), "
                + "memory released in \(Format.seconds(agent.releaseSeconds)); the driver carried \(Format.bytes(agent.driverPathBytes))")
        }
        lines.append("  tree:   \(leaveRunning ? "left running" : "stopped")")
        return lines
    }
}

extension RestoreOperation.Report {
    var textLines: [String] {
        let t = timings
        var lines = ["\(prepared ? "prepared" : "restored") \(directory)\(container.map { " as container \($0)" } ?? ""): root PID \(rootPID) (\(plural(processes, "process", "processes")))"
            + (prepared ? ", stopped; `stasis activate \(rootPID)` lets it run" : "")]
        let images = self.images == .rebuilt ? "rebuild \(Format.seconds(t.rebuild))" : "images \(self.images.rawValue)"
        let steps = deviceSteps.isEmpty ? "" : " (" + deviceSteps.sorted { $0.key < $1.key }.map { "\($0.key) \(Format.seconds($0.value))" }.joined(separator: ", ") + ")"
        lines.append("  time: verify \(Format.seconds(t.verify)), \(images), CRIU \(Format.seconds(t.criu)) (forking \(Format.seconds(t.forking)), "
            + "restore \(Format.seconds(t.restore))), devices \(Format.seconds(t.devices))\(steps); total \(Format.seconds(t.total))")
        if clearedTimeWaitSockets > 0 {
            lines.append("  net:  \(clearedTimeWaitSockets) TIME_WAIT socket(s) destroyed to free the checkpoint's listening ports")
        }
        if let pulled {
            lines.append("  pull: \(pulled.reference), \(pulled.fetchedBlobs) blobs (\(Format.bytes(pulled.fetchedBytes))) while restoring, "
                + "\(pulled.presentChunks) chunks already here; \(Format.seconds(pulled.seconds)), kept in \(pulled.directory)")
        }
        if let logFile { lines.append("  log:  \(logFile)") }
        return lines
    }
}

extension PreparedRestore.ActivationReport {
    var textLines: [String] {
        ["activated PID \(rootPID) (\(plural(processes, "process", "processes"))\(devices > 0 ? ", the CUDA calls of \(devices) let go" : "")) in \(Format.seconds(seconds)), prepared from \(checkpoint) \(Format.seconds(preparedSeconds)) before"]
    }
}

/// "1 process", "2 processes".
func plural(_ count: Int, _ one: String, _ many: String) -> String { "\(count) \(count == 1 ? one : many)" }
