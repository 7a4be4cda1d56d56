import Foundation
import StasisCRIU
import StasisCore
import StasisImage
import StasisOS
import StasisStore

/// One migration's shared state, its steps and its one rollback. Until the commit, a failure undoes what the
/// migration made here, the last first: the checkpoint spooled for it is discarded (kept, and named, when the
/// user placed it with --spool), and the chunk sender is stopped; the dump's own rollback has already thawed
/// the job. Once the receiver has acknowledged the commit nothing is undone: the job runs there, and the tree
/// here is ended instead.
final class MigrateRun {
    let operation: MigrateOperation
    var options: MigrateOperation.Options { operation.options }
    let receiver: MigrateOperation.Receiver
    let spool: String
    let rollback = Rollback()
    /// Sends the checkpoint from the dump's post-dump step (while the tree is frozen) and commits.
    let handOver: MigrationHandOver
    private var gpuProcesses = 0
    /// The rollback's step for the spooled checkpoint: forgotten once the dump is over (handed over, or the
    /// only copy of the job's state).
    private static let spoolStep = "spool"

    /// Makes the spool's parent and starts sending chunks: new chunks go to the receiver while the dump still
    /// writes the rest. Undone by stopping the sender.
    init(_ operation: MigrateOperation, receiver: MigrateOperation.Receiver) throws {
        (self.operation, self.receiver) = (operation, receiver)
        let options = operation.options
        spool = options.spool ?? "/var/lib/stasis/migrate/\(MigrateOperation.stamp())-\(options.pid)"
        try FileSystem.makePrivateDirectory(URL(fileURLWithPath: spool).deletingLastPathComponent().path)
        let sender = ChunkPreloader(receiver.connection)
        rollback.onFailure(of: "sender") {
            // Ends the sender's thread; its failure, if any, already failed the hand-over, or the dump failed first.
            _ = try? sender.finish()
            return nil
        }
        handOver = MigrationHandOver(options: options, receiver: receiver, sender: sender)
    }

    // MARK: the steps, in order

    /// The dump, into the spool; inside its post-dump step (the tree frozen) the checkpoint is handed over and
    /// committed. A failure before the commit is rolled back (the job runs on here); after it, the tree here is
    /// ended, whatever failed (CRIU's last steps, the report): the job must not run on both hosts.
    func dumpAndHandOver() throws {
        rollback.onFailure(of: Self.spoolStep) { [unowned self] in discardFailed() }
        do {
            gpuProcesses = try DumpOperation(dumpOptions(), device: operation.device).run().gpu.processes.count
        } catch {
            guard handOver.outcome.current != nil else { throw fail(error) }
            for process in ProcFS.tree(root: options.pid).reversed() { Signals.kill(process.pid) }
        }
        rollback.forget(Self.spoolStep)
    }

    private func dumpOptions() -> DumpOperation.Options {
        var dump = DumpOperation.Options(pid: options.pid, directory: spool)
        dump.process = options.process
        dump.store = options.store
        dump.codec = options.codec
        dump.settleSeconds = options.settleSeconds
        dump.backends = options.backends
        let (sender, handOver) = (handOver.sender, handOver)
        dump.chunkObserver = { digest, file in sender.offer(digest, file) }
        dump.whilePublished = { manifest, directory in try handOver.run(manifest, directory: directory) }
        return dump
    }

    /// Sent and running there: the sender is stopped, and the local copy goes (its chunks stay in the store
    /// for the next time).
    func finish() throws -> MigrateOperation.Report {
        let total = handOver.downtime.seconds
        // The sender has finished in the hand-over, or the dump ended without one: it holds nothing to report.
        _ = rollback.undo()
        guard let done = handOver.outcome.current else {
            throw StasisError(.io, "migration of PID \(options.pid): CRIU ended without its post-dump step; the checkpoint is in \(spool)")
        }
        // An unreadable manifest leaves its entry listed: see removeSpool.
        removeSpool(listedAs: (try? Checkpoint.readManifest(spool))?.id)
        return .init(pid: options.pid, receiver: options.to, remotePID: done.remotePID, downtimeSeconds: total, dumpSeconds: done.dumpDone,
                     transferSeconds: done.transferDone - done.dumpDone, restoreSeconds: total - done.transferDone,
                     receiverReceiveSeconds: done.receiverTimes?.received, receiverRestoreSeconds: done.receiverTimes?.restored,
                     bytesSent: done.sent, bytesSentDuringDump: done.early, bytesSkipped: done.skipped, chunksSent: done.chunksSent,
                     chunksSkipped: done.chunksSkipped, gpuProcesses: gpuProcesses, encryption: receiver.encryption,
                     deferredSignal: Interruption.caught.map(Interruption.name))
    }

    // MARK: the rollback

    /// Undoes every step done, the last first, and says what was left: abandoned by a signal, or failed.
    func fail(_ error: Error) -> StasisError {
        let leftBehind = rollback.undo()
        if let signal = Interruption.caught { return MigrateOperation.interrupted(signal, pid: options.pid, leftBehind: leftBehind) }
        let failure = StasisError.wrapping(error, as: .io).prefixed("migration of PID \(options.pid) to \(options.to) failed")
        return failure.appending(leftBehind.map { "; " + $0 }.joined())
    }

    /// A migration that failed before its commit leaves no checkpoint behind in the default spool: its catalog
    /// entry goes (gc may then take the chunks nothing else uses) and so does the directory. One the user placed
    /// with --spool stays, and is named.
    private func discardFailed() -> String? {
        // No manifest to read: nothing was published (the dump's own rollback removed its staging).
        guard let manifest = try? Checkpoint.readManifest(spool) else { return nil }
        guard options.spool == nil else { return "the checkpoint made for it stays in \(spool)" }
        removeSpool(listedAs: manifest.id)
        return nil
    }

    /// Unlists the spooled checkpoint (`id`: its manifest's) and removes it.
    private func removeSpool(listedAs id: String?) {
        // An entry left listed (no store to open, no manifest to read) names a directory that is gone: gc drops
        // it, so nothing is lost by going on.
        if let id, let store = try? operation.openStore() { StoreCatalog(store: store).unregister(id: id) }
        FileSystem.removeTree(spool)
    }
}
