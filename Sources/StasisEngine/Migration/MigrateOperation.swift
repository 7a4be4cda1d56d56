import Crypto
import Foundation
import StasisCRIU
import StasisCore
import StasisGPU
import StasisImage
import StasisOS
import StasisStore

/// `stasis migrate`: checkpoints the tree rooted at `pid` into the local store, sends what the receiver lacks,
/// and ends the tree once the receiver runs it.
public struct MigrateOperation {
    public struct Options: Sendable {
        public var pid: Int32
        public var to: String
        public var tokenFile: String
        public var store: String?
        public var codec = Codec.standard
        public var process = CRIUService.ProcessOptions()
        /// Where the local checkpoint is made; removed after a migration that worked.
        public var spool: String?
        /// Seconds to wait for the receiver's answer after the last byte (its restore).
        public var restoreTimeout = 600
        /// Bytes sent, for a terminal (nil: none shown).
        public var progress: ProgressHandler?
        /// TLS 1.3 with these certificates; the receiver's certificate must be one they accept. nil: in clear,
        /// which needs `insecure` unless the receiver is on a loopback address.
        public var tls: TLSConfiguration?
        /// The job's memory may cross a network in clear (--insecure).
        public var insecure = false
        /// How long a GPU job's tree may take to hold still before the dump touches it (--lock-timeout).
        public var settleSeconds: Double = 10
        public init(pid: Int32, to: String, tokenFile: String) { (self.pid, self.to, self.tokenFile) = (pid, to, tokenFile) }
    }

    public struct Report: Codable, Sendable {
        public var pid: Int32
        public var receiver: String
        /// The root PID the receiver restored (as the receiver sees it).
        public var remotePID: Int32
        /// From just before the freeze to the receiver's answer that the job runs there.
        public var downtimeSeconds: Double
        public var dumpSeconds: Double
        public var transferSeconds: Double
        public var restoreSeconds: Double
        /// Bytes on the wire (the bundle), and stored chunk bytes not sent because the receiver had them.
        public var bytesSent: UInt64
        /// Of `bytesSent`, what went while the dump was still writing the checkpoint.
        public var bytesSentDuringDump: UInt64
        public var bytesSkipped: UInt64
        public var chunksSent: Int
        public var chunksSkipped: Int
        public var gpuProcesses: Int
        /// "TLSv1.3 TLS_AES_256_GCM_SHA384, receiver sha256:...", or "none".
        public var encryption: String
        /// A signal (SIGINT, SIGTERM, SIGHUP) that came after the commit was sent: it waited until the
        /// migration was settled, and the job runs there.
        public var deferredSignal: String?
    }

    let options: Options
    let device: DeviceStep
    public init(_ options: Options, device: DeviceStep = NoDeviceStep()) { (self.options, self.device) = (options, device) }

