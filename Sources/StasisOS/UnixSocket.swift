import CStasisLinux
import Foundation
import Glibc
import StasisCore

/// Unix-domain sockets: a listener at a path (CRIU's image streamer), a connection to an abstract name in
/// another network namespace (an agent's), a SOCK_SEQPACKET pair (`criu swrk`), descriptors passed with
/// SCM_RIGHTS, and the peer's PID as the kernel vouches for it. Whole-buffer sends and receives on a
/// connected stream are `StreamSocket`'s.
public enum UnixSocket {
    /// Listens at `path` (backlog `backlog`); the caller unlinks the path when done.
    public static func listen(at path: String, backlog: Int32 = 1) throws -> FileDescriptor {
        let bytes = Array(path.utf8)
        guard var address = socketAddress(bytes, abstract: false) else {
            throw StasisError(.invalidArgument, "the socket path \(path) is too long for a Unix socket")
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw systemError("cannot create a socket for", path) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, Glibc.listen(fd, backlog) == 0 else {
            let error = systemError("cannot listen on", path)
            close(fd)
            unlink(path)
            throw error
        }
        return FileDescriptor(rawValue: fd)
    }

    /// The next connection on `listener` (close-on-exec); an error once the listener is shut down.
    public static func accept(_ listener: FileDescriptor) throws(Errno) -> FileDescriptor {
        let fd = retryingEINTR { stasis_accept_cloexec(listener.rawValue) }
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        return FileDescriptor(rawValue: fd)
    }

    /// Connects to the abstract name `name` as seen from the network namespace of `pid` (abstract names live
    /// per network namespace: a container's agent listens in the container's). A namespace this process may
    /// not enter (stasis itself in a container) holds nothing it could reach: the connect is then tried from
    /// here. nil when nothing listens there.
    public static func connect(abstract name: String, inNetworkNamespaceOf pid: Int32) throws -> FileDescriptor? {
        var fd = stasis_unix_socket_in_netns_of(pid)
        if fd < 0, errno == EPERM || errno == EACCES || errno == ENOENT {
            fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
        guard fd >= 0 else { throw systemError("cannot create a socket to reach", "@\(name)") }
        let bytes = Array(name.utf8)
        guard var address = socketAddress(bytes, abstract: true) else {
            close(fd)
            throw StasisError(.invalidArgument, "the socket name \(name) is too long for a Unix socket")
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + 1 + bytes.count)
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) }
        }
        guard connected == 0 else {
            close(fd)
            return nil
        }
        return FileDescriptor(rawValue: fd)
    }

    /// A connected SOCK_STREAM pair, both ends close-on-exec.
    public static func streamPair() throws(Errno) -> (FileDescriptor, FileDescriptor) { try pair(Int32(SOCK_STREAM.rawValue)) }

    /// A connected SOCK_SEQPACKET pair, both ends close-on-exec.
    public static func packetPair() throws(Errno) -> (FileDescriptor, FileDescriptor) { try pair(Int32(SOCK_SEQPACKET.rawValue)) }

    private static func pair(_ type: Int32) throws(Errno) -> (FileDescriptor, FileDescriptor) {
        var ends: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, type | Int32(SOCK_CLOEXEC.rawValue), 0, &ends) == 0 else { throw Errno(rawValue: errno) }
        return (FileDescriptor(rawValue: ends[0]), FileDescriptor(rawValue: ends[1]))
    }

    /// Sends one packet whole (MSG_NOSIGNAL: a peer that went away is an error, not SIGPIPE).
    public static func sendPacket(_ fd: FileDescriptor, _ bytes: [UInt8]) throws(Errno) {
        let sent = bytes.withUnsafeBytes { raw in retryingEINTR { Glibc.send(fd.rawValue, raw.baseAddress, raw.count, Int32(MSG_NOSIGNAL)) } }
        if sent < 0 { throw Errno(rawValue: errno) }
        if sent != bytes.count { throw Errno.messageTooLong }
    }

    /// Receives one packet whole (its size is peeked first, so none is cut); nil when the peer closed its end.
    public static func receivePacket(_ fd: FileDescriptor) throws(Errno) -> [UInt8]? {
        let size = retryingEINTR { recv(fd.rawValue, nil, 0, Int32(MSG_PEEK | MSG_TRUNC)) }
        if size < 0 { throw Errno(rawValue: errno) }
        if size == 0 { return nil }
        var buffer = [UInt8](repeating: 0, count: size)
        let got = buffer.withUnsafeMutableBytes { raw in retryingEINTR { recv(fd.rawValue, raw.baseAddress, size, 0) } }
        if got < 0 { throw Errno(rawValue: errno) }
        guard got == size else { throw Errno.ioError }
        return buffer
    }

    /// Receives one byte of data carrying one descriptor (SCM_RIGHTS; close-on-exec here); nil when none came.
    public static func receiveDescriptor(_ fd: FileDescriptor) -> FileDescriptor? {
        var byte: UInt8 = 0
        let (failure, descriptor) = withUnsafeMutableBytes(of: &byte) { receive(fd, into: $0) }
        return failure == nil ? descriptor : nil
    }

    /// Sends all of `bytes` on a stream socket with `descriptor` attached to the first byte (SCM_RIGHTS).
    public static func send(_ fd: FileDescriptor, _ bytes: UnsafeRawBufferPointer, passing descriptor: FileDescriptor) -> StreamSocket.Failure? {
        var code: Int32 = 0  // errno, read before the control buffer is freed
        let sent = withDescriptorMessage(UnsafeMutableRawPointer(mutating: bytes.baseAddress), bytes.count) { message, control in
            let header = control.assumingMemoryBound(to: cmsghdr.self)
            header.pointee.cmsg_level = SOL_SOCKET
            header.pointee.cmsg_type = Int32(SCM_RIGHTS)
            header.pointee.cmsg_len = MemoryLayout<cmsghdr>.size + MemoryLayout<Int32>.size
            (control + MemoryLayout<cmsghdr>.size).storeBytes(of: descriptor.rawValue, as: Int32.self)
            let sent = retryingEINTR { sendmsg(fd.rawValue, &message, Int32(MSG_NOSIGNAL)) }
            code = errno
            return sent
        }
        if sent < 0 { return code == EPIPE || code == ECONNRESET ? .closed : .failed(errno: code) }
        if sent == 0 { return .closed }
        // The rest without the descriptor: it went with the first byte.
        return StreamSocket.send(fd, UnsafeRawBufferPointer(rebasing: bytes[sent...]))
    }

    /// Fills all of `buffer` from a stream socket and returns the descriptor that came with it, if one did
    /// (SCM_RIGHTS, close-on-exec here).
    public static func receive(_ fd: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer) -> (failure: StreamSocket.Failure?, descriptor: FileDescriptor?) {
        var descriptor: FileDescriptor?
        var code: Int32 = 0  // errno, read before the control buffer is freed
        let got = withDescriptorMessage(buffer.baseAddress, buffer.count) { message, control in
            let got = retryingEINTR { recvmsg(fd.rawValue, &message, Int32(MSG_CMSG_CLOEXEC)) }
            code = errno
            let header = control.assumingMemoryBound(to: cmsghdr.self)
            if got > 0, message.msg_controllen >= MemoryLayout<cmsghdr>.size, header.pointee.cmsg_level == SOL_SOCKET,
               header.pointee.cmsg_type == Int32(SCM_RIGHTS) {
                descriptor = FileDescriptor(rawValue: (control + MemoryLayout<cmsghdr>.size).load(as: Int32.self))
            }
            return got
        }
        if got == 0 { return (.closed, nil) }
        if got < 0 { return (code == EAGAIN || code == EWOULDBLOCK ? .timedOut : .failed(errno: code), nil) }
        let rest = got < buffer.count ? StreamSocket.receive(fd, into: UnsafeMutableRawBufferPointer(rebasing: buffer[got...])) : nil
        if rest != nil { descriptor?.closeQuietly(); return (rest, nil) }
        return (nil, descriptor)
    }

    /// The PID of the process at the other end of `fd`, nil when the kernel cannot say.
    public static func peerPID(_ fd: FileDescriptor) -> Int32? {
        let pid = stasis_socket_peer_pid(fd.rawValue)
        return pid > 0 ? pid : nil
    }

    /// CMSG_SPACE(sizeof(int)) on 64-bit Linux: a 16-byte header and the int padded to 8.
    private static let descriptorControlSpace = MemoryLayout<cmsghdr>.size + 8

    /// Runs `body` with a message over the `count` bytes at `base` and a zeroed control buffer with room for
    /// one descriptor: what sending and receiving one share.
    private static func withDescriptorMessage(_ base: UnsafeMutableRawPointer?, _ count: Int,
                                              _ body: (inout msghdr, UnsafeMutableRawPointer) -> Int) -> Int {
        let control = UnsafeMutableRawPointer.allocate(byteCount: descriptorControlSpace, alignment: 8)
        defer { control.deallocate() }
        control.initializeMemory(as: UInt8.self, repeating: 0, count: descriptorControlSpace)
        var vector = iovec(iov_base: base, iov_len: count)
        return withUnsafeMutablePointer(to: &vector) { pointer in
            var message = msghdr()
            message.msg_iov = pointer
            message.msg_iovlen = 1
            message.msg_control = control
            message.msg_controllen = descriptorControlSpace
            return body(&message, control)
        }
    }

    private static func socketAddress(_ bytes: [UInt8], abstract: Bool) -> sockaddr_un? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let offset = abstract ? 1 : 0
        guard bytes.count + offset < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in bytes.enumerated() { raw[index + offset] = byte }
        }
        return address
    }
}

extension FileDescriptor {
    public enum ShutdownDirection: Sendable { case reading, writing, both }

    /// Ends a socket's connection one way or both (a thread blocked on it returns), keeping the descriptor.
    public func shutdown(_ direction: ShutdownDirection = .both) {
        let how = switch direction {
        case .reading: Int32(SHUT_RD)
        case .writing: Int32(SHUT_WR)
        case .both: Int32(SHUT_RDWR)
        }
        _ = Glibc.shutdown(rawValue, how)
    }
}
