import ArgumentParser
import Foundation
import StasisCore
import StasisEngine
import StasisOS
import StasisStore

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a program with the stasis agent preloaded, so that it moves its own GPU memory at checkpoints, several times faster than the driver.",
        discussion: """
        stasis replaces itself with the program (same PID, same environment plus LD_PRELOAD), so `stasis run` \
        goes wherever the program would: a shell, a job script, a container's entrypoint. The agent \
        (libstasis-agent.so) interposes the CUDA driver API. It backs cudaMalloc/cuMemAlloc of --min-backed-mib \
        and more with the driver's virtual memory API and tracks the program's own VMM allocations (PyTorch's \
        expandable segments). On `stasis dump` it holds new CUDA calls, hashes that memory on the GPU, copies it \
        out through a pinned ring of --ring-mib (which stasis maps: one CPU copy) into the chunk store, and \
        gives the physical memory back before \
        the driver's checkpoint, which then carries only the rest. After a restore it re-creates the memory at \
        the same addresses, fills it back, and the GPU checks it against the checkpoint before any held call \
        goes on. STASIS_AGENT_GPU_DIGESTS=off in the program's environment leaves the hashing to stasis's CPUs \
        (for a store shared with programs you do not trust: see docs/AGENT.md). Programs not started this way are \
        checkpointed through the driver alone. Device memory shared between processes of the tree (cuMem \
        export/import as POSIX descriptors, legacy CUDA IPC, torch.multiprocessing) is carried by the agents when \
        every process that maps it runs this way. Should the stasis that checkpoints the program die after the \
        agent gave the device memory back, the agent runs this binary's `stasis resume` on itself once \
        STASIS_AGENT_ORPHAN_GRACE seconds pass (5; off: never), and says so on the program's standard error. \
        With --arena SIZE (a store on tmpfs only), the agent takes SIZE of chunk files in the store's reserve \
        (`stasis reserve`'s blanks first), maps and pins them on threads of its own while the program runs, and \
        a checkpoint into that store copies device memory into them by DMA while the GPU hashes it: stasis takes \
        them as chunk files without a CPU copying the bytes. The arena is spent by one checkpoint and built \
        again when the program goes on; it holds SIZE of memory. See docs/AGENT.md.
        """)

    @Option(name: .long, help: "The agent library (default: $STASIS_AGENT_LIBRARY, else libstasis-agent.so beside the stasis binary or in ../lib/stasis).")
    var agent: String?

    @Option(name: .long, help: "Size of the agent's pinned staging ring, pinned when the program first allocates and again after each checkpoint gave the device memory back (256 moves tens of GiB faster).")
    var ringMib: Int = 64

    @Option(name: .long, help: "cuMemAlloc requests smaller than this stay with the driver.")
    var minBackedMib: Int = 2

    @Flag(name: .long, help: "Leave cuMemAlloc to the driver; track only the program's own VMM allocations.")
    var noBacking = false

    @Option(name: .long, help: "Pin SIZE (512M, 32G) of the store's memory ahead of checkpoints, for device memory to be copied straight into (a store on tmpfs only; at least the program's device memory to be used).")
    var arena: String?

    @Option(name: .long, help: "The store the arena is in (default: $STASIS_STORE, else \(StoreLocation.defaultPath)); checkpoints into it use the arena.")
    var store: String?

    @Flag(name: .long, help: "The agent logs what it does to standard error, and at exit how many calls passed its gate.")
    var agentLog = false

    @Argument(parsing: .captureForPassthrough, help: "The program and its arguments.")
    var command: [String] = []

    func validate() throws {
        if ["--help", "-h", "help"].contains(command.first) { throw CleanExit.helpRequest(self) }
        guard !arguments.isEmpty else { throw ValidationError("give the program to run: stasis run [OPTIONS] -- PROGRAM [ARGUMENTS...]") }
        guard (8...2048).contains(ringMib) else { throw ValidationError("--ring-mib must be between 8 and 2048") }
        guard minBackedMib >= 0 else { throw ValidationError("--min-backed-mib must not be negative") }
        if let arena, (Format.parseBytes(arena) ?? 0) < UInt64(ChunkFormat.chunkSize) {
            throw ValidationError("--arena \(arena) is not a size of one chunk (2 MiB) or more (write it as 512M, 32G or a number of bytes)")
        }
        if store != nil, arena == nil { throw ValidationError("--store names the arena's store: give --arena SIZE too") }
        if store?.isEmpty == true { throw ValidationError("--store is empty: name the store's directory") }
    }

    var arguments: [String] { command.first == "--" ? Array(command.dropFirst()) : command }

    func run() throws {
        try Output.run(json: false) {
            let library = try Self.locateAgent(agent)
            let preload = ProcessInfo.processInfo.environment["LD_PRELOAD"].map { $0.isEmpty ? library : "\(library):\($0)" } ?? library
            var environment = ["LD_PRELOAD": preload, "STASIS_AGENT_RING_MIB": String(ringMib),
                               "STASIS_AGENT_MIN_BACKED_MIB": String(minBackedMib), "STASIS_AGENT_BACKING": noBacking ? "off" : "on"]
            if agentLog { environment["STASIS_AGENT_LOG"] = "1" }
            if let arena, let bytes = Format.parseBytes(arena) {
                environment["STASIS_AGENT_ARENA_DIR"] = try Self.arenaDirectory(store: store)
                environment["STASIS_AGENT_ARENA_MIB"] = String(bytes >> 20)
            }
            // Should a stasis die after the agent released the memory, the agent runs this binary's `resume`.
            if let binary = Self.ownBinary() { environment["STASIS_AGENT_STASIS"] = binary }
            let failure = Spawn.replaceProcess(with: arguments, environment: environment)
            FileHandle.standardError.write(Data("stasis: error: cannot run \(arguments[0]): \(failure)\n".utf8))
            // As shells answer: 127 for a program not found, 126 for one that cannot be run.
            throw ExitCode(failure == .noSuchFileOrDirectory ? 127 : 126)
        }
    }

    /// The reserve directory of the store in memory the arena goes into, made when missing.
    static func arenaDirectory(store: String?) throws -> String {
        let path = StoreLocation.resolve(store, recorded: nil)
        var existing = URL(fileURLWithPath: path).standardizedFileURL
        while !FileSystem.exists(existing.path), existing.path != "/" { existing.deleteLastPathComponent() }
        guard FileSystem.isInMemory(existing.path) else {
            throw StasisError(.invalidArgument, "the store \(path) is not in memory: an arena's pages become the store's, so it must be on tmpfs",
                              hint: "put the store on /dev/shm (--store or STASIS_STORE)")
        }
        guard let opened = try Backends().openStore(store, create: true) as? DirectoryChunkStore else {
            throw StasisError(.invalidArgument, "only a store in a directory can hold an arena")
        }
        try FileSystem.makePrivateDirectory(opened.arenaDirectory)
        return opened.arenaDirectory
    }

    /// This binary's own path, whichever way it was started (through PATH, a symlink, a relative path).
    static func ownBinary() -> String? {
        // Without /proc (a minimal chroot), the name this binary was started by is the next best answer.
        let executable = (try? FileSystem.symlinkTarget("/proc/self/exe")) ?? CommandLine.arguments[0]
        let path = URL(fileURLWithPath: executable).resolvingSymlinksInPath().path
        return FileSystem.isExecutable(path) ? path : nil
    }

    /// The agent library: the option, $STASIS_AGENT_LIBRARY, then beside the binary or in ../lib/stasis.
    static func locateAgent(_ explicit: String?) throws -> String {
        let executable = ownBinary() ?? CommandLine.arguments[0]
        let binary = URL(fileURLWithPath: executable).resolvingSymlinksInPath().deletingLastPathComponent()
        let candidates = [explicit, ProcessInfo.processInfo.environment["STASIS_AGENT_LIBRARY"]].compactMap { $0 }
        for path in candidates {
            guard FileSystem.isReadable(path) else {
                throw StasisError(.invalidArgument, "the agent library \(path) does not exist or cannot be read")
            }
            return URL(fileURLWithPath: path).standardizedFileURL.path
        }
        // Beside the binary, an installed layout, and a build of this repository (.build/agent, from
        // scripts/build-agent.sh, beside .build/<triple>/debug).
        for path in [binary.appendingPathComponent("libstasis-agent.so").path,
                     binary.appendingPathComponent("../lib/stasis/libstasis-agent.so").standardizedFileURL.path,
                     binary.appendingPathComponent("../../agent/libstasis-agent.so").standardizedFileURL.path]
        where FileSystem.isReadable(path) {
            return path
        }
        throw StasisError(.invalidArgument, "cannot find libstasis-agent.so beside \(binary.path) or in \(binary.appendingPathComponent("../lib/stasis").standardizedFileURL.path)",
                          hint: "build it with scripts/build-agent.sh and pass --agent PATH (or set STASIS_AGENT_LIBRARY)")
    }
}
