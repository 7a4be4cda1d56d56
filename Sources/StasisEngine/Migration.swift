import Crypto
import Foundation
import Glibc
import StasisCRIU
import StasisCore
import StasisGPU
import StasisImage
import StasisOS
import StasisStore

/// Live migration: `stasis migrate PID --to ADDR:PORT` on the source, `stasis serve` on the receiver.
///
/// The conversation, over one TCP connection (messages are a kind byte, a UInt32 length, the payload):
///
///     receiver  H  "STASISMIGRATE1" + its nonce (32 bytes)
///     source    A  its nonce + HMAC-SHA256(token, "client" | receiver's nonce | source's nonce)
///     receiver  P  HMAC-SHA256(token, "server" | source's nonce | receiver's nonce)  (or X: refused)
///        ... the source freezes and checkpoints the job into its own store; while it does, for each few
///            new chunks its dump writes:
///     source    Q  their digests, one per line
///     receiver  N  those it lacks
///     source    K  each of those: its digest + its chunk file (as the store keeps it), one message each
///        ... once the checkpoint is complete:
///     source    O  the manifest's JSON + HMAC-SHA256(session key, that JSON)
///     receiver  N  the chunk digests it lacks, one per line
///     source    the checkpoint as a bundle (Bundle.swift) holding only those chunks
///     receiver  R  "running PID" or "failed: why", + HMAC-SHA256(session key, "result" | text)
///     source    C  HMAC-SHA256(session key, "commit"): the source's tree ends now
///     receiver  D  HMAC-SHA256(session key, "committed")
///
/// Chunks sent during the dump are checked against their digests and kept in the receiver's store; they
/// count only when the authenticated manifest lists them. Both ends prove they know the token; the session key is HMAC(token, "session" | both nonces). Everything
/// restored is authenticated: the manifest by its HMAC, each whole file by its SHA-256 in the manifest, and
/// each chunk by its digest, which the manifest lists, so an unauthenticated peer cannot get anything restored.
/// The source's tree stays frozen until the receiver's authenticated answer says the job runs there; then
/// CRIU ends it. Any failure before that (a dropped connection, a wrong token, a failed restore) fails the
/// dump, and the source's tree runs on as it was. The job must not run on both hosts either: the receiver
/// keeps its copy only once the source has committed (C). A receiver that gets no commit (the source gave
/// up waiting, or the connection broke) kills its copy. A source that sent its commit but got no
/// acknowledgement cannot know whether it arrived: it resumes its job rather than risk losing it, and says
/// that the receiver may run it too.
public enum Migration {
    static let magic = Array("STASISMIGRATE1".utf8)
    static let maxMessage = 64 << 20

    enum Kind: UInt8 {
        // H A P O N R X Q K
        case hello = 0x48, auth = 0x41, proof = 0x50, offer = 0x4F, need = 0x4E, result = 0x52, refused = 0x58, query = 0x51, chunk = 0x4B,
             commit = 0x43, committed = 0x44  // C D
    }

