import ArgumentParser
import StasisCore
import StasisEngine
import StasisStore

struct ImportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Recreate a checkpoint from a file written by `stasis export`, its chunks going into the local store.",
        discussion: """
        Every record of the bundle is checked (files against the manifest, chunks against their SHA-256, the \
        bundle against its trailing SHA-256) before the checkpoint directory appears. A damaged or truncated \
        bundle is refused, naming the record; chunks it had already added to the store are left for gc. A \
        container checkpoint archive (podman, CRI-O, or stasis export --archive; plain, zstd or gzip) is \
        recognised too: its images go into the store, and `stasis restore --bundle` restores the container \
        through runc. An archive holding a file no engine writes is refused; containerd's checkpoint images \
        are for containerd to restore.
        """)

    @Argument(help: "The bundle file.")
    var file: String

    @Option(name: [.customShort("D"), .customLong("images-dir")], help: "The checkpoint directory to create (must not exist or be empty; its parent must exist).")
    var directory: String

    @OptionGroup var store: StoreOptions

    @OptionGroup var output: OutputOptions

    func validate() throws { try Arguments.requireCreatableName(directory, option: "-D") }

    func run() throws {
        try Output.run(json: output.json) {
            if ArchiveOperation.isArchive(file) {
                let report = try ArchiveOperation.importArchive(file, into: directory, store: store.store,
                                                                progress: Output.progressHandler(json: output.json))
                Output.clearProgress()
                if output.json { return Output.json(report) }
                for line in report.textLines { print(line) }
                return
            }
            let report = try BundleOperation.importBundle(file, into: directory, store: store.store, progress: Output.progressHandler(json: output.json))
            Output.clearProgress()
            if output.json { return Output.json(report) }
            for line in report.textLines { print(line) }
        }
    }
}
