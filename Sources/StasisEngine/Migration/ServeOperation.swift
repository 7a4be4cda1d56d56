import Crypto
import Foundation
import StasisCRIU
import StasisCore
import StasisGPU
import StasisImage
import StasisOS
import StasisStore

/// `stasis serve`: receives migrations, one at a time, and restores each as soon as its last byte is in.
/// Peers that have not yet proved the token are served concurrently (see `run`); each authenticated migration
/// is a `ReceiveRun`, its steps in the order of the conversation and one rollback.
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
        /// The store and container runtime, as the command line chose them (`Backends`).
        public var backends = Backends()
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
        try refuseClearText()
        let tls = try options.tls.map { try TLSContext($0, server: true) }
        // A signal ends the receiver at once while no migration is under way; during one, it abandons the
        // migration before the restore, or waits until the outcome is settled (see `ReceiveRun`).
        Interruption.install()
        let listener = try TCPListener(options.listen)
        // Received checkpoints hold jobs' memory: the root must be this user's alone.
        try FileSystem.makeSecretDirectory(options.root, mustBeEmpty: false)
        options.log("listening on \(options.listen)" + describeSecurity())
        let served = Served()
        let serve = self
        Thread.detachNewThread { serve.accept(from: listener, tls: tls, token: token, served: served) }
        while true {
            served.finished.wait()
            if options.once { return served.failures.current }
        }
    }

    /// What the connections' threads share: the peers still proving the token, the migrations that failed,
    /// the one migration at a time, and a signal for each migration settled.
    final class Served: Sendable {
        let doorway = Doorway(limit: ServeOperation.maxUnauthenticated)
        let failures = Locked(0)
        let oneMigration = CriticalSection()
        let finished = DispatchSemaphore(value: 0)
    }

    /// Jobs' memory crosses a network in clear only with --insecure (or on a loopback address).
    func refuseClearText() throws {
        if try options.tls == nil && !options.insecure && !TCPConnection.isLoopback(options.listen) {
            throw StasisError(.invalidArgument, "without --tls, jobs' memory would cross the network to \(options.listen) in clear",
                              hint: "give --tls DIR --tls-peer FINGERPRINT (docs/MIGRATION.md), or --insecure on a network you trust")
        }
    }

    /// " (TLS 1.3; accepting ...)", or that there is no TLS.
    private func describeSecurity() -> String {
        options.tls.map { tls in
            let accepted = (tls.pinned.isEmpty ? [] : ["\(tls.pinned.count) pinned certificate(s)"])
                + (tls.caFile.map { ["certificates signed by the CA in \($0)"] } ?? [])
            return " (TLS 1.3; accepting \(accepted.joined(separator: " and ")))"
        } ?? " (no TLS: checkpoints cross the network in clear; see --tls)"
    }

    /// Takes each connection and serves it on a thread of its own, forever.
    private func accept(from listener: TCPListener, tls: TLSContext?, token: SymmetricKey, served: Served) {
        while true {
            // A failed accept (a peer gone before it was taken, descriptors short for a moment) is no reason to
            // stop receiving: try again in a second.
            guard let connection = try? listener.accept() else { Thread.sleep(forTimeInterval: 1); continue }
            let ticket = served.doorway.enter(connection)
            let serve = self
            Thread.detachNewThread { serve.serve(connection, ticket: ticket, tls: tls, token: token, served: served) }
        }
    }

    /// One connection: TLS, the challenge (as an unauthenticated peer, in the doorway), then the migration,
    /// one at a time.
    private func serve(_ connection: TCPConnection, ticket: Int, tls: TLSContext?, token: SymmetricKey, served: Served) {
        var answered = false
        connection.setTimeout(seconds: Self.authenticationSeconds)
        if let tls {
            // Nothing the peer sends is read before its certificate is accepted.
            do {
                try connection.secure(with: tls)
            } catch {
                options.log("\(connection.peer): refused: \(error)")
                served.doorway.leave(ticket)
                return
            }
        }
        do {
            let session = try authenticate(connection, token: token) {
                answered = true
                served.doorway.leave(ticket)
            }
            let pid = try served.oneMigration.run { try settled { try receive(connection, session: session) } }
            options.log("\(connection.peer): restored, root PID \(pid)")
            Self.reapWhenItEnds(pid)
            stopIfSignalled()
            served.finished.signal()
        } catch {
            // A peer that never answered the challenge is no migration: it neither fails nor ends `once`.
            if answered {
                options.log("\(connection.peer): \(error)")
                stopIfSignalled()
                served.failures.withLock { $0 += 1 }
                served.finished.signal()
            } else {
                served.doorway.leave(ticket)
            }
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
            // Refused either way: a peer that cannot be told why sees its connection end.
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
    /// checkpoint, the restore and the commit (`ReceiveRun`). Returns the restored root PID.
    func receive(_ connection: TCPConnection, session: SymmetricKey) throws -> Int32 {
        try ReceiveRun(self, connection: connection, session: session).run()
    }
}
