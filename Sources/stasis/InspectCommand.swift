import ArgumentParser
import Foundation
import StasisCore
import StasisEngine
import StasisImage
import StasisOS

struct InspectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Describe a checkpoint: when and where it was taken, its process tree, memory, size and GPU section.",
        discussion: "Also describes, without unpacking it, a container checkpoint archive (podman, CRI-O, stasis export --archive) or a containerd checkpoint image (ctr image export --skip-manifest-json).")

    @Argument(help: "The checkpoint directory.")
    var directory: String

    @OptionGroup var output: OutputOptions

    func run() throws {
        try Output.run(json: output.json) {
            try FileSystem.requireInput(directory, what: "a checkpoint directory or archive", directoryAllowed: true)
            if !FileSystem.isDirectory(directory), ArchiveOperation.isArchive(directory) {
                let summary = try ArchiveOperation.summarize(directory)
                if output.json { return Output.json(summary) }
                for line in summary.textLines { print(line) }
                return
            }
            let manifest = try Checkpoint.readManifest(directory)
            if output.json { return Output.json(manifest) }
            for line in manifest.inspectionLines { print(line) }
        }
    }
}
