import Foundation
import Glibc

/// Whole-buffer sends and receives on a stream socket, TCP or unix: the one implementation behind every
/// connection stasis speaks over (a migration's TCPConnection, an agent's AgentChannel), which turn its
/// outcomes into their own errors.
public enum StreamSocket {
    public enum Failure: Error, Equatable {
        /// The peer closed the connection (a receive got end-of-file; a send, EPIPE or ECONNRESET).
        case closed
        /// A wait ran past the socket's time limit (SO_RCVTIMEO / SO_SNDTIMEO), or a whole receive past its deadline.
        case timedOut
        case failed(errno: Int32)
        /// TLS failed: a record that does not authenticate, or the peer's alert (OpenSSL's words).
        case tls(String)

        public var reason: String {
            switch self {
            case .closed: "the connection was closed"
            case .timedOut: "no answer in time"
            case .failed(let code): String(cString: strerror(code))
            case .tls(let reason): reason
            }
        }
    }

    /// Sets the time limit of every send and receive on `fd`.
    public static func setTimeout(_ fd: FileDescriptor, seconds: Int) {
        var limit = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd.rawValue, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Sends all of `buffer` (MSG_NOSIGNAL: a peer that went away is an error, not SIGPIPE); `more`: bytes
    /// follow at once (MSG_MORE). nil when all went.
    public static func send(_ fd: FileDescriptor, _ buffer: UnsafeRawBufferPointer, more: Bool = false) -> Failure? {
        var done = 0
        while done < buffer.count {
            let sent = Glibc.send(fd.rawValue, buffer.baseAddress! + done, buffer.count - done, Int32(MSG_NOSIGNAL) | (more ? Int32(MSG_MORE) : 0))
            if sent < 0 && errno == EINTR { continue }
            guard sent > 0 else { return failure() }
            done += sent
        }
        return nil
    }

    /// Fills all of `buffer`; with `deadline`, a peer that trickles bytes cannot make the whole receive wait
    /// longer than that. nil when it is full.
    public static func receive(_ fd: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer, deadline: Date? = nil) -> Failure? {
        var done = 0
        while done < buffer.count {
            if let deadline, done > 0, Date() > deadline { return .timedOut }
            let got = recv(fd.rawValue, buffer.baseAddress! + done, buffer.count - done, 0)
            if got < 0 && errno == EINTR { continue }
            if got == 0 { return .closed }
            guard got > 0 else { return failure() }
            done += got
        }
        return nil
    }

    /// What one recv(2) gives: at least one byte, or 0 when the peer closed.
    public static func receiveSome(_ fd: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer) -> Result<Int, Failure> {
        while true {
            let got = recv(fd.rawValue, buffer.baseAddress!, buffer.count, 0)
            if got < 0 && errno == EINTR { continue }
            return got >= 0 ? .success(got) : .failure(failure())
        }
    }

    /// Waits until the peer has closed its end too (reading and dropping what it still sends), or the
    /// socket's time limit passes: how a connection is ended when the peer must be gone before what comes next.
    public static func drainUntilClosed(_ fd: FileDescriptor) {
        var byte: UInt8 = 0
        while true {
            let got = recv(fd.rawValue, &byte, 1, 0)
            if got < 0 && errno == EINTR { continue }
            if got <= 0 { return }
        }
    }

    private static func failure() -> Failure {
        switch errno {
        case EAGAIN, EWOULDBLOCK: .timedOut
        case EPIPE, ECONNRESET: .closed
        default: .failed(errno: errno)
        }
    }
}
