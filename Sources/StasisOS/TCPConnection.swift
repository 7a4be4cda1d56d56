import Foundation
import Glibc
import StasisCore

/// A blocking TCP connection (IPv4 or IPv6) with whole-buffer sends and receives and a time limit on each
/// wait: what a migration's two ends speak over.
// @unchecked Sendable: one thread uses it at a time; only `shutdown` (for the descriptor, which is set once) may come from another.
public final class TCPConnection: @unchecked Sendable {
    public let fd: FileDescriptor
    public let peer: String
    /// The time limit (seconds) of each whole receive, as `setTimeout` set it; 0: none.
    private var limit = 0
    /// Once `secure` has run: every byte goes through TLS.
    private var tls: TLSSession?
    /// Bytes held back for the next send while a sender says more follows (`send(_:more:)`): TLS cannot cork
    /// the socket as MSG_MORE does, so a small header waits to share a record with its payload.
    private var corked: [UInt8] = []
    /// The most plaintext one TLS record carries.
    private static let corkLimit = 16 << 10

    init(fd: Int32, peer: String) {
        (self.fd, self.peer) = (FileDescriptor(rawValue: fd), peer)
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit { fd.closeQuietly() }

    /// Ends the connection both ways: a thread blocked on it returns.
    public func shutdown() { fd.shutdown(.both) }

    /// Runs the TLS handshake (as `context`'s role) within the connection's time limit; from then on every
    /// byte is encrypted and authenticated. Throws, saying why, when the peer does not speak TLS 1.3 or its
    /// certificate is not one `context` accepts. `host`: the name a CA-signed peer certificate must carry.
    /// `hint`: what to do when it fails (default: a migration's).
    public func secure(with context: TLSContext, host: String? = nil, hint: String? = nil) throws {
        do {
            tls = try TLSSession(context, fd: fd, host: host)
        } catch let error as StasisError {
            throw StasisError(error.code, "TLS with \(peer) failed: \(error.message)", hint: context.server ? nil
                              : hint ?? "is `stasis serve` there running with --tls, and does its certificate match --tls-peer?")
        }
    }

    /// "TLSv1.3 TLS_AES_256_GCM_SHA384" once secured; nil on a plain connection.
    public var security: String? { tls?.description }
    /// The SHA-256 fingerprint of the peer's certificate, once secured.
    public var peerFingerprint: String? { tls?.peerFingerprint }

    /// "HOST:PORT" or "[V6]:PORT" into a host and a port.
    public static func split(_ address: String) throws -> (host: String, port: UInt16) {
        guard let colon = address.lastIndex(of: ":"), let port = UInt16(address[address.index(after: colon)...]), port > 0 else {
            throw StasisError(.invalidArgument, "\(address) is not ADDRESS:PORT")
        }
        var host = String(address[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host.isEmpty ? "0.0.0.0" : host, port)
    }

    static func resolve(_ host: String, _ port: UInt16, passive: Bool) throws -> [(family: Int32, address: sockaddr_storage, length: socklen_t)] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = passive ? AI_PASSIVE : 0
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, String(port), &hints, &list)
        guard status == 0, let list else {
            throw StasisError(.invalidArgument, "cannot resolve \(host): \(String(cString: gai_strerror(status)))")
        }
        defer { freeaddrinfo(list) }
        var found: [(Int32, sockaddr_storage, socklen_t)] = []
        var entry: UnsafeMutablePointer<addrinfo>? = list
        while let current = entry {
            var storage = sockaddr_storage()
            memcpy(&storage, current.pointee.ai_addr, Int(current.pointee.ai_addrlen))
            found.append((current.pointee.ai_family, storage, current.pointee.ai_addrlen))
            entry = current.pointee.ai_next
        }
        return found
    }