    public func run() throws -> Report {
        let token = try Migration.readToken(options.tokenFile)
        if try options.tls == nil && !options.insecure && !TCPConnection.isLoopback(options.to) {
            throw StasisError(.invalidArgument, "without --tls the job's memory would cross the network to \(options.to) in clear; nothing was touched",
                              hint: "give --tls DIR --tls-peer FINGERPRINT (docs/MIGRATION.md), or --insecure on a network you trust")
        }
        // Reach and authenticate the receiver before anything is touched. From here a signal abandons the
        // migration (the connection is shut down: the dump fails and the job runs on here), until the commit.
        Interruption.install()
        let tls = try options.tls.map { try TLSContext($0, server: false) }
        let connection = try TCPConnection.connect(to: options.to)
        Interruption.abortable(connection)
        connection.setTimeout(seconds: 30)
        if let tls { try connection.secure(with: tls, host: try TCPConnection.split(options.to).host) }
        let session: SymmetricKey
        do {
            session = try Self.handshake(connection, token: token)
        } catch let error as StasisError where tls == nil {
            // A receiver that speaks TLS answers a plain hello with an alert and closes.
            throw StasisError(error.code, error.message, hint: error.hint ?? "if the receiver runs `stasis serve --tls`, give --tls and --tls-peer here too")
        }
        let encryption = connection.security.map { "\($0), receiver \(connection.peerFingerprint ?? "?")" } ?? "none"
        let spool = options.spool ?? "/var/lib/stasis/migrate/\(Self.stamp())-\(options.pid)"
        if let signal = Interruption.caught { throw Self.interrupted(signal, pid: options.pid) }
        try FileSystem.makePrivateDirectory(URL(fileURLWithPath: spool).deletingLastPathComponent().path)

        let outcome = Locked<(remotePID: Int32, sent: UInt64, early: UInt64, skipped: UInt64, chunksSent: Int, chunksSkipped: Int,
                               dumpDone: Double, transferDone: Double)?>(nil)
        // New chunks go to the receiver while the dump still writes the rest.
        let preloader = ChunkPreloader(connection)
        defer { _ = try? preloader.finish() }
        let downtime = Stopwatch()
        let restoreTimeout = options.restoreTimeout
        let pid = options.pid
        let progress = options.progress
        var dump = DumpOperation.Options(pid: options.pid, directory: spool)
        dump.process = options.process
        dump.store = options.store
        dump.codec = options.codec
        dump.settleSeconds = options.settleSeconds
        dump.chunkObserver = { digest, file in preloader.offer(digest, file) }
        dump.whilePublished = { manifest, directory in
            let early = try preloader.finish()
            let dumpDone = downtime.seconds
            let manifestData = try FileSystem.readFile(directory + "/" + Manifest.fileName)
            // The receiver first commits the chunks sent during the dump (two syncfs over them): give it time.
            connection.setTimeout(seconds: 600)
            try Migration.send(connection, .offer, Array(manifestData) + Migration.mac(session, Array(manifestData)))
            let lacking = Set(String(decoding: try Migration.receive(connection, .need), as: UTF8.self).split(separator: "\n").map(String.init))
            let store = try Checkpoint.store(for: manifest, explicit: nil)
            let all = Set(manifest.files.flatMap { $0.chunks ?? [] }.filter { !$0.isEmpty })
            let skipping = all.subtracting(lacking)
            let notSent = skipping.subtracting(early.digests)
            let skippedBytes = notSent.reduce(UInt64(0)) { total, digest in total + (store.map { FileSystem.size($0.chunkPath(digest)) ?? 0 } ?? 0) }
            connection.setTimeout(seconds: 120)
            let meter = Locked<UInt64>(0)
            let ticker = ProgressTicker.reporting(progress, phase: "sending to \(connection.peer)") { meter.current }
            let sent: CheckpointBundle.ExportReport
            do {
                defer { ticker?.stop() }
                sent = try CheckpointBundle.stream(directory: directory, manifestData: manifestData, manifest: manifest, store: store,
                                                   to: connection, skipping: skipping, meter: meter)
            }
            let transferDone = downtime.seconds
            connection.setTimeout(seconds: restoreTimeout)
            let answer = try Migration.receive(connection, .result)
            guard answer.count >= 32 else { throw StasisError(.io, "\(connection.peer) sent a short answer") }
            let text = Array(answer.dropLast(32))
            guard Migration.same(Migration.mac(session, Array("result".utf8), text), Array(answer.suffix(32))) else {
                throw StasisError(.permission, "\(connection.peer)'s answer does not carry the session's HMAC; the job stays here")
            }
            let words = String(decoding: text, as: UTF8.self)
            guard words.hasPrefix("running "), let remote = Int32(words.dropFirst("running ".count)) else {
                throw StasisError(.migrationFailed, "the receiver \(connection.peer) could not restore the job: \(words)")
            }
            // The job runs there: commit, and only once the receiver acknowledges let CRIU end the tree here.
            // A signal from here on waits until that is settled: stopping half-way would leave the job
            // running on both hosts (CRIU thaws the tree here when stasis dies).
            FaultInjection.pause("commit") { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }
            FaultInjection.stall("commit") { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }
            if let signal = Interruption.deferSignals() { throw Self.interrupted(signal, pid: pid) }
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
            outcome.withLock { $0 = (remote, sent.bundleBytes + early.bytes, early.bytes, skippedBytes, sent.chunks + early.digests.count, notSent.count, dumpDone, transferDone) }
        }
        var gpuProcesses = 0
        do {
            gpuProcesses = try DumpOperation(dump, device: device).run().gpu.processes.count
        } catch {
            // Committed: the job runs there, whatever failed here after (CRIU's last steps, the report).
            // It must not run here too.
            guard outcome.current != nil else {
                let kept = discardFailed(spool: spool)
                if let signal = Interruption.caught { throw Self.interrupted(signal, pid: options.pid, kept: kept) }
                let failure = StasisError.wrapping(error, as: .io).prefixed("migration of PID \(options.pid) to \(options.to) failed")
                throw kept.map { failure.appending("; the checkpoint made for it stays in \($0)") } ?? failure
            }
            for process in ProcFS.tree(root: options.pid).reversed() { Signals.kill(process.pid) }
        }
        let total = downtime.seconds
        guard let done = outcome.current else {
            throw StasisError(.io, "migration of PID \(options.pid): CRIU ended without its post-dump step; the checkpoint is in \(spool)")
        }
        // Sent and running there: the local copy is not needed (its chunks stay in the store for the next time).
        if let store = try? ChunkStore(path: ChunkStore.resolve(options.store, recorded: nil), create: false),
           let manifest = try? Checkpoint.readManifest(spool) {
            StoreCatalog(store: store).unregister(id: manifest.id)
        }
        FileSystem.removeTree(spool)
        return Report(pid: options.pid, receiver: options.to, remotePID: done.remotePID, downtimeSeconds: total, dumpSeconds: done.dumpDone,
                      transferSeconds: done.transferDone - done.dumpDone, restoreSeconds: total - done.transferDone,
                      bytesSent: done.sent, bytesSentDuringDump: done.early, bytesSkipped: done.skipped, chunksSent: done.chunksSent, chunksSkipped: done.chunksSkipped,
                      gpuProcesses: gpuProcesses, encryption: encryption, deferredSignal: Interruption.caught.map(Interruption.name))
    }

