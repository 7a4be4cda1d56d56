import ArgumentParser
import StasisCore
import StasisEngine

@main
struct Stasis: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stasis",
        abstract: "Checkpoint and restore process trees, CUDA processes included, through CRIU and the GPU driver.",
        discussion: """
        A checkpoint is a directory: manifest.json, which records the host, the process tree, the GPUs and the \
        size and SHA-256 of every file, and CRIU's small images. CRIU's memory images go to a chunk store \
        (--store) as compressed chunks named by their SHA-256, shared by every checkpoint there, so a second \
        checkpoint of a job adds only what changed. A checkpoint is written to a hidden sibling and renamed \
        into place only when complete. CUDA processes are checkpointed through the NVIDIA driver's process \
        checkpoint API (driver >= 570); programs started with `stasis run` carry an agent that moves their device \
        memory itself, straight into the chunk store, and leaves the driver only the rest. runc containers are \
        checkpointed through runc (dump --container), and exchanged with podman and CRI-O as checkpoint \
        archives (export --archive, import; plain, zstd or gzip); inspect also reads containerd's checkpoint \
        images. `stasis migrate` moves a running job to a host that runs `stasis serve`, sending only the chunks \
        that host lacks, over TLS 1.3 with --tls. `stasis push` and `stasis pull` move checkpoints through an OCI \
        registry, and `stasis restore` takes a registry reference too. Run as root.
        """,
        version: StasisVersion.current,
        subcommands: [RunCommand.self, CheckCommand.self, DumpCommand.self, RestoreCommand.self, ActivateCommand.self, ResumeCommand.self, InspectCommand.self, VerifyCommand.self,
                      ListCommand.self, RemoveCommand.self, CollectCommand.self, ReserveCommand.self, ExportCommand.self, ImportCommand.self,
                      PushCommand.self, PullCommand.self, MigrateCommand.self, ServeCommand.self]
    )

    /// Parses and runs the command, once every argument is known to be text (`Arguments.requireUTF8`).
    static func main() {
        do {
            try Output.run(json: CommandLine.arguments.contains("--json")) {
                try Arguments.requireUTF8(CommandLine.unsafeArgv, count: CommandLine.argc)
            }
        } catch {
            exit(withError: error)
        }
        main(nil)
    }
}
