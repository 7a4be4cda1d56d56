import Foundation
import StasisCore
import StasisEngine
import StasisImage
import StasisStore

// How export, import and verify read on a terminal.

extension CheckpointBundle.ExportReport {
    var textLines: [String] {
        ["exported \(checkpoint) to \(bundle)",
         "  contents: \(plural(files, "whole file", "whole files")), \(chunkedFiles) chunked (\(chunks) distinct chunks); \(Format.bytes(checkpointBytes)) of checkpoint",
         "  bundle:   \(Format.bytes(bundleBytes)) in \(Format.seconds(seconds))"]
    }
}

extension ArchiveOperation.ExportReport {
    var textLine: String {
        "exported \(checkpoint) to \(archive) (container checkpoint archive): \(files) files, \(Format.bytes(bytes)) in \(Format.seconds(seconds))"
    }
}

extension BundleOperation.ImportReport {
    var textLines: [String] {
        let s = statistics
        var lines = ["imported checkpoint \(id) into \(directory)",
                     "  files:  \(plural(s.files, "whole file", "whole files")), \(Format.bytes(s.fileBytes))"]
        if let store {
            lines.append("  chunks: \(s.chunks) into \(store): \(s.newChunks) new (\(Format.bytes(s.storedBytes))), \(s.reusedChunks) already there")
        }
        lines.append("  bundle: \(Format.bytes(s.bundleBytes)) verified in \(Format.seconds(seconds))")
        return lines
    }
}

extension ArchiveOperation.ImportReport {
    var textLines: [String] {
        ["imported container \(container) (written by \(engine)) into \(directory)",
         "  files:  \(files); chunks \(statistics.newChunks) new (\(Format.bytes(statistics.storedBytes))), "
            + "\(statistics.reusedChunks) already there, in \(Format.seconds(seconds))",
         "  restore it with: stasis restore -D \(directory) --bundle BUNDLE"]
    }
}

extension Checkpoint.VerifyReport {
    var textLine: String {
        "ok: \(files) files, \(Format.bytes(bytes)) match the manifest (\(Format.seconds(seconds)), \(Format.throughput(bytes: bytes, seconds: seconds)))"
    }
}
