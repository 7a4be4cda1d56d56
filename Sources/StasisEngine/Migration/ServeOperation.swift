import Crypto
import Foundation
import StasisCRIU
import StasisCore
import StasisGPU
import StasisImage
import StasisOS
import StasisStore

/// `stasis serve`: receives migrations, one at a time, and restores each as soon as its last byte is in.
/// Peers that have not yet proved the token are served concurrently (see `run`).
public struct ServeOperation: Sendable {
    public struct Options: Sendable {
        public var listen: String
        public var tokenFile: String
        public var store: String?
        /// Where received checkpoints are kept (one directory each).
        public var root = "/var/lib/stasis/received"
        /// Stop after one migration (whatever its outcome).
        public var once = false
        public var log: @Sendable (String) -> Void = { FileHandle.standardOutput.write(Data(($0 + "\n").utf8)) }
        /// Bytes received during each migration, for a terminal (nil: none shown).
        public var progress: ProgressHandler?
        /// TLS 1.3 with these certificates: a peer that does not speak it, or whose certificate is not
        /// accepted, is refused before it can send anything. nil: connections in clear, which needs
        /// `insecure` unless `listen` is a loopback address.
        public var tls: TLSConfiguration?
        /// Jobs' memory may cross a network in clear (--insecure).
        public var insecure = false
        public init(listen: String, tokenFile: String) { (self.listen, self.tokenFile) = (listen, tokenFile) }
    }

    let options: Options
    let device: @Sendable () -> DeviceStep
    public init(_ options: Options, device: @escaping @Sendable () -> DeviceStep = { NoDeviceStep() }) { (self.options, self.device) = (options, device) }

    /// How many peers may be proving the token at once; a new one past that pushes out the one that has
    /// waited longest, so a flood of idle connections cannot keep an honest source out (it proves the token in
    /// milliseconds).
    static let maxUnauthenticated = 32
    /// How long a peer has to prove the token.
    static let authenticationSeconds = 5

    /// Serves until killed (or after one migration with `once`); returns how many migrations failed.
    ///
    /// Anyone who reaches the port can connect, so peers that have not proved the token are served on threads
    /// of their own, at most `maxUnauthenticated` at a time (`Doorway`), each with `authenticationSeconds`.
    /// Authenticated migrations then run one at a time (each restores a job). A connection counts as a
    /// migration, for `once` and for the failures returned, once its peer has answered the challenge, right
    /// or wrong.
    public func run() throws -> Int {
        let token = try Migration.readToken(options.tokenFile)
        if try options.tls == nil && !options.insecure && !TCPConnection.isLoopback(options.listen) {
            throw StasisError(.invalidArgument, "without --tls, jobs' memory would cross the network to \(options.listen) in clear",
                              hint: "give --tls DIR --tls-peer FINGERPRINT (docs/MIGRATION.md), or --insecure on a network you trust")
        }
        let tls = try options.tls.map { try TLSContext($0, server: true) }
        // A signal ends the receiver at once while no migration is under way; during one, it abandons the
        // migration before the restore, or waits until the outcome is settled (see `receive`).
        Interruption.install()
        let listener = try TCPListener(options.listen)
        // Received checkpoints hold jobs' memory: the root must be this user's alone.
        try FileSystem.makeSecretDirectory(options.root, mustBeEmpty: false)
        options.log("listening on \(options.listen)" + (options.tls.map { tls in
            let accepted = (tls.pinned.isEmpty ? [] : ["\(tls.pinned.count) pinned certificate(s)"])
                + (tls.caFile.map { ["certificates signed by the CA in \($0)"] } ?? [])
            return " (TLS 1.3; accepting \(accepted.joined(separator: " and ")))"
        } ?? " (no TLS: checkpoints cross the network in clear; see --tls)"))
        let doorway = Doorway(limit: Self.maxUnauthenticated)
        let failures = Locked(0)
        let oneMigration = NSLock()
        let finished = DispatchSemaphore(value: 0)
        let serve = self
        Thread.detachNewThread {
            while true {
                guard let connection = try? listener.accept() else { Thread.sleep(forTimeInterval: 1); continue }
                let ticket = doorway.enter(connection)
                Thread.detachNewThread {
                    var answered = false
                    connection.setTimeout(seconds: Self.authenticationSeconds)
                    if let tls {
                        // Nothing the peer sends is read before its certificate is accepted.
                        do {
                            try connection.secure(with: tls)
                        } catch {
                            serve.options.log("\(connection.peer): refused: \(error)")
                            doorway.leave(ticket)
                            return
                        }
                    }
                    do {
                        let session = try serve.authenticate(connection, token: token) {
                            answered = true
                            doorway.leave(ticket)
                        }
                        let pid = try oneMigration.withLock { try serve.settled { try serve.receive(connection, session: session) } }
                        serve.options.log("\(connection.peer): restored, root PID \(pid)")
                        Self.reapWhenItEnds(pid)
                        serve.stopIfSignalled()
                        finished.signal()
                    } catch {
                        // A peer that never answered the challenge is no migration: it neither fails nor ends `once`.
                        if answered {
                            serve.options.log("\(connection.peer): \(error)")
                            serve.stopIfSignalled()
                            failures.withLock { $0 += 1 }
                            finished.signal()
                        } else {
                            doorway.leave(ticket)
                        }
                    }
                }
            }
        }
        while true {
            finished.wait()
            if options.once { return failures.current }
        }
    }