    /// The shared secret, from a file of this user's that no one else can read (not a symbolic link; at least
    /// 16 bytes; surrounding whitespace dropped).
    public static func readToken(_ path: String) throws -> SymmetricKey {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { throw systemError("cannot read the token file", path) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw systemError("cannot read the token file", path) }
        guard info.st_uid == geteuid(), info.st_mode & 0o077 == 0 else {
            throw StasisError(.permission, "the token file \(path) must belong to this user and be readable by no one else (mode \(String(info.st_mode & 0o777, radix: 8)), owner \(info.st_uid))",
                              hint: "chown $(id -u) \(path); chmod 600 \(path)")
        }
        let text = try FileHandle(fileDescriptor: fd, closeOnDealloc: false).readToEnd() ?? Data()
        let token = String(decoding: text, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard token.utf8.count >= 16 else {
            throw StasisError(.invalidArgument, "the token in \(path) is \(token.utf8.count) bytes; at least 16 are needed",
                              hint: "make one with: head -c 32 /dev/urandom | base64 > \(path)")
        }
        return SymmetricKey(data: Array(token.utf8))
    }

    static func mac(_ key: SymmetricKey, _ parts: [UInt8]...) -> [UInt8] {
        var hmac = HMAC<SHA256>(key: key)
        for part in parts { hmac.update(data: part) }
        return Array(hmac.finalize())
    }

    static func sessionKey(_ token: SymmetricKey, receiver: [UInt8], source: [UInt8]) -> SymmetricKey {
        SymmetricKey(data: mac(token, Array("session".utf8), receiver, source))
    }

    static func nonce() -> [UInt8] { (0..<32).map { _ in UInt8.random(in: 0...255) } }

    static func send(_ connection: TCPConnection, _ kind: Kind, _ payload: [UInt8]) throws {
        try payload.withUnsafeBytes { try send(connection, kind, parts: [$0]) }
    }

    /// One message whose payload is `parts` one after the other, none of them copied.
    static func send(_ connection: TCPConnection, _ kind: Kind, parts: [UnsafeRawBufferPointer]) throws {
        let length = UInt32(parts.reduce(0) { $0 + $1.count })
        let head = [kind.rawValue, UInt8(length >> 24), UInt8((length >> 16) & 0xff), UInt8((length >> 8) & 0xff), UInt8(length & 0xff)]
        // MSG_MORE only while bytes follow: a corked header with nothing after it waits 200 ms for them.
        let nonEmpty = parts.filter { !$0.isEmpty }
        try head.withUnsafeBytes { try connection.send($0, more: !nonEmpty.isEmpty) }
        for (index, part) in nonEmpty.enumerated() { try connection.send(part, more: index < nonEmpty.count - 1) }
    }

    static func receive(_ connection: TCPConnection, _ expected: Kind, max: Int = maxMessage) throws -> [UInt8] {
        let (kind, payload) = try receiveAny(connection, max: max)
        guard kind == expected else {
            throw StasisError(.io, "\(connection.peer) sent \(kind) where \(expected) was due; not a stasis migration peer")
        }
        return payload
    }

    /// `max`: the longest payload accepted (small before the peer has authenticated).
    static func receiveAny(_ connection: TCPConnection, max: Int = maxMessage) throws -> (Kind, [UInt8]) {
        let head = try connection.receive(5)
        let length = Int(head[1]) << 24 | Int(head[2]) << 16 | Int(head[3]) << 8 | Int(head[4])
        guard length <= max else { throw StasisError(.io, "\(connection.peer) sent a message of \(length) bytes; not a stasis migration peer") }
        let payload = try connection.receive(length)
        if head[0] == Kind.refused.rawValue {
            throw StasisError(.permission, "\(connection.peer) refused: \(String(decoding: payload, as: UTF8.self))")
        }
        guard let kind = Kind(rawValue: head[0]) else {
            throw StasisError(.io, "\(connection.peer) sent message \(head[0]); not a stasis migration peer")
        }
        return (kind, payload)
    }

    /// Equal in constant time.
    static func same(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        a.count == b.count && zip(a, b).reduce(0) { $0 | ($1.0 ^ $1.1) } == 0
    }
}

// MARK: the source

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
    }

    let options: Options
    let device: DeviceStep
    public init(_ options: Options, device: DeviceStep = NoDeviceStep()) { (self.options, self.device) = (options, device) }

    public func run() throws -> Report {
        let token = try Migration.readToken(options.tokenFile)
        // Reach and authenticate the receiver before anything is touched.
        let connection = try TCPConnection.connect(to: options.to)
        connection.setTimeout(seconds: 30)
        let session = try Self.handshake(connection, token: token)
        let spool = options.spool ?? "/var/lib/stasis/migrate/\(Self.stamp())-\(options.pid)"
        try FileSystem.makePrivateDirectory(URL(fileURLWithPath: spool).deletingLastPathComponent().path)

        let outcome = Locked<(remotePID: Int32, sent: UInt64, early: UInt64, skipped: UInt64, chunksSent: Int, chunksSkipped: Int,
                               dumpDone: Double, transferDone: Double)?>(nil)
        // New chunks go to the receiver while the dump still writes the rest.
        let preloader = ChunkPreloader(connection)
        defer { _ = try? preloader.finish() }
        let downtime = Stopwatch()
        let restoreTimeout = options.restoreTimeout
        var dump = DumpOperation.Options(pid: options.pid, directory: spool)
        dump.process = options.process
        dump.store = options.store
        dump.codec = options.codec
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
            let sent = try CheckpointBundle.stream(directory: directory, manifestData: manifestData, manifest: manifest, store: store,
                                                   to: connection.fd, name: "the connection to \(connection.peer)", skipping: skipping)
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
            FaultInjection.stall("commit") { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }
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
                throw (error as? StasisError ?? StasisError(.io, "\(error)")).prefixed("migration of PID \(options.pid) to \(options.to) failed")
            }
            for process in ProcFS.tree(root: options.pid).reversed() { kill(process.pid, SIGKILL) }
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
                      gpuProcesses: gpuProcesses)
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

