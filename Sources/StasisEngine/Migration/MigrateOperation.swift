import Crypto
import Foundation
import StasisCRIU
import StasisCore
import StasisGPU
import StasisImage
import StasisOS
import StasisStore

/// `stasis migrate`: checkpoints the tree rooted at `pid` into the local store, sends what the receiver lacks,
/// and ends the tree once the receiver runs it. `run` is the list of steps: reach and authenticate the receiver
/// (nothing touched yet), then `MigrateRun` (the dump, its hand-over inside the freeze by `MigrationHandOver`,
/// and the one rollback of what a failed migration made here).
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
        /// The store and container runtime, as the command line chose them (`Backends`).
        public var backends = Backends()
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
        /// From the last byte sent to the receiver's answer.
        public var restoreSeconds: Double
        /// The receiver's own figures for its part of `restoreSeconds` (nil from a receiver that does not say):
        /// receiving the rest of the checkpoint, and restoring it; its log prints the same two.
        public var receiverReceiveSeconds: Double?
        public var receiverRestoreSeconds: Double?
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
        try refuseClearText()
        // Reach and authenticate the receiver before anything is touched. From here a signal abandons the
        // migration (the connection is shut down: the dump fails and the job runs on here), until the commit.
        Interruption.install()
        let receiver = try connect(token: token)
        if let signal = Interruption.caught { throw Self.interrupted(signal, pid: options.pid) }
        let migration = try MigrateRun(self, receiver: receiver)
        try migration.dumpAndHandOver()
        return try migration.finish()
    }

    /// The receiver, reached and authenticated: the connection, the session key, and how it is encrypted.
    struct Receiver {
        let connection: TCPConnection
        let session: SymmetricKey
        /// "TLSv1.3 ..., receiver sha256:...", or "none".
        let encryption: String
    }

    /// The job's memory crosses a network in clear only with --insecure (or to a loopback address).
    func refuseClearText() throws {
        if try options.tls == nil && !options.insecure && !TCPConnection.isLoopback(options.to) {
            throw StasisError(.invalidArgument, "without --tls the job's memory would cross the network to \(options.to) in clear; nothing was touched",
                              hint: "give --tls DIR --tls-peer FINGERPRINT (docs/MIGRATION.md), or --insecure on a network you trust")
        }
    }

    /// Connects (TLS when asked) and proves the token both ways; the connection is abortable by a signal.
    func connect(token: SymmetricKey) throws -> Receiver {
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
        return Receiver(connection: connection, session: session, encryption: encryption)
    }

    /// The local store, to unlist a spooled checkpoint.
    func openStore() throws -> ChunkStore {
        try options.backends.openStore(options.store, create: false)
    }

    static func interrupted(_ signal: Int32, pid: Int32, leftBehind: [String] = []) -> StasisError {
        StasisError(.interrupted, "\(Interruption.name(signal)) came before the commit: the migration of PID \(pid) was abandoned and the job runs on here"
                    + leftBehind.map { "; " + $0 }.joined())
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
