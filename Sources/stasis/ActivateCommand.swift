import ArgumentParser
import StasisCore
import StasisEngine

struct ActivateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "activate",
        abstract: "Let a tree restored with `stasis restore --prepare` run.",
        discussion: """
        The prepared tree waits stopped (SIGSTOP), its memory restored, its GPU processes' device memory back \
        and checked with their CUDA calls held by their agents; activation checks that every process recorded \
        at the restore is still that process (its PID and start time) and stopped, sends each SIGCONT, and \
        lets the agents' held calls go on. A tree that is gone, or that something else let run, is refused \
        without a signal; a tree whose agents cannot be let go is killed (the checkpoint is untouched).
        """)

    @Argument(help: "The prepared tree's root PID, as `stasis restore --prepare` printed it.")
    var pid: Int32

    @OptionGroup var output: OutputOptions

    func run() throws {
        try Output.run(json: output.json) {
            let report = try PreparedRestore.activate(root: pid, device: Backends().deviceStep())
            if output.json { return Output.json(report) }
            for line in report.textLines { print(line) }
        }
    }
}
