import CStasisLinux
import Foundation
import Glibc
@_exported import SystemPackage
import StasisCore

// swift-system's FileDescriptor, FilePath and Errno are the vocabulary of this boundary: the other modules
// hold typed descriptors and catch typed errors, and only this module calls the C library. Its wrappers
// retry EINTR; the ones below add what stasis needs on top (close-on-exec always, whole-buffer reads,
// durability, locks) and turn an Errno into a StasisError that names what was being done to what.

/// Runs a wrapped system call and turns the Errno it throws into a StasisError ("cannot open /x: reason").
@discardableResult
public func attempt<T>(_ action: String, _ subject: String, _ body: () throws -> T) throws -> T {
    do { return try body() } catch let error as Errno { throw systemError(action, subject, error) }
}

public func systemError(_ action: String, _ subject: String, _ error: Errno) -> StasisError {
    systemError(action, subject, errno: error.rawValue)
}

extension Errno {
    /// The filesystem is full, or the user's quota is: the user's fix is the same.
    public var isNoSpace: Bool { self == .noSpace || self == .diskQuotaExceeded }
}

extension FileDescriptor {
    /// Opens `path` close-on-exec (no descriptor of stasis's leaks into CRIU, runc or a workload), retrying EINTR.
    public static func open(_ path: String, _ mode: AccessMode, options: OpenOptions = [],
                            permissions: FilePermissions? = nil) throws(Errno) -> FileDescriptor {
        do {
            return try open(FilePath(path), mode, options: options.union(.closeOnExec), permissions: permissions)
        } catch let error as Errno { throw error } catch { throw Errno.ioError }
    }

    /// Reads until `buffer` is full or the file ends (at `offset` with pread, else at the file's position);
    /// returns the bytes read, fewer than asked only at the end of the file.
    public func read(filling buffer: UnsafeMutableRawBufferPointer, at offset: Int64? = nil) throws(Errno) -> Int {
        var done = 0
        while done < buffer.count {
            let rest = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            let got = retryingEINTR {
                offset.map { Glibc.pread(rawValue, rest.baseAddress, rest.count, off_t($0) + off_t(done)) }
                    ?? Glibc.read(rawValue, rest.baseAddress, rest.count)
            }
            if got < 0 { throw Errno(rawValue: errno) }
            if got == 0 { break }
            done += got
        }
        return done
    }

    /// One read(2) of up to `buffer.count` bytes (0 at the end of the file), retrying EINTR.
    public func readSome(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        let got = retryingEINTR { Glibc.read(rawValue, buffer.baseAddress, buffer.count) }
        if got < 0 { throw Errno(rawValue: errno) }
        return got
    }

    /// Writes all of `bytes` (at `offset` with pwrite, else at the file's position). A write the kernel
    /// took nothing of, without saying why, is EIO.
    public func write(all bytes: UnsafeRawBufferPointer, at offset: Int64? = nil) throws(Errno) {
        var done = 0
        while done < bytes.count {
            let rest = UnsafeRawBufferPointer(rebasing: bytes[done...])
            let wrote = retryingEINTR {
                offset.map { Glibc.pwrite(rawValue, rest.baseAddress, rest.count, off_t($0) + off_t(done)) }
                    ?? Glibc.write(rawValue, rest.baseAddress, rest.count)
            }
            if wrote < 0 { throw Errno(rawValue: errno) }
            if wrote == 0 { throw Errno.ioError }
            done += wrote
        }
    }

    public func write(all bytes: [UInt8]) throws(Errno) {
        let failure: Errno? = bytes.withUnsafeBytes { buffer -> Errno? in
            do throws(Errno) { try write(all: buffer); return nil } catch { return error }
        }
        if let failure { throw failure }
    }

    /// Whether the file's first bytes are in the page cache (nil: cannot be told): a read of a file that is
    /// would not wait for the disk.
    public func startIsCached() -> Bool? {
        switch stasis_start_is_cached(rawValue) {
        case 1: true
        case 0: false
        default: nil
        }
    }

    /// fsync(2): the file's data and metadata are durable.
    public func sync() throws(Errno) {
        guard Glibc.fsync(rawValue) == 0 else { throw Errno(rawValue: errno) }
    }

    /// fdatasync(2): the file's data (and its size) are durable.
    public func syncData() throws(Errno) {
        guard Glibc.fdatasync(rawValue) == 0 else { throw Errno(rawValue: errno) }
    }

    public func setPermissions(_ mode: FilePermissions) throws(Errno) {
        guard Glibc.fchmod(rawValue, mode.rawValue) == 0 else { throw Errno(rawValue: errno) }
    }

    /// Sets the file's size (ftruncate(2)).
    public func setSize(_ size: UInt64) throws(Errno) {
        guard Glibc.ftruncate(rawValue, off_t(size)) == 0 else { throw Errno(rawValue: errno) }
    }

