import Foundation
import StasisCore
import StasisEngine
import StasisStore

// How `stasis migrate` and `stasis gc` read on a terminal.

extension MigrateOperation.Report {
    var textLines: [String] {
        var lines = [
            "migrated PID \(pid) to \(receiver): running there as root PID \(remotePID)",
            "  downtime: \(Format.seconds(downtimeSeconds)) (checkpoint, sending its new chunks meanwhile, \(Format.seconds(dumpSeconds)); "
                + "the rest sent in \(Format.seconds(transferSeconds)); restore there \(Format.seconds(restoreSeconds))"
                + (receiverReceiveSeconds.flatMap { received in receiverRestoreSeconds.map { restored in
                    ": the receiver received the rest in \(Format.seconds(received)) and restored in \(Format.seconds(restored))" } } ?? "") + ")",
            "  sent:     \(Format.bytes(bytesSent)) in \(chunksSent) chunks, \(Format.bytes(bytesSentDuringDump)) of it while the dump ran; "
                + "not sent: \(chunksSkipped) chunks, \(Format.bytes(bytesSkipped)), the receiver had them",
        ]
        lines.append("  tls:      \(encryption == "none" ? "none: the checkpoint crossed the network in clear" : encryption)")
        if gpuProcesses > 0 { lines.append("  gpu:      \(gpuProcesses) CUDA process(es)") }
        return lines
    }
}

extension StoreCatalog.CollectReport {
    /// A line per stale checkpoint dropped, then what was removed and kept.
    var textLines: [String] {
        let verb = dryRun ? "would drop" : "dropped"
        let dropped = droppedCheckpoints.map { "\(verb) \($0.id): its directory \($0.directory) is gone (its chunks are no longer kept)" }
        let reserved = reservedChunks > 0 ? ", \(reservedChunks) of them kept as the store's reserve" : ""
        let removed = ["\(removedChunks) chunks (\(Format.bytes(removedBytes))\(reserved))", "\(removedTemporaryFiles) leftover files",
                       "\(removedPartialDirectories) unfinished checkpoint directories and \(removedPartialFiles) unfinished export files of dead writers",
                       "\(removedWriterRecords) records of dead writers"]
            + (reclaimedArenaPieces > 0 ? ["\(reclaimedArenaPieces) pieces of dead programs' arenas (back in the reserve)"] : [])
        return dropped + ["\(dryRun ? "would remove" : "removed") \(removed.joined(separator: ", ")); kept \(keptChunks) chunks of \(checkpoints) checkpoints"]
    }
}

extension ListCommand.Listing {
    /// A checkpoint per line (when, id, root PID, sizes, where), then the store's totals.
    var textLines: [String] {
        let formatter = ISO8601DateFormatter()
        return checkpoints.map { row in
            let sizes = "\(Format.bytes(row.imageBytes)) image, \(Format.bytes(row.addedBytes)) added"
            return "\(formatter.string(from: row.createdAt))  \(row.id)  PID \(row.rootPID)  \(sizes)  \(row.directory)"
                + (row.stale ? "  (stale: directory missing; the next gc drops it)" : row.present ? "" : "  (directory missing)")
        } + ["\(plural(checkpoints.count, "checkpoint", "checkpoints")); \(chunks) chunks, \(Format.bytes(chunkBytes)) in \(store)"]
    }
}