    /// True when every address `address` ("HOST:PORT") resolves to is a loopback one (127.0.0.0/8, ::1):
    /// bytes sent there never leave this machine.
    public static func isLoopback(_ address: String) throws -> Bool {
        let (host, port) = try split(address)
        let found = try resolve(host, port, passive: false)
        return !found.isEmpty && found.allSatisfy { entry in
            var storage = entry.address
            return withUnsafePointer(to: &storage) { pointer in
                switch entry.family {
                case AF_INET:
                    pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt32(bigEndian: $0.pointee.sin_addr.s_addr) >> 24 == 127 }
                case AF_INET6:
                    pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { address in
                        withUnsafeBytes(of: address.pointee.sin6_addr) { bytes in bytes.prefix(15).allSatisfy { $0 == 0 } && bytes[15] == 1 }
                    }
                default: false
                }
            }
        }
    }

    /// Connects to `address` ("HOST:PORT") within `seconds`; `hint`: what to do when it fails (default: a
    /// migration's).
    public static func connect(to address: String, seconds: Int = 10, hint: String? = nil) throws -> TCPConnection {
        let (host, port) = try split(address)
        var lastError = ECONNREFUSED
        for (family, storage, length) in try resolve(host, port, passive: false) {
            let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { lastError = errno; continue }
            var address = storage
            StreamSocket.setTimeout(FileDescriptor(rawValue: fd), seconds: seconds)
            let result = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) } }
            if result == 0 { return TCPConnection(fd: fd, peer: "\(host):\(port)") }
            lastError = errno
            close(fd)
        }
        throw StasisError(.io, "cannot connect to \(address): \(String(cString: strerror(lastError)))",
                          hint: hint ?? "is `stasis serve` listening there, and does the network let this host reach it?")
    }

    /// Every wait on the connection, and every whole `receive` (a peer that trickles a byte at a time does
    /// not keep it waiting longer), is limited to `seconds`.
    public func setTimeout(seconds: Int) {
        limit = seconds
        StreamSocket.setTimeout(fd, seconds: seconds)
    }

    public func send(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try send($0) }
    }

    /// `more`: further bytes follow at once (MSG_MORE), so that a small header and its payload, sent
    /// without being copied together, still leave in full packets.
    public func send(_ buffer: UnsafeRawBufferPointer, more: Bool = false) throws {
        let failure: StreamSocket.Failure?
        if let tls {
            if more, corked.count + buffer.count <= Self.corkLimit {
                corked.append(contentsOf: buffer)
                return
            }
            if corked.isEmpty {
                failure = tls.send(buffer)
            } else {
                // What was held back shares a record with as much of this buffer as fits in one.
                let head = min(buffer.count, Self.corkLimit - corked.count)
                corked.append(contentsOf: UnsafeRawBufferPointer(rebasing: buffer[0..<head]))
                failure = corked.withUnsafeBytes { tls.send($0) } ?? tls.send(UnsafeRawBufferPointer(rebasing: buffer[head...]))
                corked.removeAll(keepingCapacity: true)
            }
        } else {
            failure = StreamSocket.send(fd, buffer, more: more)
        }
        if let failure {
            throw StasisError(.io, "sending to \(peer) failed: \(failure.reason)")
        }
    }

    /// Whatever has arrived, at least one byte and at most `buffer.count` (waiting within the connection's time
    /// limit); 0 once the peer has closed. Through TLS when the connection is secured: a bundle streamed over a
    /// migration reads its records this way.
    public func receiveSome(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard !buffer.isEmpty else { return 0 }
        let outcome: Result<Int, StreamSocket.Failure>
        if let tls {
            outcome = tls.receiveSome(into: buffer)
        } else {
            outcome = StreamSocket.receiveSome(fd, into: buffer)
        }
        switch outcome {
        case .success(let got): return got
        case .failure(.closed): return 0
        case .failure(.timedOut): throw StasisError(.io, "receiving from \(peer) failed: nothing came within \(limit) s")
        case .failure(let failure): throw StasisError(.io, "receiving from \(peer) failed: \(failure.reason)")
        }
    }

    /// Exactly `count` bytes; an error if the peer closes first.
    public func receive(_ count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try receive(into: $0) }
        return bytes
    }

    /// Fills `buffer` entirely; an error if the peer closes first.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws {
        let deadline = limit > 0 ? Date().addingTimeInterval(Double(limit)) : nil
        switch tls.map({ $0.receive(into: buffer, deadline: deadline) }) ?? StreamSocket.receive(fd, into: buffer, deadline: deadline) {
        case nil: return
        case .closed?: throw StasisError(.io, "\(peer) closed the connection")
        case .timedOut? where deadline != nil: throw StasisError(.io, "receiving from \(peer) failed: \(buffer.count) bytes did not come within \(limit) s")
        case let failure?: throw StasisError(.io, "receiving from \(peer) failed: \(failure.reason)")
        }
    }
}

/// A listening TCP socket. Sendable: its only state is the descriptor, set once, and accept(2) may be called
/// from any thread.
public final class TCPListener: Sendable {
    private let fd: Int32
    public let address: String

    public init(_ address: String) throws {
        let (host, port) = try TCPConnection.split(address)
        guard let (family, storage, length) = try TCPConnection.resolve(host, port, passive: true).first else {
            throw StasisError(.invalidArgument, "cannot resolve \(host)")
        }
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw systemError("cannot create a socket for", address) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var bound = storage
        let result = withUnsafePointer(to: &bound) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard result == 0, listen(fd, 8) == 0 else {
            let error = systemError("cannot listen on", address)
            close(fd)
            throw error
        }
        (self.fd, self.address) = (fd, address)
    }

    deinit { close(fd) }

    public func accept() throws -> TCPConnection {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        while true {
            let client = withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.accept(fd, $0, &length) }
            }
            if client >= 0 {
                _ = fcntl(client, F_SETFD, FD_CLOEXEC)
                var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
                var service = [CChar](repeating: 0, count: 32)
                _ = withUnsafePointer(to: &storage) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        getnameinfo($0, length, &host, socklen_t(host.count), &service, socklen_t(service.count), NI_NUMERICHOST | NI_NUMERICSERV)
                    }
                }
                return TCPConnection(fd: client, peer: "\(String(nulTerminated: host)):\(String(nulTerminated: service))")
            }
            // A connection that went before it was taken, or descriptors short for a moment: not fatal.
            if errno == EINTR || errno == ECONNABORTED || errno == EPROTO { continue }
            if errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM { sleep(1); continue }
            throw systemError("cannot accept on", address)
        }
    }
}
