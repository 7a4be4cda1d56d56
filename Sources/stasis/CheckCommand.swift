import ArgumentParser
import StasisCore
import StasisEngine

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Report what this machine can do: CRIU, its kernel check, the GPU driver and GPUs.",
        discussion: "Exits non-zero when CPU checkpoint/restore cannot work here. \"no GPU driver\" is a normal answer.")

    @OptionGroup var output: OutputOptions

    func run() throws {
        let report = CheckOperation().run()
        if output.json {
            Output.json(report)
        } else {
            for line in report.textLines { print(line) }
        }
        if !report.ready { throw ExitCode.failure }
    }
}
