import Foundation
import Glibc
import StasisCore
import StasisOS

/// Feeds a CRIU restore its images without files: CRIU's image-streamer protocol (`criu restore --stream`).
///
/// CRIU connects to `streamer-serve.sock` in its images directory and, for every image it opens, sends the
/// file name (a protobuf `img_streamer_request_entry`, framed as CRIU frames images: a little-endian u32
/// length, then the message). The server answers `img_streamer_reply_entry { exists }` the same way; for a
/// file that exists CRIU then passes the write end of a pipe (SCM_RIGHTS, with one byte of data), reads the
/// file from the other end and takes EOF as its end. CRIU opens each image once and reads pages files in order.
/// stasis uses it to decode chunks straight into CRIU instead of rebuilding the images on tmpfs first.
/// The two messages have a single field each, so they are encoded here by hand.
// @unchecked Sendable: `failures` and `connection` are reached only under `lock`; the listener and provider are set once.
public final class CRIUImageServer: @unchecked Sendable {
    /// Writes one image into the pipe it is given (the server closes the pipe afterwards).
    public typealias Writer = @Sendable (Int32) throws -> Void
    /// The writer of a named image, or nil when there is no such image.
    public typealias Provider = @Sendable (String) -> Writer?

    public static let socketName = "streamer-serve.sock"

    /// The directory to give CRIU as its images directory: it holds nothing but the socket.
    public let directory: String
    private let listener: Int32
    private let provider: Provider
    private let lock = NSLock()
    private var failures: [Error] = []
    private var connection: Int32 = -1
    private let writers = DispatchGroup()
    private let accepting = DispatchGroup()
    private let previousSIGPIPE: sighandler_t?

    /// Creates `directory` (private) and listens on streamer-serve.sock in it. `finish` removes both.
    public init(directory: String, provider: @escaping Provider) throws {
        self.directory = directory
        self.provider = provider
        try FileSystem.makePrivateDirectory(directory)
        let path = directory + "/" + Self.socketName
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw systemError("cannot create a socket for", path) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            close(fd)
            rmdir(directory)
            throw StasisError(.invalidArgument, "the image socket path \(path) is too long for a Unix socket")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(fd, 1) == 0 else {
            let error = systemError("cannot listen on", path)
            close(fd)
            unlink(path)
            rmdir(directory)
            throw error
        }
        // While images are served, a reader that goes away (CRIU failing) must give EPIPE, not kill stasis.
        listener = fd
        previousSIGPIPE = signal(SIGPIPE, SIG_IGN)
        accepting.enter()
        let thread = Thread { [self] in
            serve()
            accepting.leave()
        }
        thread.name = "stasis-image-server"
        thread.start()
    }

    /// Stops serving (CRIU has returned or never started), waits for every image being written (CRIU has
    /// closed its ends, so writers end with EPIPE at worst), removes the socket and its directory, and returns
    /// the problems met, first first.
    public func finish() -> [Error] {
        shutdown(listener, Int32(SHUT_RDWR))
        lock.withLock { if connection >= 0 { shutdown(connection, Int32(SHUT_RDWR)) } }
        accepting.wait()
        writers.wait()
        close(listener)
        unlink(directory + "/" + Self.socketName)
        rmdir(directory)
        signal(SIGPIPE, previousSIGPIPE)
        return lock.withLock { failures }
    }

    private func record(_ error: Error) { lock.withLock { failures.append(error) } }

