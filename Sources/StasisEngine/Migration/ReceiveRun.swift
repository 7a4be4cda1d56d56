import Crypto
import Foundation
import StasisCore
import StasisImage
import StasisOS
import StasisStore

/// One authenticated migration on the receiver: its steps, in the order of the conversation
/// (MigrationProtocol.swift), and its one rollback. Each acquisition records its undo where it is made: the
/// store's lock, the intake of chunks sent during the source's dump, and, once restored, the job's copy here,
/// which is stopped unless the source commits. A failure runs them, the last first; a migration that worked
/// lets go of the rest the same way. The received checkpoint stays in the root whatever happens (listed in
/// the store, as an import).
final class ReceiveRun {
    let serve: ServeOperation
    var options: ServeOperation.Options { serve.options }
    let connection: TCPConnection
    let session: SymmetricKey
    let store: ChunkStore
    let rollback = Rollback()
    /// The rollback's step for the restored copy: forgotten once the source has committed.
    private static let copyStep = "restored copy"

    init(_ serve: ServeOperation, connection: TCPConnection, session: SymmetricKey) throws {
        (self.serve, self.connection, self.session) = (serve, connection, session)
        // Until the restore a signal abandons the migration: the connection is shut down, the source's dump
        // fails and its job runs on there.
        Interruption.abortable(connection)
        connection.setTimeout(seconds: 120)
        store = try serve.options.backends.openStore(serve.options.store, create: true)
    }

    func run() throws -> Int32 {
        let restored: Int32
        do {
            try holdStore()
            let manifest = try acceptOffer(try receiveDuringDump())
            restored = try restoreOrSayWhyNot(manifest)
            try awaitCommit(restored)
        } catch {
            throw fail(error)
        }
        return finish(restored)
    }

    // MARK: the steps, in order

    /// The store's lock, shared, from the first chunk of the source's dump until the checkpoint is listed (and
    /// restored): gc must not take a chunk this migration said it has.
    private func holdStore() throws {
        let lock = try store.lock(exclusive: false)
        rollback.onFailure(of: "store lock") { lock.release(); return nil }
    }

    /// The source now freezes and checkpoints: its offer may take as long as its dump. Meanwhile it asks which
    /// of its new chunks this store lacks, and sends those. Returns the offer.
    private func receiveDuringDump() throws -> [UInt8] {
        let early = ChunkReceiver(store: store)
        rollback.onFailure(of: "early chunks") {
            // The migration failed already: the chunks checked so far are kept, each under its digest, and one
            // that cannot be kept changes nothing for it.
            _ = try? early.finish()
            return nil
        }
        connection.setTimeout(seconds: 3600)
        var offer: [UInt8] = []
        while offer.isEmpty {
            let (kind, payload) = try Migration.receiveAny(connection)
            switch kind {
            case .query: try answerQuery(payload, into: early)
            case .offer: offer = payload
            default: throw StasisError(.io, "\(connection.peer) sent \(kind) during its dump")
            }
        }
        rollback.forget("early chunks")
        _ = try early.finish()
        return offer
    }

    /// Says which of the chunks asked about this store lacks, then takes each of those, checked against its digest.
    private func answerQuery(_ payload: [UInt8], into early: ChunkReceiver) throws {
        let asked = String(decoding: payload, as: UTF8.self).split(separator: "\n").map(String.init)
        // Each becomes a path in the store: only chunk names, never anything else.
        guard asked.allSatisfy(Manifest.isDigest) else {
            throw StasisError(.integrity, "\(connection.peer) asked about a chunk that is not named by a SHA-256")
        }
        let lacking = asked.filter { !store.has($0) }
        try Migration.send(connection, .need, Array(lacking.joined(separator: "\n").utf8))
        for digest in lacking {
            // Read straight into the checker's buffer: the chunk's digest, then its file.
            let (kind, length) = try Migration.receiveHeader(connection)
            guard kind == .chunk, length > 64, String(decoding: try connection.receive(64), as: UTF8.self) == digest else {
                throw StasisError(.io, "\(connection.peer) sent another message than chunk \(digest)")
            }
            try early.submit(digest: digest, length: length - 64, from: connection.peer) { try connection.receive(into: $0) }
            FaultInjection.stall("chunk", say: options.log)
        }
    }

    /// The offered manifest must carry the session's HMAC; the answer is the chunks this store lacks.
    private func acceptOffer(_ offer: [UInt8]) throws -> Manifest {
        connection.setTimeout(seconds: 120)
        guard offer.count > 32, Migration.same(Migration.mac(session, Array(offer.dropLast(32))), Array(offer.suffix(32))) else {
            throw StasisError(.permission, "the offered manifest does not carry the session's HMAC; refused")
        }
        let manifest = try Manifest.decode(Data(offer.dropLast(32)), path: "the manifest from \(connection.peer)")
        let lacking = Set(manifest.files.flatMap { $0.chunks ?? [] }.filter { !$0.isEmpty && !store.has($0) })
        try Migration.send(connection, .need, Array(lacking.sorted().joined(separator: "\n").utf8))
        return manifest
    }