    /// The connections whose peers have not proved the token yet. Past `limit`, the one that entered first is
    /// shut down (its thread then fails its read and leaves).
    final class Doorway: Sendable {
        private let limit: Int
        private let waiting = Locked<(next: Int, entries: [(ticket: Int, connection: TCPConnection)])>((0, []))
        init(limit: Int) { self.limit = limit }

        func enter(_ connection: TCPConnection) -> Int {
            waiting.withLock { state in
                state.next += 1
                state.entries.append((state.next, connection))
                if state.entries.count > limit {
                    state.entries.removeFirst().connection.shutdown()
                }
                return state.next
            }
        }

        func leave(_ ticket: Int) { waiting.withLock { $0.entries.removeAll { $0.ticket == ticket } } }
    }

    /// The challenge: the peer proves the token, then this end does. `answered` runs once the peer's proof is
    /// in (right or wrong): from then on the connection is no longer an unauthenticated one. Returns the
    /// session key.
    func authenticate(_ connection: TCPConnection, token: SymmetricKey, answered: () -> Void) throws -> SymmetricKey {
        let mine = Migration.nonce()
        try Migration.send(connection, .hello, Migration.magic + mine)
        // Before the peer has proved anything: small messages only, and the connection's time limit.
        let auth = try Migration.receive(connection, .auth, max: 64)
        answered()
        guard auth.count == 64, Migration.same(Array(auth.suffix(32)), Migration.mac(token, Array("client".utf8), mine, Array(auth.prefix(32)))) else {
            try? Migration.send(connection, .refused, Array("authentication failed: the token does not match".utf8))
            throw StasisError(.permission, "refused: the peer does not know the token")
        }
        let theirs = Array(auth.prefix(32))
        try Migration.send(connection, .proof, Migration.mac(token, Array("server".utf8), theirs, mine))
        return Migration.sessionKey(token, receiver: mine, source: theirs)
    }

    /// Runs one migration with signals guarded, and back to ending at once after it.
    func settled<T>(_ body: () throws -> T) rethrows -> T {
        defer { if Interruption.caught == nil { Interruption.idle() } }
        return try body()
    }

    /// Ends the receiver once a migration is settled, when a signal came during it.
    func stopIfSignalled() {
        guard let signal = Interruption.caught else { return }
        options.log("\(Interruption.name(signal)) came during the migration; it is settled: stopping")
        exit(128 + signal)
    }

    /// A restored tree's root can end up this process's child (CRIU's restore runs while stasis adopts
    /// orphans, to reap a failed restore's tasks): a long-running receiver reaps it when it exits, so that
    /// no zombie keeps its PID. Nothing happens for a process that is not its child.
    static func reapWhenItEnds(_ pid: Int32) {
        Thread.detachNewThread { Spawn.wait(pid) }
    }

