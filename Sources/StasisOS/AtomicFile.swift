import Foundation
import Glibc
import StasisCore

/// A new file written under a hidden name beside its destination (`.NAME.partial-PID-RANDOM`, mode 0600) and
/// given its name only once complete and durable: readers see all of it or nothing, a writer that dies
/// leaves only the hidden file (removed by the next writer of the same name, or by `stasis gc` where the writer
/// recorded `.NAME.partial-PID-*` in a store first: `StoreWriter`), and `publish` never replaces a file:
/// link(2) fails on one that appeared meanwhile. What bundles and checkpoint archives are written as.
public final class AtomicFile {
    public let path: String
    public let temporaryPath: String
    /// Open for writing until `publish` or `discard`.
    public let descriptor: FileDescriptor
    private var isOpen = true
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
        let fd = try attempt("cannot create", temporary) {
            try FileDescriptor.open(temporary, .writeOnly, options: [.create, .exclusiveCreate], permissions: [.ownerReadWrite])
        }
        (path, temporaryPath, descriptor) = (url.path, temporary, fd)
    }

    deinit { discard() }

    /// Writes all of `bytes` at the current offset.
    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        guard isOpen else { throw StasisError(.io, "\(temporaryPath) was written after it was closed") }
        try attempt("cannot write", temporaryPath) { try descriptor.write(all: bytes) }
        // Tests kill a writer here, its hidden file on disk and partly written (STASIS_FAULT=partial-written-stall).
        FaultInjection.stall("partial-written") { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }
    }

    /// Makes the file durable and gives it its name; an existing file of that name is left alone (an error).
    public func publish() throws {
        guard isOpen else { throw StasisError(.io, "\(temporaryPath) was published after it was closed") }
        try attempt("cannot set mode 0600 on", temporaryPath) { try descriptor.setPermissions(.ownerReadWrite) }
        try attempt("cannot fsync", temporaryPath) { try descriptor.sync() }
        descriptor.closeQuietly()
        isOpen = false
        do {
            try FileSystem.link(temporaryPath, as: path)
        } catch .fileExists {
            throw StasisError(.invalidArgument, "\(path) appeared while it was being written; it was left as it is")
        } catch {
            throw systemError("cannot create", path, error)
        }
        published = true
        unlink(temporaryPath)
        try FileSystem.fsync(path: URL(fileURLWithPath: path).deletingLastPathComponent().path)
    }

    /// Drops an unpublished file (nothing for a published one).
    public func discard() {
        if isOpen { descriptor.closeQuietly() }
        isOpen = false
        if !published { unlink(temporaryPath) }
    }
}
