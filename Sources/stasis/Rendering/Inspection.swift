import Foundation
import StasisCore
import StasisEngine

// How `stasis inspect` reads on a terminal: a checkpoint's manifest, or a container checkpoint archive.

extension Manifest {
    var inspectionLines: [String] {
        let when = ISO8601DateFormatter().string(from: createdAt)
        var lines = [
            "checkpoint \(id) (format \(formatVersion))",
            "  taken:    \(when) on \(host.hostname) (kernel \(host.kernel), \(host.machine), \(host.cpuModel))",
            "  tools:    stasis \(tool.version), CRIU \(criu.version)",
        ]
        if let container {
            lines.append("  container: \(container.id) (\(container.runtime)), bundle \(container.bundle); its config.json kept as \(container.spec)")
        }
        lines.append("  options:  leave-running \(options.leaveRunning), tcp-established \(options.tcpEstablished), shell-job \(options.shellJob)")
        lines.append("  memory:   \(Format.bytes(memory.residentBytes)) resident, \(Format.bytes(memory.dumpedBytes)) dumped")
        lines.append("  image:    \(Format.bytes(memory.imageBytes)) in \(files.count) files")
        if let info = store {
            let chunked = files.filter { $0.chunks != nil }
            let contentDefined = chunked.filter { $0.chunkLengths != nil }.count
            let kinds = contentDefined == 0 ? "\(info.chunkSize >> 20) MiB chunks"
                : contentDefined == chunked.count ? "content-defined chunks of up to \(info.chunkSize >> 20) MiB"
                : "\(info.chunkSize >> 20) MiB chunks (\(contentDefined) of them content-defined)"
            lines.append("  store:    \(info.path): \(chunked.count) files in \(kinds) (\(info.codec)); this checkpoint added "
                + "\(Format.bytes(info.storedBytes)) (\(info.newChunks) new chunks, \(info.reusedChunks) shared, \(info.zeroChunks) zero)")
        }
        let t = timings
        lines.append("  timings:  freeze \(Format.seconds(t.freeze)), memory dump \(Format.seconds(t.memoryDump)), memory write \(Format.seconds(t.memoryWrite)), "
            + "frozen \(Format.seconds(t.frozen)), total \(Format.seconds(t.total))")
        lines.append("  processes (root \(processTree.rootPID)):")
        for process in processTree.processes {
            let command = process.arguments.isEmpty ? process.command : process.arguments.joined(separator: " ")
            lines.append("    \(process.pid) (parent \(process.ppid)) \(plural(process.threads, "thread", "threads")), \(Format.bytes(process.residentBytes)): \(command.prefix(100))")
        }
        guard !gpu.processes.isEmpty else { return lines + ["  gpu:      none"] }
        lines.append("  gpu:      driver API \(gpu.driverVersion ?? "?"); lock \(Format.seconds(gpu.lockSeconds ?? 0)), checkpoint \(Format.seconds(gpu.checkpointSeconds ?? 0))")
        lines += gpu.devices.map { "    GPU \($0.index) \($0.uuid) \($0.name), \(Format.bytes($0.memoryBytes))" }
        lines += gpu.processes.map { "    \($0.pid): \(Format.bytes($0.deviceMemoryBytes)) on \($0.devices.joined(separator: ", "))" }
        return lines
    }
}

extension ArchiveOperation.Summary {
    var textLines: [String] {
        let created = created.map { ", created \(ISO8601DateFormatter().string(from: $0))" } ?? ""
        let rootfs = rootfsDiffBytes.map { "; root filesystem changes \(Format.bytes($0))" } ?? ""
        return [
            "container checkpoint archive \(archive), written by \(engine)",
            "  container: \(container) (\(name)), runtime \(runtime ?? "?")\(created)",
            "  checkpoint: \(Format.bytes(checkpointBytes)) of CRIU images, \(Format.bytes(pagesBytes)) of them memory pages\(rootfs)",
            "  files: \(fileCount)",
        ]
    }
}
