import Crypto
import Foundation
import StasisCore
import StasisImage
import StasisOS
import StasisStore

/// The source's side of a migration once its checkpoint is published, while the tree is still frozen (the
/// dump's post-dump step, `DumpOperation.Options.whilePublished`): offer the manifest, send what the receiver
/// lacks, wait for its restore, commit. If any of it throws, the dump fails and the job runs on here.
final class MigrationHandOver: Sendable {
    /// What the hand-over did, for the report; set once the receiver has acknowledged the commit.
    struct Outcome {
        var remotePID: Int32
        var sent: UInt64, early: UInt64, skipped: UInt64
        var chunksSent: Int, chunksSkipped: Int
        /// Seconds since `downtime` began when the dump was done, and when the last byte was sent.
        var dumpDone: Double, transferDone: Double
        /// The receiver's own seconds to receive the rest of the checkpoint and to restore it (nil from a
        /// receiver that does not say).
        var receiverTimes: (received: Double, restored: Double)?
    }

    /// What goes in the bundle: the local store, and the chunks the receiver has (those not sent during the
    /// dump, and their bytes, counted as skipped).
    private struct Plan {
        var store: ChunkStore?
        var skipping: Set<String>
        var notSent: Set<String>
        var skippedBytes: UInt64
    }

    let options: MigrateOperation.Options
    let connection: TCPConnection
    let session: SymmetricKey
    /// New chunks sent during the dump.
    let sender: ChunkPreloader
    /// From just before the freeze to the receiver's answer.
    let downtime = Stopwatch()
    let outcome = Locked<Outcome?>(nil)

    init(options: MigrateOperation.Options, receiver: MigrateOperation.Receiver, sender: ChunkPreloader) {
        (self.options, connection, session, self.sender) = (options, receiver.connection, receiver.session, sender)
    }

    func run(_ manifest: Manifest, directory: String) throws {
        let early = try sender.finish()
        let dumpDone = downtime.seconds
        let manifestData = try FileSystem.readFile(directory + "/" + Manifest.fileName)
        let plan = try offer(manifest, manifestData: manifestData, early: early.digests)
        let sent = try sendCheckpoint(manifest, directory: directory, manifestData: manifestData, plan: plan)
        let transferDone = downtime.seconds
        let (remote, receiverTimes) = try awaitRestore()
        try commit(remote: remote)
        outcome.withLock {
            $0 = Outcome(remotePID: remote, sent: sent.bundleBytes + early.bytes, early: early.bytes, skipped: plan.skippedBytes,
                         chunksSent: sent.chunks + early.digests.count, chunksSkipped: plan.notSent.count, dumpDone: dumpDone,
                         transferDone: transferDone, receiverTimes: receiverTimes)
        }
    }

    /// Offers the manifest (with the session's HMAC); the receiver answers with the chunks it lacks.
    private func offer(_ manifest: Manifest, manifestData: Data, early: Set<String>) throws -> Plan {
        // The receiver first commits the chunks sent during the dump (two syncfs over them): give it time.
        connection.setTimeout(seconds: 600)
        try Migration.send(connection, .offer, Array(manifestData) + Migration.mac(session, Array(manifestData)))
        let lacking = Set(String(decoding: try Migration.receive(connection, .need), as: UTF8.self).split(separator: "\n").map(String.init))
        let store = try Checkpoint.store(for: manifest, explicit: nil)
        let all = Set(manifest.files.flatMap { $0.chunks ?? [] }.filter { !$0.isEmpty })
        let skipping = all.subtracting(lacking)
        let notSent = skipping.subtracting(early)
        let skippedBytes = notSent.reduce(UInt64(0)) { total, digest in total + (store.map { $0.storedSize(digest) ?? 0 } ?? 0) }
        return Plan(store: store, skipping: skipping, notSent: notSent, skippedBytes: skippedBytes)
    }

    /// The checkpoint as a bundle, without the chunks the receiver has.
    private func sendCheckpoint(_ manifest: Manifest, directory: String, manifestData: Data,
                                plan: Plan) throws -> CheckpointBundle.ExportReport {
        connection.setTimeout(seconds: 120)
        let meter = Locked<UInt64>(0)
        let ticker = ProgressTicker.reporting(options.progress, phase: "sending to \(connection.peer)") { meter.current }
        defer { ticker?.stop() }
        return try CheckpointBundle.stream(directory: directory, manifestData: manifestData, manifest: manifest, store: plan.store,
                                           to: connection, skipping: plan.skipping, meter: meter)
    }

    /// The receiver's authenticated answer: the root PID it restored, or why it could not.
    /// "running PID [RECEIVED RESTORED]": the root PID there, and the receiver's own seconds when it gives them.
    private func awaitRestore() throws -> (Int32, (received: Double, restored: Double)?) {
        connection.setTimeout(seconds: options.restoreTimeout)
        let answer = try Migration.receive(connection, .result)
        guard answer.count >= 32 else { throw StasisError(.io, "\(connection.peer) sent a short answer") }
        let text = Array(answer.dropLast(32))
        guard Migration.same(Migration.mac(session, Array("result".utf8), text), Array(answer.suffix(32))) else {
            throw StasisError(.permission, "\(connection.peer)'s answer does not carry the session's HMAC; the job stays here")
        }
        let words = String(decoding: text, as: UTF8.self)
        let fields = words.split(separator: " ")
        guard fields.first == "running", fields.count == 2 || fields.count == 4, let remote = Int32(fields[1]) else {
            throw StasisError(.migrationFailed, "the receiver \(connection.peer) could not restore the job: \(words)")
        }
        // Figures only for the report: any that are not a number of seconds (nan, inf, negative) are left out.
        guard fields.count == 4, let received = Double(fields[2]), let restored = Double(fields[3]),
              received.isFinite, restored.isFinite, received >= 0, restored >= 0 else { return (remote, nil) }
        return (remote, (received, restored))
    }

    /// The job runs there: commit, and only once the receiver acknowledges let CRIU end the tree here. A
    /// signal from here on waits until that is settled: stopping half-way would leave the job running on both
    /// hosts (CRIU thaws the tree here when stasis dies).
    private func commit(remote: Int32) throws {
        FaultInjection.pause("commit") { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }
        FaultInjection.stall("commit") { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }
        if let signal = Interruption.deferSignals() { throw MigrateOperation.interrupted(signal, pid: options.pid) }
        connection.setTimeout(seconds: 30)
        do {
            try Migration.send(connection, .commit, Migration.mac(session, Array("commit".utf8)))
            let acknowledged = try Migration.receive(connection, .committed, max: 32)
            guard Migration.same(acknowledged, Migration.mac(session, Array("committed".utf8))) else {
                throw StasisError(.permission, "the acknowledgement does not carry the session's HMAC")
            }
        } catch {
            throw StasisError(.migrationFailed, "the job was restored on \(connection.peer) as PID \(remote), but its commit was not acknowledged (\(error)); the job runs on here, and the receiver stops its copy unless the commit reached it: check PID \(remote) there")
        }
    }
}
