import ArgumentParser
import StasisCore
import StasisEngine
import StasisImage
import StasisOS

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every file and every chunk of a checkpoint against its manifest; names the first that is wrong.")

    @Argument(help: "The checkpoint directory.")
    var directory: String

    @OptionGroup var store: StoreOptions

    @OptionGroup var output: OutputOptions

    func run() throws {
        try Output.run(json: output.json) {
            try FileSystem.requireInput(directory, what: "a checkpoint directory", directoryAllowed: true)
            let manifest = try Checkpoint.readManifest(directory)
            let chunks = try Checkpoint.store(for: manifest, explicit: store.store)
            let storeLock = chunks?.readerLock()
            defer { storeLock?.release() }
            let report = try Checkpoint.verify(directory, manifest: manifest, store: chunks)
            if output.json { return Output.json(report) }
            print(report.textLine)
        }
    }
}
