import ArgumentParser
import StasisCore
import StasisEngine
import StasisImage

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every file of a checkpoint against its manifest; names the first file that is wrong.")

    @Argument(help: "The checkpoint directory.")
    var directory: String

    @OptionGroup var output: OutputOptions

    func run() throws {
        try Output.run(json: output.json) {
            let manifest = try Checkpoint.readManifest(directory)
            let report = try Checkpoint.verify(directory, manifest: manifest)
            if output.json { return Output.json(report) }
            print("ok: \(report.files) files, \(Format.bytes(report.bytes)) match the manifest (\(Format.seconds(report.seconds)), \(Format.throughput(bytes: report.bytes, seconds: report.seconds)))")
        }
    }
}
