import ArgumentParser
import StasisCore
import StasisCRIU
import StasisEngine
import StasisGPU
import StasisStore

struct DumpCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dump",
        abstract: "Checkpoint the process tree rooted at PID, or a runc container, into a new directory.",
        discussion: """
        Without --leave-running the tree is gone afterwards, as with `criu dump`. If any step fails, the tree \
        keeps running as it was and no checkpoint directory appears. With --container, runc checkpoints the \
        container (it knows its mounts, namespaces and cgroups) and stasis puts the images in the store; \
        `stasis restore` then has runc restore it, and the GPU steps find its processes under their new PIDs \
        (docs/CONTAINERS.md).
        """)

    @Argument(help: "The root of the process tree to checkpoint (not with --container).")
    var pid: Int32?

    @Option(name: .long, help: "Checkpoint this runc container (its ID, as `runc list` shows it) instead of a PID.")
    var container: String?

    @Option(name: [.customShort("D"), .customLong("images-dir")], help: "The checkpoint directory to create (must not exist or be empty).")
    var directory: String

    @Flag(name: .long, help: "Leave the tree running after the checkpoint.")
    var leaveRunning = false

    @Flag(name: .long, help: "Checkpoint established TCP connections (restore replays this).")
    var tcpEstablished = false

    @Flag(name: .long, help: "Allow a tree attached to a terminal session (restore replays this).")
    var shellJob = false

    @Option(name: .long, help: "CRIU log level, 0-4.")
    var logLevel: Int32 = 4

    @Option(name: .long, help: "Seconds to wait for each CUDA process to reach a point where it can be locked.")
    var lockTimeout: Double = 10

    @Option(name: .long, help: "The largest deleted but still open file (a shared-memory segment in /dev/shm, say) to carry, in MiB; CRIU refuses the dump if one is bigger.")
    var ghostLimit: UInt32 = CRIUService.ProcessOptions.defaultGhostLimitBytes >> 20

    @Option(name: .long, help: "How new chunks are compressed: lz4 (default), zstd, zstd:LEVEL (1-19) or none.")
    var compress = Codec.standard.description

    @OptionGroup var store: StoreOptions

    @OptionGroup var output: OutputOptions

    func validate() throws {
        _ = try Codec(parsing: compress)
        switch (pid, container) {
        case (nil, nil): throw ValidationError("give a PID or --container ID")
        case (.some, .some): throw ValidationError("give a PID or --container ID, not both")
        case (let pid?, nil) where pid <= 0: throw ValidationError("PID must be a positive number")
        default: break
        }
        guard (0...4).contains(logLevel) else { throw ValidationError("--log-level must be between 0 and 4") }
        guard ghostLimit < 4096 else { throw ValidationError("--ghost-limit must be below 4096 MiB") }
        guard lockTimeout > 0, lockTimeout < 86_400 else { throw ValidationError("--lock-timeout must be between 0 and 86400 seconds") }
    }

    func run() throws {
        try Output.run(json: output.json) {
            var options = DumpOperation.Options(pid: pid ?? 0, directory: directory)
            options.container = container
            options.leaveRunning = leaveRunning
            options.process = .init(tcpEstablished: tcpEstablished, shellJob: shellJob, logLevel: logLevel, ghostLimitBytes: ghostLimit << 20)
            options.store = store.store
            options.codec = try Codec(parsing: compress)
            options.progress = output.json ? nil : Output.progressHandler()
            let device = CUDADeviceStep(lockTimeoutMilliseconds: UInt32(lockTimeout * 1000))
            let report = try DumpOperation(options, device: device).run()
            Output.clearProgress()
            if output.json { return Output.json(report) }
            let t = report.timings
            print("checkpointed \(report.container.map { "container \($0), root " } ?? "")PID \(report.rootPID) (\(report.processes) process\(report.processes == 1 ? "" : "es"), \(report.threads) threads) into \(report.directory)")
            print("  memory: \(Format.bytes(report.memory.residentBytes)) resident, \(Format.bytes(report.memory.dumpedBytes)) dumped; image \(Format.bytes(report.memory.imageBytes))")
            if let info = report.store {
                print("  store:  \(info.path): \(Format.bytes(info.storedBytes)) added (\(info.codec)); chunks \(info.newChunks) new, \(info.reusedChunks) already there, \(info.zeroChunks) zero")
            }
            print("  time:   freeze \(Format.seconds(t.freeze)), memory dump \(Format.seconds(t.memoryDump)), memory write \(Format.seconds(t.memoryWrite)), " +
                  "frozen \(Format.seconds(t.frozen)); chunking tail \(Format.seconds(t.hash)), sync \(Format.seconds(t.sync)); total \(Format.seconds(t.total))")
            if !report.gpu.processes.isEmpty {
                print("  gpu:    \(report.gpu.processes.count) CUDA process(es), \(Format.bytes(report.gpu.processes.reduce(0) { $0 + $1.deviceMemoryBytes })) device memory; driver lock \(Format.seconds(report.gpu.lockSeconds ?? 0)), checkpoint \(Format.seconds(report.gpu.checkpointSeconds ?? 0)), all device steps \(Format.seconds(t.devices))")
            }
            for process in report.gpu.processes {
                guard let agent = process.agent else { continue }
                print("  agent:  PID \(process.pid): \(Format.bytes(agent.evacuatedBytes)) in \(agent.allocations.count) allocation(s) copied out by its agent in \(Format.seconds(agent.evacuateSeconds)) " +
                      "(\(Format.throughput(bytes: agent.evacuatedBytes, seconds: agent.evacuateSeconds)), \(String(format: "%.1f", (agent.evacuateCPUSeconds ?? 0) / max(agent.evacuateSeconds, 1e-9))) cores busy, " +
                      "\(Format.bytes(agent.storedBytes ?? 0)) stored, \(Format.bytes(agent.zeroBytes ?? 0)) zero, hashed on the \(agent.hashedOnGPU == true ? "GPU" : "CPUs")); calls held in \(Format.seconds(agent.quiesceSeconds)), memory released in \(Format.seconds(agent.releaseSeconds)); " +
                      "the driver carried \(Format.bytes(agent.driverPathBytes))")
            }
            print("  tree:   \(report.leaveRunning ? "left running" : "stopped")")
        }
    }
}
