import CStasisTLS
import Foundation
import StasisCore

/// TLS 1.3 between two stasis hosts, through OpenSSL (CStasisTLS is a thin layer over libssl; no
/// cryptography of stasis's own). Both ends present a certificate and each accepts the other's only when its
/// SHA-256 fingerprint is pinned (and it is within its validity dates), or when it chains to a given CA.
/// Either way a man in the middle cannot read or change what passes: it cannot present the pinned certificate.
public struct TLSConfiguration: Sendable {
    public static let certificateName = "cert.pem"
    public static let keyName = "key.pem"

    public var certificate: String
    public var key: String
    /// SHA-256 fingerprints of the certificates accepted from the peer.
    public var pinned: [[UInt8]]
    /// CA certificates (PEM) that a peer's certificate may chain to instead.
    public var caFile: String?

    /// Our identity from `directory` (as `stasis serve --init-tls` makes it: cert.pem and key.pem); at least
    /// one of `pinned` and `caFile` must say whom to accept.
    public init(directory: String, pinned: [String], caFile: String?) throws {
        certificate = directory + "/" + Self.certificateName
        key = directory + "/" + Self.keyName
        self.pinned = try pinned.map(TLSFingerprint.parse)
        self.caFile = caFile
        guard !self.pinned.isEmpty || caFile != nil else {
            throw StasisError(.invalidArgument, "TLS needs to know which peer to accept",
                              hint: "give the peer's certificate fingerprint with --tls-peer (its `stasis serve --init-tls` printed it), or a CA with --tls-ca")
        }
        for file in [certificate, key] + (caFile.map { [$0] } ?? []) where !FileSystem.exists(file) {
            throw StasisError(.invalidArgument, "\(file) does not exist", hint: "make a key and certificate with `stasis serve --init-tls \(directory)`")
        }
        let info = try attempt("cannot read the TLS key", key) { try FileSystem.status(key) }
        try info?.requireSecret(key, what: "the TLS key")
    }

    /// Makes `directory` (0700) with a new P-256 key (key.pem, 0600) and a self-signed certificate for it
    /// (cert.pem) named `name`, valid over `validity`; returns the certificate's fingerprint. The directory is
    /// created, or one that is there must be empty, this user's and not a link; it is made 0700 first.
    @discardableResult
    public static func generate(in directory: String, name: String, validity: ClosedRange<Date>) throws -> String {
        try FileSystem.makeSecretDirectory(directory, mustBeEmpty: true)
        var error = [CChar](repeating: 0, count: 512)
        let now = Date()
        let result = stasis_tls_generate(directory + "/" + certificateName, directory + "/" + keyName, name,
                                         Int(validity.lowerBound.timeIntervalSince(now)), Int(validity.upperBound.timeIntervalSince(now)),
                                         &error, error.count)
        guard result == 0 else { throw StasisError(.io, String(nulTerminated: error)) }
        return try TLSFingerprint.of(certificate: directory + "/" + certificateName)
    }
}

/// A certificate's SHA-256 as stasis prints and reads it: "sha256:" and 64 hex digits (colons and case are
/// ignored when read, as other tools print them).
public enum TLSFingerprint {
    public static func format(_ digest: [UInt8]) -> String {
        "sha256:" + digest.map { String(format: "%02x", $0) }.joined()
    }

    public static func parse(_ text: String) throws -> [UInt8] {
        var digits = text.lowercased()
        if digits.hasPrefix("sha256:") { digits.removeFirst(7) }
        digits.removeAll { $0 == ":" }
        var bytes: [UInt8] = []
        var index = digits.startIndex
        while index < digits.endIndex, let next = digits.index(index, offsetBy: 2, limitedBy: digits.endIndex),
              let byte = UInt8(digits[index..<next], radix: 16) {
            bytes.append(byte)
            index = next
        }
        guard bytes.count == 32, index == digits.endIndex else {
            throw StasisError(.invalidArgument, "'\(text)' is not a SHA-256 certificate fingerprint (sha256: and 64 hex digits)")
        }
        return bytes
    }

    /// The fingerprint of the certificate in a PEM file.
    public static func of(certificate path: String) throws -> String {
        var digest = [UInt8](repeating: 0, count: 32)
        var error = [CChar](repeating: 0, count: 512)
        guard stasis_tls_file_fingerprint(path, &digest, &error, error.count) == 0 else {
            throw StasisError(.invalidArgument, String(nulTerminated: error))
        }
        return format(digest)
    }
}

/// A TLS context for one role, made once and used for every connection.
// @unchecked Sendable: OpenSSL's SSL_CTX may be shared by threads once set up; nothing here changes it after.
public final class TLSContext: @unchecked Sendable {
    let pointer: OpaquePointer
    public let server: Bool

