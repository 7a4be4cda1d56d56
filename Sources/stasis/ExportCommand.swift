import ArgumentParser
import StasisCore
import StasisEngine
import StasisStore

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write a checkpoint, its chunks included, into one file for moving it to another machine.",
        discussion: """
        Every file and chunk is checked on the way, so a damaged checkpoint is refused here. The bundle appears \
        complete or not at all (mode 0600: it holds process memory); the hidden file an export killed midway \
        leaves is recorded in the store, and `stasis gc` removes it. `stasis import` reads it. With --archive, \
        a container's checkpoint (stasis dump --container) is written as a container checkpoint archive instead: \
        the tar layout podman and CRI-O write and checkpointctl reads (checkpoint/, config.dump, spec.dump, \
        stats-dump); see docs/CONTAINERS.md.
        """)

    @Argument(help: "The checkpoint directory.")
    var directory: String

    @Option(name: [.customShort("o"), .customLong("output")], help: "The bundle file to create (must not exist).")
    var file: String

    @Flag(name: .long, help: "Write a container checkpoint archive (podman/CRI-O layout) instead of a stasis bundle.")
    var archive = false

    @OptionGroup var store: StoreOptions

    @OptionGroup var output: OutputOptions

    func validate() throws { try Arguments.requireCreatableName(file, option: "-o") }

    func run() throws {
        try Output.run(json: output.json) {
            if archive {
                // Its hidden file recorded in the store first, as a bundle's is, so gc finds it should stasis die.
                let report = try BundleOperation.recordingPartials(of: file, checkpoint: directory, store: store.store) {
                    try ArchiveOperation.export(directory, to: file, store: store.store, progress: Output.progressHandler(json: output.json))
                }
                Output.clearProgress()
                if output.json { return Output.json(report) }
                print(report.textLine)
                return
            }
            let report = try BundleOperation.export(directory, to: file, store: store.store, progress: Output.progressHandler(json: output.json))
            Output.clearProgress()
            if output.json { return Output.json(report) }
            for line in report.textLines { print(line) }
        }
    }
}