    /// A migration that failed before its commit leaves no checkpoint behind in the default spool: its catalog
    /// entry goes (gc may then take the chunks nothing else uses) and so does the directory. One the user placed
    /// with --spool stays; returns its path then.
    func discardFailed(spool: String) -> String? {
        guard let manifest = try? Checkpoint.readManifest(spool) else { return nil }  // nothing was published
        guard options.spool == nil else { return spool }
        if let store = try? ChunkStore(path: ChunkStore.resolve(options.store, recorded: nil), create: false) {
            StoreCatalog(store: store).unregister(id: manifest.id)
        }
        FileSystem.removeTree(spool)
        return nil
    }

    static func interrupted(_ signal: Int32, pid: Int32, kept: String? = nil) -> StasisError {
        StasisError(.interrupted, "\(Interruption.name(signal)) came before the commit: the migration of PID \(pid) was abandoned and the job runs on here"
                    + (kept.map { "; the checkpoint made for it stays in \($0)" } ?? ""))
    }

    /// Proves the token to the receiver and checks the receiver's proof; returns the session key.
    static func handshake(_ connection: TCPConnection, token: SymmetricKey) throws -> SymmetricKey {
        let hello = try Migration.receive(connection, .hello)
        guard hello.count == Migration.magic.count + 32, Array(hello.prefix(Migration.magic.count)) == Migration.magic else {
            throw StasisError(.io, "\(connection.peer) is not a stasis receiver")
        }
        let theirs = Array(hello.suffix(32)), mine = Migration.nonce()
        try Migration.send(connection, .auth, mine + Migration.mac(token, Array("client".utf8), theirs, mine))
        let proof = try Migration.receive(connection, .proof)
        guard Migration.same(proof, Migration.mac(token, Array("server".utf8), mine, theirs)) else {
            throw StasisError(.permission, "\(connection.peer) does not know the token; nothing was sent and the job was not touched")
        }
        return Migration.sessionKey(token, receiver: theirs, source: mine)
    }

    static func stamp() -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        formatter.timeZone = TimeZone(identifier: "UTC")
        return formatter.string(from: Date())
    }
}
