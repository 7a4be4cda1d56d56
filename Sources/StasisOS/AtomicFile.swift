import Foundation
import Glibc
import StasisCore

/// A new file written under a hidden name beside its destination (`.NAME.partial-PID-RANDOM`, mode 0600) and
/// given its name only once complete and durable: readers see all of it or nothing, a writer that dies
/// leaves only the hidden file (removed by the next writer of the same name), and `publish` never replaces
/// a file: link(2) fails on one that appeared meanwhile. What bundles and checkpoint archives are written as.
public final class AtomicFile {
    public let path: String
    public let temporaryPath: String
    /// Open for writing until `publish` or `discard`.
    public private(set) var descriptor: Int32
    private var published = false

    /// Refuses a destination that exists or whose directory does not.
    public init(creating destination: String) throws {
        let url = URL(fileURLWithPath: destination).standardizedFileURL
        let parent = url.deletingLastPathComponent().path
        guard !FileSystem.exists(url.path) else {
            throw StasisError(.invalidArgument, "\(url.path) already exists", hint: "choose a new file name, or remove the old one first")
        }
        guard FileSystem.isDirectory(parent) else {
            throw StasisError(.invalidArgument, "\(parent) is not a directory", hint: "create it first")
        }
        FileSystem.removeAbandonedPartials(of: url.path)
        let temporary = "\(parent)/.\(url.lastPathComponent).partial-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = retryingEINTR { open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
        guard fd >= 0 else { throw systemError("cannot create", temporary) }
        (path, temporaryPath, descriptor) = (url.path, temporary, fd)
    }

    deinit { discard() }

    /// Writes all of `bytes` at the current offset.
    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        if let code = FileSystem.writeAll(descriptor, bytes) { throw systemError("cannot write", temporaryPath, errno: code) }
    }

    /// Makes the file durable and gives it its name; an existing file of that name is left alone (an error).
    public func publish() throws {
        guard fchmod(descriptor, 0o600) == 0 else { throw systemError("cannot set mode 0600 on", temporaryPath) }
        guard Glibc.fsync(descriptor) == 0 else { throw systemError("cannot fsync", temporaryPath) }
        close(descriptor)
        descriptor = -1
        guard link(temporaryPath, path) == 0 else {
            if errno == EEXIST { throw StasisError(.invalidArgument, "\(path) appeared while it was being written; it was left as it is") }
            throw systemError("cannot create", path)
        }
        published = true
        unlink(temporaryPath)
        try FileSystem.fsync(path: URL(fileURLWithPath: path).deletingLastPathComponent().path)
    }

    /// Drops an unpublished file (nothing for a published one).
    public func discard() {
        if descriptor >= 0 { close(descriptor); descriptor = -1 }
        if !published { unlink(temporaryPath) }
    }
}
