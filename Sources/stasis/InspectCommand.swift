import ArgumentParser
import Foundation
import StasisCore
import StasisEngine
import StasisImage
import StasisOS

struct InspectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Describe a checkpoint: when and where it was taken, its process tree, memory, size and GPU section.",
        discussion: "Also describes a container checkpoint archive (podman, CRI-O, stasis export --archive) without unpacking it.")

    @Argument(help: "The checkpoint directory.")
    var directory: String

    @OptionGroup var output: OutputOptions

    func run() throws {
        try Output.run(json: output.json) {
            if !FileSystem.isDirectory(directory), ArchiveOperation.isArchive(directory) {
                let summary = try ArchiveOperation.summarize(directory)
                if output.json { return Output.json(summary) }
                print("container checkpoint archive \(summary.archive), written by \(summary.engine)")
                print("  container: \(summary.container) (\(summary.name)), runtime \(summary.runtime ?? "?")\(summary.created.map { ", created \(ISO8601DateFormatter().string(from: $0))" } ?? "")")
                print("  checkpoint: \(Format.bytes(summary.checkpointBytes)) of CRIU images, \(Format.bytes(summary.pagesBytes)) of them memory pages\(summary.rootfsDiffBytes.map { "; root filesystem changes \(Format.bytes($0))" } ?? "")")
                print("  files: \(summary.files.count)")
                return
            }
            let manifest = try Checkpoint.readManifest(directory)
            if output.json { return Output.json(manifest) }
            let formatter = ISO8601DateFormatter()
            print("checkpoint \(manifest.id) (format \(manifest.formatVersion))")
            print("  taken:    \(formatter.string(from: manifest.createdAt)) on \(manifest.host.hostname) (kernel \(manifest.host.kernel), \(manifest.host.machine), \(manifest.host.cpuModel))")
            print("  tools:    stasis \(manifest.tool.version), CRIU \(manifest.criu.version)")
            if let container = manifest.container {
                print("  container: \(container.id) (\(container.runtime)), bundle \(container.bundle); its config.json kept as \(container.spec)")
            }
            let options = manifest.options
            print("  options:  leave-running \(options.leaveRunning), tcp-established \(options.tcpEstablished), shell-job \(options.shellJob)")
            print("  memory:   \(Format.bytes(manifest.memory.residentBytes)) resident, \(Format.bytes(manifest.memory.dumpedBytes)) dumped")
            print("  image:    \(Format.bytes(manifest.memory.imageBytes)) in \(manifest.files.count) files")
            if let info = manifest.store {
                let chunked = manifest.files.filter { $0.chunks != nil }
                print("  store:    \(info.path): \(chunked.count) files in \(info.chunkSize >> 20) MiB chunks (\(info.codec)); this checkpoint added \(Format.bytes(info.storedBytes)) (\(info.newChunks) new chunks, \(info.reusedChunks) shared, \(info.zeroChunks) zero)")
            }
            let t = manifest.timings
            print("  timings:  freeze \(Format.seconds(t.freeze)), memory dump \(Format.seconds(t.memoryDump)), memory write \(Format.seconds(t.memoryWrite)), frozen \(Format.seconds(t.frozen)), total \(Format.seconds(t.total))")
            print("  processes (root \(manifest.processTree.rootPID)):")
            for process in manifest.processTree.processes {
                let command = process.arguments.isEmpty ? process.command : process.arguments.joined(separator: " ")
                print("    \(process.pid) (parent \(process.ppid)) \(process.threads) thread\(process.threads == 1 ? "" : "s"), \(Format.bytes(process.residentBytes)): \(command.prefix(100))")
            }
            if manifest.gpu.processes.isEmpty {
                print("  gpu:      none")
            } else {
                let gpu = manifest.gpu
                print("  gpu:      driver API \(gpu.driverVersion ?? "?"); lock \(Format.seconds(gpu.lockSeconds ?? 0)), checkpoint \(Format.seconds(gpu.checkpointSeconds ?? 0))")
                for device in manifest.gpu.devices {
                    print("    GPU \(device.index) \(device.uuid) \(device.name), \(Format.bytes(device.memoryBytes))")
                }
                for process in manifest.gpu.processes {
                    print("    \(process.pid): \(Format.bytes(process.deviceMemoryBytes)) on \(process.devices.joined(separator: ", "))")
                }
            }
        }
    }
}