    private func serve() {
        let connection = accept(listener, nil, nil)
        guard connection >= 0 else { return }  // shut down before CRIU connected
        _ = fcntl(connection, F_SETFD, FD_CLOEXEC)
        lock.withLock { self.connection = connection }
        defer {
            lock.withLock { self.connection = -1 }
            close(connection)
        }
        while let name = readRequest(connection) {
            let writer = provider(name)
            guard writeReply(connection, exists: writer != nil) else { record(StasisError(.criuFailed, "CRIU's image socket closed during a reply")); return }
            guard let writer else { continue }
            guard let pipe = receiveDescriptor(connection) else { record(StasisError(.criuFailed, "CRIU did not pass a pipe for \(name)")); return }
            // Pipes of 1 MiB instead of 64 KiB: far fewer wake-ups per GiB.
            _ = fcntl(pipe, 1031 /* F_SETPIPE_SZ */, 1 << 20)
            writers.enter()
            let thread = Thread { [self] in
                defer { close(pipe); writers.leave() }
                do { try writer(pipe) } catch {
                    // A write that failed because CRIU had closed its end (it stopped, or read all it wanted)
                    // is CRIU's story, told by its own result; a damaged chunk is always ours to report.
                    var state = pollfd(fd: pipe, events: 0, revents: 0)
                    let readerGone = poll(&state, 1, 0) == 1 && state.revents & Int16(POLLERR) != 0
                    if !readerGone || (error as? StasisError)?.code == .integrity { record(error) }
                }
            }
            thread.name = "stasis-image-\(name)"
            thread.start()
        }
    }

    private func readExactly(_ fd: Int32, _ count: Int) -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let got = buffer.withUnsafeMutableBytes { raw in retryingEINTR { read(fd, raw.baseAddress! + done, count - done) } }
            if got <= 0 { return nil }
            done += got
        }
        return buffer
    }

    /// `img_streamer_request_entry { required string filename = 1; }`, framed; nil at the end of the connection.
    private func readRequest(_ fd: Int32) -> String? {
        guard let header = readExactly(fd, 4) else { return nil }
        let length = Int(header[0]) | Int(header[1]) << 8 | Int(header[2]) << 16 | Int(header[3]) << 24
        guard length > 0, length < 65536, let message = readExactly(fd, length) else { return nil }
        // Field 1, length-delimited (0x0a), then a varint length and the name.
        guard message[0] == 0x0a else { return nil }
        var nameLength = 0, shift = 0, index = 1
        while index < message.count {
            let byte = message[index]
            index += 1
            nameLength |= Int(byte & 0x7f) << shift
            shift += 7
            if byte & 0x80 == 0 { break }
        }
        guard index + nameLength <= message.count else { return nil }
        return String(decoding: message[index..<(index + nameLength)], as: UTF8.self)
    }

    /// `img_streamer_reply_entry { required bool exists = 1; }`, framed.
    private func writeReply(_ fd: Int32, exists: Bool) -> Bool {
        let frame: [UInt8] = [2, 0, 0, 0, 0x08, exists ? 1 : 0]
        return frame.withUnsafeBytes { raw in retryingEINTR { write(fd, raw.baseAddress!, raw.count) } } == frame.count
    }

    /// One byte of data carrying one descriptor (SCM_RIGHTS).
    private func receiveDescriptor(_ fd: Int32) -> Int32? {
        var byte: UInt8 = 0
        let controlLength = Int(CStasisLinuxCMSGSpace)
        let control = UnsafeMutableRawPointer.allocate(byteCount: controlLength, alignment: 8)
        defer { control.deallocate() }
        memset(control, 0, controlLength)
        return withUnsafeMutablePointer(to: &byte) { bytePointer -> Int32? in
            var vector = iovec(iov_base: UnsafeMutableRawPointer(bytePointer), iov_len: 1)
            return withUnsafeMutablePointer(to: &vector) { vectorPointer -> Int32? in
                var message = msghdr()
                message.msg_iov = vectorPointer
                message.msg_iovlen = 1
                message.msg_control = control
                message.msg_controllen = controlLength
                guard retryingEINTR({ recvmsg(fd, &message, Int32(MSG_CMSG_CLOEXEC)) }) == 1 else { return nil }
                let header = control.assumingMemoryBound(to: cmsghdr.self)
                guard message.msg_controllen >= MemoryLayout<cmsghdr>.size, header.pointee.cmsg_level == SOL_SOCKET,
                      header.pointee.cmsg_type == Int32(SCM_RIGHTS) else { return nil }
                return (control + MemoryLayout<cmsghdr>.size).load(as: Int32.self)
            }
        }
    }
}

/// CMSG_SPACE(sizeof(int)) on 64-bit Linux: a 16-byte header and the int padded to 8.
private let CStasisLinuxCMSGSpace = MemoryLayout<cmsghdr>.size + 8
