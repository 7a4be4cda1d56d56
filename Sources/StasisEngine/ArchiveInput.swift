import Foundation
import StasisContainer
import StasisCore
import StasisOS
import StasisStore

/// A checkpoint archive opened for reading, plain or compressed: podman writes them compressed with zstd by
/// default (`podman container checkpoint --export`, `--compress zstd|gzip|none`). `tar` is what a
/// Tar.Reader reads: the file itself, or a pipe that a decoder fills (libzstd on a thread of its own; gzip
/// through `gzip -dc`). `file`'s position says how far the archive has been read.
final class ArchiveInput {
    enum Compression: String { case none, zstd, gzip }

    let path: String
    let file: FileDescriptor
    let tar: FileDescriptor
    let compression: Compression
    private let finished = DispatchSemaphore(value: 0)
    /// What `finish` found, once it ran (nil: not yet).
    private var outcome: Result<Void, Error>?
    private let failure = Locked<Error?>(nil)
    private var decoderPID: Int32?
    private let brokenPipe: Signals.BrokenPipeHandler?

    /// What the first bytes of a file say it is compressed with.
    static func compression(of path: String) -> Compression? {
        // A sniff only: nil ("cannot tell"), and the open that follows reports what is wrong with the file.
        guard let fd = try? FileSystem.openInput(path, what: "a checkpoint archive") else { return nil }
        let handle = FileHandle(fileDescriptor: fd.rawValue, closeOnDealloc: true)
        defer { try? handle.close() }  // read-only: closing it loses nothing
        // Unreadable or shorter than a magic: not compressed, as far as a sniff can tell (see above).
        guard let head = try? handle.read(upToCount: 4), head.count == 4 else { return nil }
        if Array(head) == [0x28, 0xB5, 0x2F, 0xFD] { return .zstd }
        if head[0] == 0x1F && head[1] == 0x8B { return .gzip }
        return Compression.none
    }

    init(_ path: String) throws {
        self.path = path
        file = try FileSystem.openInput(path, what: "a checkpoint archive")
        compression = Self.compression(of: path) ?? .none
        guard compression != .none else {
            (tar, brokenPipe) = (file, nil)
            finished.signal()
            return
        }
        let (readEnd, writeEnd) = try attempt("cannot create a pipe for", path) { try FileDescriptor.makePipe() }
        tar = readEnd
        // A reader that stops early (a bad entry) closes its end: the decoder then gets EPIPE, not a signal.
        brokenPipe = Signals.ignoreBrokenPipe()
        switch compression {
        case .gzip:
            do {
                defer { writeEnd.closeQuietly() }
                guard let gzip = Spawn.which("gzip") else { throw StasisError(.invalidArgument, "\(path) is gzip-compressed and gzip is not installed") }
                decoderPID = try Spawn.start(gzip, ["-dc"], descriptors: [file: 0, writeEnd: 1])
            } catch {
                readEnd.closeQuietly()
                throw error
            }
            finished.signal()
        default:
            let (file, failure, finished, path) = (file, failure, finished, path)
            Thread.detachNewThread {
                defer { writeEnd.closeQuietly(); finished.signal() }
                do {
                    try Self.decodeZstd(from: file, to: writeEnd, path: path)
                } catch is ReaderClosed {
                    // The reader stopped (an error of its own, or too much after the tar's end): its outcome says why.
                } catch {
                    failure.withLock { $0 = error }
                }
            }
        }
    }

    private static func decodeZstd(from file: FileDescriptor, to pipe: FileDescriptor, path: String) throws {
        let decoder = try ZstdStreamDecoder()
        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        let output = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { input.deallocate(); output.deallocate() }
        while true {
            let got = try attempt("cannot read", path) { try file.readSome(into: input) }
            if got == 0 { break }
            do {
                try decoder.decode(UnsafeRawBufferPointer(rebasing: input[0..<got]), scratch: output) { piece in
                    do {
                        try pipe.write(all: piece)
                    } catch let error as Errno {
                        throw error == .brokenPipe ? ReaderClosed() : systemError("cannot decompress", path, error)
                    }
                }
            } catch let error as StasisError where error.code == .integrity {
                throw error.prefixed("\(path) does not decompress")
            }
        }
        guard decoder.atFrameEnd else { throw StasisError(.integrity, "\(path) is truncated: its zstd stream stops inside a frame") }
    }

    /// The decoder's write failed because the reader closed its end of the pipe.
    private struct ReaderClosed: Error {}

    /// Closes the archive and waits for its decoder; throws what the decoder met (corrupt or truncated
    /// compressed data). `draining` (the reader took the whole tar): what follows the tar's end is read
    /// first, so that the decoder goes through all of its stream (every frame) and checks it. Once: later
    /// calls give the same outcome.
    func finish(draining: Bool = false) throws {
        if outcome == nil {
            let trailing: Error? = draining ? { do { try drainTrailing(); return nil } catch { return error } }() : nil
            if tar != file { tar.closeQuietly() }
            finished.wait()
            let status = decoderPID.map { Spawn.wait($0) } ?? 0
            file.closeQuietly()
            if let brokenPipe { Signals.restoreBrokenPipe(brokenPipe) }
            if let error = failure.current {
                outcome = .failure(error)
            } else if let trailing {
                outcome = .failure(trailing)
            } else if status != 0 {
                // Drained to its end, gzip failing is the stream's fault; stopped early, gzip also fails on the closed pipe.
                outcome = .failure(StasisError(draining ? .integrity : .io, "\(path) did not decompress (gzip exited with status \(status))"))
            } else {
                outcome = .success(())
            }
        }
        try outcome!.get()
    }

    /// Reads the decompressed stream after the tar's end to its end: padding, or further frames of a
    /// concatenated stream, ignored. More than `Tar.Limits.trailingBytes` is refused, so that a stream that
    /// expands without end after a small archive does not keep its reader busy.
    private func drainTrailing() throws {
        guard tar != file else { return }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 4096)
        defer { buffer.deallocate() }
        var total: UInt64 = 0
        while true {
            let got = try attempt("cannot read", path) { try tar.readSome(into: buffer) }
            if got == 0 { return }
            total += UInt64(got)
            guard total <= Tar.Limits.trailingBytes else {
                throw StasisError(.integrity, "\(path) holds more than \(Tar.Limits.trailingBytes >> 20) MiB after the end of its tar archive",
                                  hint: "a checkpoint archive is one tar; this stream goes on after it (a second archive appended, or a crafted file)")
            }
        }
    }

    /// Opens `path`, runs `body` on it and finishes it. A decoder's integrity failure (corrupt or truncated
    /// compressed data) is thrown in place of the reader's "truncated" that follows from it.
    static func reading<T>(_ path: String, _ body: (ArchiveInput) throws -> T) throws -> T {
        let input = try ArchiveInput(path)
        let result = Result { try body(input) }
        let decoding: Error? = {
            let whole: Bool = { if case .success = result { return true } else { return false } }()
            do { try input.finish(draining: whole); return nil } catch { return error }
        }()
        switch result {
        case .success(let value):
            if let decoding { throw decoding }
            return value
        case .failure(let error):
            if let decoding = decoding as? StasisError, decoding.code == .integrity { throw decoding }
            throw error
        }
    }
}
