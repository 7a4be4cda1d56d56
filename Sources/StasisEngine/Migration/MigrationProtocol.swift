import Crypto
import Foundation
import StasisCore
import StasisOS

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
/// count only when the authenticated manifest lists them. Both ends prove they know the token; the session
/// key is HMAC(token, "session" | both nonces). Everything restored is authenticated: the manifest by its HMAC, each whole file by its SHA-256 in the manifest, and
/// each chunk by its digest, which the manifest lists, so an unauthenticated peer cannot get anything restored.
/// The source's tree stays frozen until the receiver's authenticated answer says the job runs there and the
/// commit is acknowledged; then CRIU ends it. Any failure before that (a dropped connection, a wrong token, a failed restore) fails the
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
        let fd = try FileSystem.openInput(path, what: "a token file", followingLinks: false)
        defer { fd.closeQuietly() }
        let info = try attempt("cannot read the token file", path) { try fd.status() }
        try info.requireSecret(path, what: "the token file")
        let text = try FileHandle(fileDescriptor: fd.rawValue, closeOnDealloc: false).readToEnd() ?? Data()
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
        let (kind, length) = try receiveHeader(connection, max: max)
        let payload = try connection.receive(length)
        if kind == .refused {
            throw StasisError(.permission, "\(connection.peer) refused: \(String(decoding: payload, as: UTF8.self))")
        }
        return (kind, payload)
    }

    /// A message's kind and payload length; the payload is the caller's to read.
    static func receiveHeader(_ connection: TCPConnection, max: Int = maxMessage) throws -> (Kind, Int) {
        let head = try connection.receive(5)
        let length = Int(head[1]) << 24 | Int(head[2]) << 16 | Int(head[3]) << 8 | Int(head[4])
        guard length <= max else { throw StasisError(.io, "\(connection.peer) sent a message of \(length) bytes; not a stasis migration peer") }
        guard let kind = Kind(rawValue: head[0]) else {
            throw StasisError(.io, "\(connection.peer) sent message \(head[0]); not a stasis migration peer")
        }
        return (kind, length)
    }

    /// Equal in constant time.
    static func same(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        a.count == b.count && zip(a, b).reduce(0) { $0 | ($1.0 ^ $1.1) } == 0
    }
}