    public init(_ configuration: TLSConfiguration, server: Bool) throws {
        var error = [CChar](repeating: 0, count: 512)
        let pins = configuration.pinned.flatMap { $0 }
        guard let made = stasis_tls_context_new(server ? 1 : 0, configuration.certificate, configuration.key, pins,
                                                configuration.pinned.count, configuration.caFile, &error, error.count) else {
            throw StasisError(.invalidArgument, String(nulTerminated: error))
        }
        pointer = made
        self.server = server
    }

    /// A client of servers on the web (an OCI registry): TLS 1.2 or newer, the server's certificate checked
    /// against the system's CAs and `caFile`'s, and against the host name given to `TCPConnection.secure`.
    public init(webCA caFile: String?) throws {
        var error = [CChar](repeating: 0, count: 512)
        guard let made = stasis_tls_web_context_new(caFile, &error, error.count) else {
            throw StasisError(.invalidArgument, String(nulTerminated: error))
        }
        pointer = made
        server = false
    }

    deinit { stasis_tls_context_free(pointer) }
}

/// One connection's TLS state, used by one thread at a time (TCPConnection's).
final class TLSSession {
    let pointer: OpaquePointer
    /// "TLSv1.3 TLS_AES_256_GCM_SHA384", say.
    let description: String
    let peerFingerprint: String?

    /// Runs the handshake on `fd` (its socket time limits apply); throws, saying why, if the peer does not
    /// speak TLS 1.3 or its certificate is refused.
    init(_ context: TLSContext, fd: FileDescriptor, host: String?) throws {
        var error = [CChar](repeating: 0, count: 512)
        guard let session = stasis_tls_handshake(context.pointer, fd.rawValue, host, &error, error.count) else {
            throw StasisError(.permission, Self.explained(String(nulTerminated: error)))
        }
        pointer = session
        description = String(cString: stasis_tls_version(session)) + " " + String(cString: stasis_tls_cipher(session))
        var digest = [UInt8](repeating: 0, count: 32)
        peerFingerprint = stasis_tls_peer_fingerprint(session, &digest) == 0 ? TLSFingerprint.format(digest) : nil
    }

    deinit { stasis_tls_session_free(pointer) }

    /// All of `buffer`; nil when it went.
    func send(_ buffer: UnsafeRawBufferPointer) -> StreamSocket.Failure? {
        guard let base = buffer.baseAddress, !buffer.isEmpty else { return nil }
        var error = [CChar](repeating: 0, count: 512)
        return failure(Int(stasis_tls_write(pointer, base, buffer.count, &error, error.count)), error)
    }

    /// Fills all of `buffer`, within `deadline` as a whole when given; nil when it is full.
    func receive(into buffer: UnsafeMutableRawBufferPointer, deadline: Date?) -> StreamSocket.Failure? {
        var done = 0
        var error = [CChar](repeating: 0, count: 512)
        while done < buffer.count {
            if let deadline, done > 0, Date() > deadline { return .timedOut }
            let got = stasis_tls_read(pointer, buffer.baseAddress! + done, buffer.count - done, &error, error.count)
            if got > 0 { done += got; continue }
            return failure(got, error) ?? .closed
        }
        return nil
    }

    /// What one TLS read gives: at least one byte, or 0 when the peer closed.
    func receiveSome(into buffer: UnsafeMutableRawBufferPointer) -> Result<Int, StreamSocket.Failure> {
        var error = [CChar](repeating: 0, count: 512)
        let got = stasis_tls_read(pointer, buffer.baseAddress!, buffer.count, &error, error.count)
        if got > 0 { return .success(got) }
        switch failure(got, error) {
        case nil, .closed?: return .success(0)
        case let other?: return .failure(other)
        }
    }

    private func failure(_ code: Int, _ error: [CChar]) -> StreamSocket.Failure? {
        switch Int32(code) {
        case 0: nil
        case Int32(STASIS_TLS_CLOSED): .closed
        case Int32(STASIS_TLS_TIMED_OUT): .timedOut
        default: .tls(Self.explained(String(nulTerminated: error)))
        }
    }

    /// OpenSSL's words for the alerts a peer sends when it does not accept this end's certificate, said so.
    static func explained(_ reason: String) -> String {
        let refusals = ["alert unknown ca", "alert bad certificate", "alert certificate required", "alert certificate unknown",
                        "alert certificate expired"]
        guard refusals.contains(where: reason.contains) else { return reason }
        return "the peer does not accept this host's certificate (\(reason))"
    }
}