    /// One authenticated migration: the chunks sent during the source's dump, its offer, the rest of the
    /// checkpoint, the restore and the commit. Returns the restored root PID.
    func receive(_ connection: TCPConnection, session: SymmetricKey) throws -> Int32 {
        // Until the restore a signal abandons the migration: the connection is shut down, the source's dump
        // fails and its job runs on there.
        Interruption.abortable(connection)
        connection.setTimeout(seconds: 120)
        // The source now freezes and checkpoints: its offer may take as long as its dump. Meanwhile it asks
        // which of its new chunks this store lacks, and sends those. The store's lock, shared, from the first
        // of them until the checkpoint is listed: gc must not take a chunk this migration said it has.
        let store = try ChunkStore(path: ChunkStore.resolve(options.store, recorded: nil), create: true)
        let storeLock = try store.lock(exclusive: false)
        defer { storeLock.release() }
        let early = ChunkReceiver(store: store)
        var offer: [UInt8] = []
        do {
            connection.setTimeout(seconds: 3600)
            while offer.isEmpty {
                let (kind, payload) = try Migration.receiveAny(connection)
                switch kind {
                case .query:
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
                case .offer:
                    offer = payload
                default:
                    throw StasisError(.io, "\(connection.peer) sent \(kind) during its dump")
                }
            }
        } catch {
            _ = try? early.finish()
            throw error
        }
        _ = try early.finish()
        connection.setTimeout(seconds: 120)
        guard offer.count > 32, Migration.same(Migration.mac(session, Array(offer.dropLast(32))), Array(offer.suffix(32))) else {
            throw StasisError(.permission, "the offered manifest does not carry the session's HMAC; refused")
        }
        let manifest = try Manifest.decode(Data(offer.dropLast(32)), path: "the manifest from \(connection.peer)")
        let lacking = Set(manifest.files.flatMap { $0.chunks ?? [] }.filter { !$0.isEmpty && !store.has($0) })
        try Migration.send(connection, .need, Array(lacking.sorted().joined(separator: "\n").utf8))

        var text: String
        var restored: Int32 = 0
        do {
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
            // From the restore on, the job may end up running here: a signal waits until that is settled.
            if let signal = Interruption.deferSignals() {
                throw StasisError(.interrupted, "\(Interruption.name(signal)) came before the restore: the migration was abandoned and the job runs on at the source")
            }
            let report = try RestoreOperation(restore, device: device()).run()
            restored = report.rootPID
            text = "running \(report.rootPID)"
            options.log("\(connection.peer): the rest of the checkpoint in \(Format.seconds(importSeconds)), restored in \(Format.seconds(report.timings.total)) (CRIU \(Format.seconds(report.timings.criu)), devices \(Format.seconds(report.timings.devices)))")
        } catch {
            text = "failed: \(error)"
        }
        let words = Array(text.utf8)
        guard restored > 0 else {
            try? Migration.send(connection, .result, words + Migration.mac(session, Array("result".utf8), words))
            throw StasisError(.migrationFailed, text)
        }
        // Running here; it stays only if the source commits (and so ends its own).
        do {
            try Migration.send(connection, .result, words + Migration.mac(session, Array("result".utf8), words))
            connection.setTimeout(seconds: 30)
            let commit = try Migration.receive(connection, .commit, max: 32)
            guard Migration.same(commit, Migration.mac(session, Array("commit".utf8))) else {
                throw StasisError(.permission, "the commit does not carry the session's HMAC")
            }
        } catch {
            RestoreOperation.stopRestoredTree(root: restored)
            Self.reapWhenItEnds(restored)
            throw StasisError(.migrationFailed, "restored as PID \(restored), but the source did not commit (\(error)); the copy here was stopped and the job runs on there")
        }
        FaultInjection.pause("committed", say: options.log)
        try? Migration.send(connection, .committed, Migration.mac(session, Array("committed".utf8)))
        return restored
    }
}