// MARK: the receiver

/// `stasis serve`: receives migrations, one at a time, and restores each as soon as its last byte is in.
public struct ServeOperation {
    public struct Options: Sendable {
        public var listen: String
        public var tokenFile: String
        public var store: String?
        /// Where received checkpoints are kept (one directory each).
        public var root = "/var/lib/stasis/received"
        /// Stop after one migration (whatever its outcome).
        public var once = false
        public var log: @Sendable (String) -> Void = { FileHandle.standardOutput.write(Data(($0 + "\n").utf8)) }
        public init(listen: String, tokenFile: String) { (self.listen, self.tokenFile) = (listen, tokenFile) }
    }

    let options: Options
    let device: @Sendable () -> DeviceStep
    public init(_ options: Options, device: @escaping @Sendable () -> DeviceStep = { NoDeviceStep() }) { (self.options, self.device) = (options, device) }

    /// Serves until killed (or after one migration with `once`); returns how many migrations failed.
    public func run() throws -> Int {
        let token = try Migration.readToken(options.tokenFile)
        let listener = try TCPListener(options.listen)
        try FileSystem.makePrivateDirectory(options.root)
        options.log("listening on \(options.listen)")
        var failures = 0
        while true {
            let connection = try listener.accept()
            // Until the peer has proved the token: a short time, small messages.
            connection.setTimeout(seconds: 10)
            do {
                let pid = try receive(connection, token: token)
                options.log("\(connection.peer): restored, root PID \(pid)")
                Self.reapWhenItEnds(pid)
            } catch {
                failures += 1
                options.log("\(connection.peer): \(error)")
            }
            if options.once { return failures }
        }
    }

    /// A restored tree's root can end up this process's child (CRIU's restore runs while stasis adopts
    /// orphans, to reap a failed restore's tasks): a long-running receiver reaps it when it exits, so that
    /// no zombie keeps its PID. Nothing happens for a process that is not its child.
    static func reapWhenItEnds(_ pid: Int32) {
        Thread.detachNewThread {
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        }
    }

