import ArgumentParser
import StasisCore
import StasisCRIU
import StasisEngine
import StasisStore

struct DumpCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dump",
        abstract: "Checkpoint the process tree rooted at PID, or a runc container, into a new directory.",
        discussion: """
        Without --leave-running the tree is gone afterwards, as with `criu dump`. If any step fails, the tree \
        keeps running as it was and no checkpoint directory appears. With --leave-running the tree runs again \
        before the checkpoint is made durable and published (the report gives the stall apart); GPU memory \
        moved by `stasis run`'s agent waits in memory (/dev/shm) meanwhile when the store is on a disk. With --container, runc checkpoints the \
        container (it knows its mounts, namespaces and cgroups) and stasis puts the images in the store; \
        `stasis restore` then has runc restore it, and the GPU steps find its processes under their new PIDs \
        (docs/CONTAINERS.md).
        """)

    @Argument(help: "The root of the process tree to checkpoint (not with --container).")
    var pid: Int32?

    @Option(name: .long, help: "Checkpoint this runc container (its ID, as `runc list` shows it) instead of a PID.")
    var container: String?

    @Option(name: [.customShort("D"), .customLong("images-dir")], help: "The checkpoint directory to create (must not exist or be empty; its parent must exist).")
    var directory: String

    @Flag(name: .long, help: "Leave the tree running after the checkpoint.")
    var leaveRunning = false

    @Flag(name: .long, help: "Checkpoint established TCP connections (restore replays this).")
    var tcpEstablished = false

    @Flag(name: .long, help: "Allow a tree attached to a terminal session (restore replays this).")
    var shellJob = false

    @Option(name: .long, help: "CRIU log level, 0-4.")
    var logLevel: Int32 = 4

    @Option(name: .long, help: "Seconds to wait for each CUDA process to reach a point where it can be locked, and for a GPU job's tree to hold still (no compiler running in it).")
    var lockTimeout: Double = 10

    @Option(name: .long, help: "The largest deleted but still open file (a shared-memory segment in /dev/shm, say) to carry, in MiB; CRIU refuses the dump if one is bigger.")
    var ghostLimit: UInt32 = CRIUService.ProcessOptions.defaultGhostLimitBytes >> 20

    @Option(name: .long, help: "How new chunks are compressed: lz4 (default), zstd, zstd:LEVEL (1-19) or none.")
    var compress = Codec.standard.description

    @Flag(name: .long, help: "Cut the memory images into fixed 2 MiB chunks instead of by their content (128 KiB to 2 MiB): fewer chunk files, but memory that moved since the last checkpoint is stored again.")
    var fixedChunks = false

    @OptionGroup var store: StoreOptions

    @OptionGroup var output: OutputOptions

    func validate() throws {
        try Arguments.requireCreatableName(directory, option: "-D")
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
            options.contentDefinedChunks = fixedChunks ? nil : .standard
            options.progress = Output.progressHandler(json: output.json)
            options.settleSeconds = lockTimeout
            let backends = Backends(lockTimeoutSeconds: lockTimeout)
            options.backends = backends
            let report = try DumpOperation(options, device: backends.deviceStep()).run()
            Output.clearProgress()
            if output.json { return Output.json(report) }
            for line in report.textLines { print(line) }
        }
    }
}