    /// Takes flock(2)'s lock on the file (waiting for it), shared or exclusive; it goes with the descriptor.
    public func lock(exclusive: Bool) throws(Errno) {
        guard retryingEINTR({ flock(rawValue, exclusive ? LOCK_EX : LOCK_SH) }) == 0 else { throw Errno(rawValue: errno) }
    }

    /// The owner, mode and size of the open file.
    public func status() throws(Errno) -> FileStatus {
        var st = Glibc.stat()
        guard fstat(rawValue, &st) == 0 else { throw Errno(rawValue: errno) }
        return FileStatus(st)
    }

    /// Closes the descriptor when nothing can be done about a failure (an error path, a descriptor only read).
    public func closeQuietly() { Glibc.close(rawValue) }

    /// Frees the blocks of a byte range, keeping the size; false where the filesystem cannot.
    @discardableResult
    public func punchHole(offset: UInt64, length: UInt64) -> Bool {
        stasis_punch_hole(rawValue, Int64(offset), Int64(length)) == 0
    }

    /// Starts writing a byte range back to disk, without waiting.
    public func startWriteback(offset: UInt64, length: UInt64) {
        _ = stasis_start_writeback(rawValue, Int64(offset), Int64(length))
    }

    /// A pipe, both ends close-on-exec.
    public static func makePipe() throws(Errno) -> (readEnd: FileDescriptor, writeEnd: FileDescriptor) {
        var ends: [Int32] = [-1, -1]
        guard stasis_pipe_cloexec(&ends) == 0 else { throw Errno(rawValue: errno) }
        return (FileDescriptor(rawValue: ends[0]), FileDescriptor(rawValue: ends[1]))
    }

    /// Asks for a pipe buffer of `bytes` (F_SETPIPE_SZ); the kernel may give less, which only costs speed.
    public func setPipeCapacity(_ bytes: Int) {
        _ = fcntl(rawValue, 1031 /* F_SETPIPE_SZ */, Int32(bytes))
    }

    /// Whether the reader of this pipe's write end has gone (poll(2) reports POLLERR), without blocking.
    public var pipeReaderIsGone: Bool {
        var state = pollfd(fd: rawValue, events: 0, revents: 0)
        return poll(&state, 1, 0) == 1 && state.revents & Int16(POLLERR) != 0
    }

    /// Hands all of `bytes` to this pipe by reference (vmsplice(2)): the caller must never change those
    /// pages afterwards.
    public func vmspliceAll(_ bytes: UnsafeRawBufferPointer) throws(Errno) {
        var done = 0
        while done < bytes.count {
            let moved = retryingEINTR { stasis_vmsplice(rawValue, bytes.baseAddress! + done, UInt(bytes.count - done)) }
            if moved < 0 { throw Errno(rawValue: errno) }
            if moved == 0 { throw Errno.ioError }
            done += moved
        }
    }

    public var isTerminal: Bool { isatty(rawValue) == 1 }
}

/// What stat(2) says of a file, as far as stasis asks.
public struct FileStatus: Sendable {
    public enum Kind: Sendable { case directory, regular, symbolicLink, other }
    public let kind: Kind
    public let owner: UInt32
    /// The permission bits, with set-user-ID, set-group-ID and sticky (mode & 0o7777).
    public let permissions: UInt32
    public let size: UInt64

    init(_ st: Glibc.stat) {
        (kind, kindName) = switch st.st_mode & S_IFMT {
        case S_IFREG: (.regular, "a regular file")
        case S_IFDIR: (.directory, "a directory")
        case S_IFLNK: (.symbolicLink, "a symbolic link")
        case S_IFIFO: (.other, "a FIFO")
        case S_IFSOCK: (.other, "a socket")
        case S_IFCHR: (.other, "a character device")
        case S_IFBLK: (.other, "a block device")
        default: (.other, "not a regular file")
        }
        owner = st.st_uid
        permissions = st.st_mode & 0o7777
        size = UInt64(st.st_size)
    }

    /// What it is, for messages: "a regular file", "a FIFO", "a socket", "a character device", ...
    public let kindName: String

    /// Whether this user owns it (the effective user ID).
    public var ownedByThisUser: Bool { owner == geteuid() }

    /// Refuses a secret (a token, a private key) at `path` that is not this user's or that others may read.
    public func requireSecret(_ path: String, what: String) throws {
        guard ownedByThisUser, permissions & 0o077 == 0 else {
            throw StasisError(.permission, "\(what) \(path) must belong to this user and be readable by no one else (mode \(String(permissions & 0o777, radix: 8)), owner \(owner))",
                              hint: "chown $(id -u) \(path); chmod 600 \(path)")
        }
    }
}