    func receive(_ connection: TCPConnection, token: SymmetricKey) throws -> Int32 {
        let mine = Migration.nonce()
        try Migration.send(connection, .hello, Migration.magic + mine)
        // Before the peer has proved anything: small messages only, and the connection's time limit.
        let auth = try Migration.receive(connection, .auth, max: 64)
        guard auth.count == 64, Migration.same(Array(auth.suffix(32)), Migration.mac(token, Array("client".utf8), mine, Array(auth.prefix(32)))) else {
            try? Migration.send(connection, .refused, Array("authentication failed: the token does not match".utf8))
            throw StasisError(.permission, "refused: the peer does not know the token")
        }
        let theirs = Array(auth.prefix(32))
        try Migration.send(connection, .proof, Migration.mac(token, Array("server".utf8), theirs, mine))
        connection.setTimeout(seconds: 120)
        let session = Migration.sessionKey(token, receiver: mine, source: theirs)

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
                    let lacking = asked.filter { !FileSystem.exists(store.chunkPath($0)) }
                    try Migration.send(connection, .need, Array(lacking.joined(separator: "\n").utf8))
                    for digest in lacking {
                        let message = try Migration.receive(connection, .chunk)
                        guard message.count > 64, String(decoding: message.prefix(64), as: UTF8.self) == digest else {
                            throw StasisError(.io, "\(connection.peer) sent another chunk than \(digest)")
                        }
                        try message.withUnsafeBytes { bytes in
                            try early.submit(digest: digest, file: UnsafeRawBufferPointer(rebasing: bytes[64...]), from: connection.peer)
                        }
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
        let lacking = Set(manifest.files.flatMap { $0.chunks ?? [] }.filter { !$0.isEmpty && !FileSystem.exists(store.chunkPath($0)) })
        try Migration.send(connection, .need, Array(lacking.sorted().joined(separator: "\n").utf8))

        var text: String
        var restored: Int32 = 0
        do {
            let reader = try CheckpointBundle.Reader(stream: connection.fd, name: "the migration from \(connection.peer)")
            guard reader.manifest == manifest else { throw StasisError(.integrity, "the bundle's manifest is not the one offered; refused") }
            FaultInjection.stall("receive", say: options.log)
            let staging = try StagingDirectory(destination: options.root + "/" + manifest.id)
            let watch = Stopwatch()
            let imported = try BundleOperation.importBundle(reader, staging: staging, store: store.path, chunksMayBeInStore: true)
            let importSeconds = watch.seconds
            var restore = RestoreOperation.Options(directory: imported.directory)
            restore.store = store.path
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
            for process in manifest.processTree.processes.reversed() { kill(process.pid, SIGKILL) }
            Self.reapWhenItEnds(restored)
            throw StasisError(.migrationFailed, "restored as PID \(restored), but the source did not commit (\(error)); the copy here was stopped and the job runs on there")
        }
        try? Migration.send(connection, .committed, Migration.mac(session, Array("committed".utf8)))
        return restored
    }
}

/// The source's side of sending chunks during the dump: the dump's writers hand each new chunk over
/// (`offer`, on their threads; they wait when 32 are queued, so memory stays bounded), and one thread asks the
/// receiver which of a few it lacks and sends those. A failure stops the sending and is thrown by `finish`;
/// the writers are never left waiting.
final class ChunkPreloader: @unchecked Sendable {
    private let connection: TCPConnection
    private let condition = NSCondition()
    private var queue: [(digest: String, file: Data)] = []
    private var closed = false
    private var failure: Error?
    private var asked = Set<String>()
    private var sent = Set<String>()
    private var bytes: UInt64 = 0
    private let done = DispatchSemaphore(value: 0)
    private var finished = false
    static let capacity = 32, batch = 16

    init(_ connection: TCPConnection) {
        self.connection = connection
        let thread = Thread { [self] in
            run()
            done.signal()
        }
        thread.name = "stasis-migrate-send"
        thread.start()
    }

    func offer(_ digest: String, _ file: Data) {
        condition.lock()
        defer { condition.unlock() }
        while queue.count >= Self.capacity && !closed && failure == nil { condition.wait() }
        if !closed && failure == nil { queue.append((digest, file)) }
        condition.broadcast()
    }

    private func run() {
        while true {
            condition.lock()
            while queue.isEmpty && !closed { condition.wait() }
            if queue.isEmpty && closed {
                condition.unlock()
                return
            }
            let next = Array(queue.prefix(Self.batch))
            queue.removeFirst(next.count)
            let skip = failure != nil
            condition.broadcast()
            condition.unlock()
            if skip { continue }
            do {
                let fresh = next.filter { asked.insert($0.digest).inserted }
                guard !fresh.isEmpty else { continue }
                try Migration.send(connection, .query, Array(fresh.map(\.digest).joined(separator: "\n").utf8))
                let lacking = Set(String(decoding: try Migration.receive(connection, .need), as: UTF8.self).split(separator: "\n").map(String.init))
                for chunk in fresh where lacking.contains(chunk.digest) {
                    let digest = Array(chunk.digest.utf8)
                    try digest.withUnsafeBytes { name in
                        try chunk.file.withUnsafeBytes { file in try Migration.send(connection, .chunk, parts: [name, file]) }
                    }
                    bytes += UInt64(chunk.file.count)
                    sent.insert(chunk.digest)
                }
            } catch {
                condition.lock()
                failure = error
                queue.removeAll()
                condition.broadcast()
                condition.unlock()
            }
        }
    }

    /// Sends what is queued, stops, and says what went: the chunks sent and their bytes.
    func finish() throws -> (digests: Set<String>, bytes: UInt64) {
        condition.lock()
        closed = true
        condition.broadcast()
        let wait = !finished
        finished = true
        condition.unlock()
        if wait { done.wait() }
        if let failure { throw failure }
        return (sent, bytes)
    }
}
