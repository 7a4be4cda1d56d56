import CStasisLinux
import Foundation
import Glibc
import StasisCore

/// The TCP ports a process listens on, and the way a restore gets them back: CRIU binds each listener again,
/// and a socket in TIME_WAIT on that address and port (left by a connection the listener's side closed first,
/// as NCCL's bootstrap does) makes that bind fail with EADDRINUSE for a minute, SO_REUSEADDR or not.
public enum TCPListeners {
    /// A listening socket's local end, as "127.0.0.1:8080" or "[::]:8080".
    public struct Endpoint: Hashable, Sendable, CustomStringConvertible {
        public var family: Int32
        /// 4 or 16 bytes, network order.
        public var address: [UInt8]
        public var port: UInt16

        public var description: String {
            var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            _ = address.withUnsafeBytes { inet_ntop(family, $0.baseAddress, &text, socklen_t(text.count)) }
            let host = String(nulTerminated: text)
            return family == AF_INET6 ? "[\(host)]:\(port)" : "\(host):\(port)"
        }

        public init(family: Int32, address: [UInt8], port: UInt16) {
            self.family = family
            self.address = address
            self.port = port
        }

        public init?(_ text: String) {
            guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else { return nil }
            var host = String(text[..<colon])
            let family = host.hasPrefix("[") ? AF_INET6 : AF_INET
            if family == AF_INET6 { host = String(host.dropFirst().dropLast()) }
            var bytes = [UInt8](repeating: 0, count: family == AF_INET6 ? 16 : 4)
            guard bytes.withUnsafeMutableBytes({ inet_pton(family, host, $0.baseAddress) }) == 1 else { return nil }
            self.init(family: family, address: bytes, port: port)
        }
    }

    /// The TCP sockets `pid` holds that listen, read from /proc (its descriptors' socket inodes against its
    /// network namespace's /proc/PID/net/tcp and tcp6).
    public static func endpoints(of pid: Int32) -> [Endpoint] {
        let inodes = Set(ProcFS.descriptorTargets(pid).filter { $0.hasPrefix("socket:[") }.map { $0.dropFirst("socket:[".count).dropLast() })
        guard !inodes.isEmpty else { return [] }
        var found: [Endpoint] = []
        for (file, family) in [("tcp", AF_INET), ("tcp6", AF_INET6)] {
            guard let table = ProcFS.text("/proc/\(pid)/net/\(file)") else { continue }
            found += parseListening(table, family: family, inodes: inodes)
        }
        return found
    }

    /// The rows of a /proc/net/tcp(6) table in state LISTEN (0A) whose inode is one of `inodes`.
    public static func parseListening(_ table: String, family: Int32, inodes: Set<Substring>) -> [Endpoint] {
        table.split(separator: "\n").dropFirst().compactMap { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count > 9, fields[3] == "0A", inodes.contains(fields[9]) else { return nil }
            let local = fields[1].split(separator: ":")
            guard local.count == 2, let port = UInt16(local[1], radix: 16) else { return nil }
            // The address: 32-bit words in this machine's (little-endian) order.
            let hex = Array(local[0])
            guard hex.count == 8 || hex.count == 32 else { return nil }
            var bytes: [UInt8] = []
            for word in stride(from: 0, to: hex.count, by: 8) {
                guard let value = UInt32(String(hex[word..<word + 8]), radix: 16) else { return nil }
                bytes += withUnsafeBytes(of: value.littleEndian, Array.init)
            }
            return Endpoint(family: family, address: bytes, port: port)
        }
    }

    /// Destroys the TIME_WAIT sockets in this network namespace that would keep `endpoint` from being
    /// bound; a wildcard address covers IPv4 too when it is IPv6's (dual-stack listeners). Returns how many
    /// went; throws when the kernel refuses (no CONFIG_INET_DIAG_DESTROY, no CAP_NET_ADMIN).
    @discardableResult
    public static func clearTimeWait(for endpoint: Endpoint) throws -> Int {
        var targets = [endpoint]
        if endpoint.family == AF_INET6, endpoint.address.allSatisfy({ $0 == 0 }) {
            targets.append(Endpoint(family: AF_INET, address: [0, 0, 0, 0], port: endpoint.port))
        }
        var destroyed = 0
        for target in targets {
            let result = target.address.withUnsafeBufferPointer { stasis_destroy_time_wait(target.family, $0.baseAddress, target.port) }
            if result < 0 { throw systemError("destroying the TIME_WAIT sockets on", "\(target)", errno: -result) }
            destroyed += Int(result)
        }
        return destroyed
    }
}
