import ArgumentParser
import StasisEngine

@main
struct Stasis: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stasis",
        abstract: "Checkpoint and restore process trees (GPU processes in a later release) through CRIU.",
        discussion: """
        A checkpoint is a directory: CRIU's images plus manifest.json, which records the host, the process \
        tree and the size and SHA-256 of every file. It is written to a hidden sibling and renamed into place \
        only when complete. Run as root.
        """,
        version: StasisVersion.current,
        subcommands: [CheckCommand.self, DumpCommand.self, RestoreCommand.self, InspectCommand.self, VerifyCommand.self]
    )
}
