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
        container checkpoint archive (podman, CRI-O, or stasis export --archive) is recognised too: its images go \
        into the store, and `stasis restore --bundle` restores the container through runc.
        """)

    @Argument(help: "The bundle file.")
    var file: String

    @Option(name: [.customShort("D"), .customLong("images-dir")], help: "The checkpoint directory to create (must not exist or be empty; its parent must exist).")
    var directory: String

    @OptionGroup var store: StoreOptions

    @OptionGroup var output: OutputOptions

    func run() throws {
        try Output.run(json: output.json) {
            if ArchiveOperation.isArchive(file) {
                let report = try ArchiveOperation.importArchive(file, into: directory, store: store.store)
                if output.json { return Output.json(report) }
                print("imported container \(report.container) (written by \(report.engine)) into \(report.directory)")
                print("  files:  \(report.files); chunks \(report.statistics.newChunks) new (\(Format.bytes(report.statistics.storedBytes))), \(report.statistics.reusedChunks) already there, in \(Format.seconds(report.seconds))")
                print("  restore it with: stasis restore -D \(report.directory) --bundle BUNDLE")
                return
            }
            let report = try BundleOperation.importBundle(file, into: directory, store: store.store)
            if output.json { return Output.json(report) }
            let s = report.statistics
            print("imported checkpoint \(report.id) into \(report.directory)")
            print("  files:  \(s.files) whole file\(s.files == 1 ? "" : "s"), \(Format.bytes(s.fileBytes))")
            if let store = report.store {
                print("  chunks: \(s.chunks) into \(store): \(s.newChunks) new (\(Format.bytes(s.storedBytes))), \(s.reusedChunks) already there")
            }
            print("  bundle: \(Format.bytes(s.bundleBytes)) verified in \(Format.seconds(report.seconds))")
        }
    }
}
