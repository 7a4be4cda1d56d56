import Foundation
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
// @unchecked Sendable: `failures` and `connection` are `Locked`; the listener and provider are set once.
public final class CRIUImageServer: @unchecked Sendable {
    /// Writes one image into the pipe it is given (the server closes the pipe afterwards).
    public typealias Writer = @Sendable (FileDescriptor) throws -> Void
    /// The writer of a named image, or nil when there is no such image.
    public typealias Provider = @Sendable (String) -> Writer?

    public static let socketName = "streamer-serve.sock"

    /// The directory to give CRIU as its images directory: it holds nothing but the socket.
    public let directory: String
    private let listener: FileDescriptor
    private let provider: Provider
    private let failures = Locked<[Error]>([])
    private let connection = Locked<FileDescriptor?>(nil)
    private let writers = DispatchGroup()
    private let accepting = DispatchGroup()
    private let brokenPipe: Signals.BrokenPipeHandler

    /// Creates `directory` (private) and listens on streamer-serve.sock in it. `finish` removes both.
    public init(directory: String, provider: @escaping Provider) throws {
        self.directory = directory
        self.provider = provider
        try FileSystem.makeSecretDirectory(directory, mustBeEmpty: false)
        do {
            listener = try UnixSocket.listen(at: directory + "/" + Self.socketName)
        } catch {
            FileSystem.removeEmptyDirectory(directory)
            throw error
        }
        // While images are served, a reader that goes away (CRIU failing) must give EPIPE, not kill stasis.
        brokenPipe = Signals.ignoreBrokenPipe()
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
        listener.shutdown()
        connection.withLock { $0?.shutdown() }
        accepting.wait()
        writers.wait()
        listener.closeQuietly()
        FileSystem.remove(directory + "/" + Self.socketName)
        FileSystem.removeEmptyDirectory(directory)
        Signals.restoreBrokenPipe(brokenPipe)
        return failures.current
    }

    private func record(_ error: Error) { failures.withLock { $0.append(error) } }

    private func serve() {
        // An error here: shut down before CRIU connected.
        guard let connection = try? UnixSocket.accept(listener) else { return }
        self.connection.withLock { $0 = connection }
        defer {
            self.connection.withLock { $0 = nil }
            connection.closeQuietly()
        }
        while let name = readRequest(connection) {
            let writer = provider(name)
            guard writeReply(connection, exists: writer != nil) else { record(StasisError(.criuFailed, "CRIU's image socket closed during a reply")); return }
            guard let writer else { continue }
            guard let pipe = UnixSocket.receiveDescriptor(connection) else { record(StasisError(.criuFailed, "CRIU did not pass a pipe for \(name)")); return }
            // Pipes of 1 MiB instead of 64 KiB: far fewer wake-ups per GiB.
            pipe.setPipeCapacity(1 << 20)
            writers.enter()
            let thread = Thread { [self] in
                defer { pipe.closeQuietly(); writers.leave() }
                do { try writer(pipe) } catch {
                    // A write that failed because CRIU had closed its end (it stopped, or read all it wanted)
                    // is CRIU's story, told by its own result; a damaged chunk is always ours to report.
                    if !pipe.pipeReaderIsGone || (error as? StasisError)?.code == .integrity { record(error) }
                }
            }
            thread.name = "stasis-image-\(name)"
            thread.start()
        }
    }

    private func readExactly(_ fd: FileDescriptor, _ count: Int) -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: count)
        // A read that fails ends the connection as its end does: CRIU, the peer, reports why it stopped.
        let got = try? buffer.withUnsafeMutableBytes { try fd.read(filling: $0) }
        return got == count ? buffer : nil
    }

    /// `img_streamer_request_entry { required string filename = 1; }`, framed; nil at the end of the connection.
    private func readRequest(_ fd: FileDescriptor) -> String? {
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
    private func writeReply(_ fd: FileDescriptor, exists: Bool) -> Bool {
        // false ends serving: CRIU went away, and its own outcome says why.
        (try? fd.write(all: [2, 0, 0, 0, 0x08, exists ? 1 : 0])) != nil
    }
}