    /// Imports and restores the checkpoint, and tells the source: "running PID RECEIVED RESTORED" (the seconds
    /// this end took to receive the rest of the checkpoint and to restore it, so that both ends report the same
    /// figures), or why not (its job then runs on there, and this migration has failed).
    private func restoreOrSayWhyNot(_ manifest: Manifest) throws -> Int32 {
        let restored: Int32, receivedSeconds: Double, restoredSeconds: Double
        do {
            (restored, receivedSeconds, restoredSeconds) = try importAndRestore(manifest)
        } catch {
            // One line for the source (which shows a peer's text escaped): the message and its hint.
            let failure = StasisError.wrapping(error)
            let text = "failed: \(failure.message)" + (failure.hint.map { " (hint: \($0))" } ?? "")
            // The source learns of the failure from the connection's end if this answer cannot reach it.
            try? sendResult(text)
            throw StasisError(.migrationFailed, text, logExcerpt: failure.logExcerpt, logPath: failure.logPath)
        }
        do {
            try sendResult("running \(restored) " + String(format: "%.6f %.6f", receivedSeconds, restoredSeconds))
        } catch {
            throw notCommitted(restored, error)
        }
        return restored
    }

    /// The rest of the checkpoint, as a bundle, into the received root; then the restore, after which the
    /// copy here is the rollback's to stop until the source commits.
    private func importAndRestore(_ manifest: Manifest) throws -> (pid: Int32, received: Double, restored: Double) {
        let reader = try CheckpointBundle.Reader(stream: connection, name: "the migration from \(connection.peer)")
        guard reader.manifest == manifest else { throw StasisError(.integrity, "the bundle's manifest is not the one offered; refused") }
        FaultInjection.pause("receive", say: options.log)
        FaultInjection.stall("receive", say: options.log)
        let staging = try StagingDirectory(destination: options.root + "/" + manifest.id, store: store)
        let watch = Stopwatch()
        let received = Locked<UInt64>(0)
        reader.meter = received
        let ticker = ProgressTicker.reporting(options.progress, phase: "receiving from \(connection.peer)") { received.current }
        let imported: BundleOperation.ImportReport
        do {
            defer { ticker?.stop() }
            imported = try BundleOperation.importBundle(reader, staging: staging, store: store.path, chunksMayBeInStore: true)
        }
        let importSeconds = watch.seconds
        var restore = RestoreOperation.Options(directory: imported.directory)
        restore.store = store.path
        restore.backends = serve.options.backends
        // From the restore on, the job may end up running here: a signal waits until that is settled.
        if let signal = Interruption.deferSignals() {
            throw StasisError(.interrupted, "\(Interruption.name(signal)) came before the restore: the migration was abandoned and the job runs on at the source")
        }
        let report = try RestoreOperation(restore, device: serve.device()).run()
        let restored = report.rootPID
        // Running here; it stays only if the source commits (and so ends its own).
        rollback.onFailure(of: Self.copyStep) {
            RestoreOperation.stopRestoredTree(root: restored)
            ServeOperation.reapWhenItEnds(restored)
            return nil
        }
        options.log("\(connection.peer): the rest of the checkpoint received in \(Format.seconds(importSeconds)), restored in \(Format.seconds(report.timings.total)) (CRIU \(Format.seconds(report.timings.criu)), devices \(Format.seconds(report.timings.devices)))")
        return (restored, importSeconds, report.timings.total)
    }

    /// The source's commit (with the session's HMAC): from then on the job runs here, and only here.
    private func awaitCommit(_ restored: Int32) throws {
        do {
            connection.setTimeout(seconds: 30)
            let commit = try Migration.receive(connection, .commit, max: 32)
            guard Migration.same(commit, Migration.mac(session, Array("commit".utf8))) else {
                throw StasisError(.permission, "the commit does not carry the session's HMAC")
            }
        } catch {
            throw notCommitted(restored, error)
        }
        rollback.forget(Self.copyStep)
    }

    /// Acknowledges the commit and lets go of what the migration held (the store's lock), as a failure would.
    private func finish(_ restored: Int32) -> Int32 {
        FaultInjection.pause("committed", say: options.log)
        // The commit is in: the job runs here whatever becomes of the acknowledgement (a source that does not
        // get it says the job may run here too).
        try? Migration.send(connection, .committed, Migration.mac(session, Array("committed".utf8)))
        // What is left holds nothing the source or the user sees, and none of its undos can fail.
        _ = rollback.undo()
        return restored
    }

    // MARK: the rollback

    /// Undoes every step done, the last first; the step's own error says what failed (the undos cannot fail).
    private func fail(_ error: Error) -> Error {
        _ = rollback.undo()
        return error
    }

    private func sendResult(_ text: String) throws {
        let words = Array(text.utf8)
        try Migration.send(connection, .result, words + Migration.mac(session, Array("result".utf8), words))
    }

    private func notCommitted(_ restored: Int32, _ error: Error) -> StasisError {
        StasisError(.migrationFailed, "restored as PID \(restored), but the source did not commit (\(error)); the copy here was stopped and the job runs on there")
    }
}
