import CStasisLinux
import Foundation
import Glibc
import StasisCore

/// Files and directories, with the permissions and durability a checkpoint needs: process memory may hold
/// secrets, so directories are 0700 and files 0600; what must survive a crash is fsync'd before it counts.
public enum FileSystem {
    public static func exists(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }

    public static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// Whether this process may execute `path` (access(2) with X_OK).
    public static func isExecutable(_ path: String) -> Bool { access(path, X_OK) == 0 }

    public enum FileType: Sendable { case directory, regular, other }

    /// What `path` is, following links; nil when nothing is there. Any other failure to look (permission
    /// denied on a directory above it) is thrown as it is, not taken for "missing".
    public static func type(of path: String) throws -> FileType? {
        var st = stat()
        guard stat(path, &st) == 0 else {
            if errno == ENOENT || errno == ENOTDIR { return nil }
            throw systemError("cannot examine", path)
        }
        switch st.st_mode & S_IFMT {
        case S_IFDIR: return .directory
        case S_IFREG: return .regular
        default: return .other
        }
    }

    /// The contents of `path` (not followed if it is a link): nil when it is missing; any other failure (permission
    /// denied) is thrown as it is, not taken for "missing". What is not a regular file (a FIFO someone put
    /// there) is refused, never waited on.
    public static func readFileIfPresent(_ path: String) throws -> Data? {
        guard let fd = try openInputIfPresent(path, what: "a regular file", followingLinks: false) else { return nil }
        let handle = FileHandle(fileDescriptor: fd.rawValue, closeOnDealloc: true)
        do { return try handle.readToEnd() ?? Data() } catch { throw systemError("cannot read", path) }
    }

    /// Opens a file the user named (a bundle, an archive, a token file) to read it, refusing at once what is
    /// not a regular file: opening a FIFO blocks until a writer comes, and reading a device or a directory
    /// either never ends or fails obscurely. The open is O_NONBLOCK, so it returns whatever `path` is; fstat
    /// then decides; O_NONBLOCK is cleared again on a file kept. `what` ("a bundle") names what was expected in
    /// the refusal ("X is a FIFO, not a bundle"); `directoryAllowed`: a directory is kept too (a checkpoint);
    /// `followingLinks: false` for secrets, which are never read through a link.
    public static func openInput(_ path: String, what: String, directoryAllowed: Bool = false, followingLinks: Bool = true) throws -> FileDescriptor {
        guard let fd = try openInputIfPresent(path, what: what, directoryAllowed: directoryAllowed, followingLinks: followingLinks) else {
            throw StasisError(.invalidArgument, "\(path) does not exist")
        }
        return fd
    }

    /// Checks that `path` is what `openInput` would keep, without keeping it open.
    public static func requireInput(_ path: String, what: String, directoryAllowed: Bool = false) throws {
        try openInput(path, what: what, directoryAllowed: directoryAllowed).closeQuietly()
    }

    /// `openInput`, but nil when nothing is at `path`.
    public static func openInputIfPresent(_ path: String, what: String, directoryAllowed: Bool = false,
                                          followingLinks: Bool = true) throws -> FileDescriptor? {
        let fd = retryingEINTR { open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | (followingLinks ? 0 : O_NOFOLLOW)) }
        guard fd >= 0 else {
            switch errno {
            case ENOENT: return nil
            case ELOOP where !followingLinks:
                throw StasisError(.invalidArgument, "\(path) is a symbolic link, not \(what)", hint: "name the file itself: it is not read through a link")
            case ENXIO, EOPNOTSUPP:  // a socket, or a device without a driver: there is nothing to open
                // The refusal stands whatever the kind; failing to name it only makes the message vaguer.
                throw notAFile(path, kind: (try? status(path, followingLinks: followingLinks))??.kindName ?? "not a regular file", what: what)
            default:
                throw systemError("cannot open", path)
            }
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let failure = systemError("cannot examine", path)
            close(fd)
            throw failure
        }
        let kind = st.st_mode & S_IFMT
        guard kind == S_IFREG || (directoryAllowed && kind == S_IFDIR) else {
            close(fd)
            throw notAFile(path, kind: FileStatus(st).kindName, what: what)
        }
        guard fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) == 0 else {
            let failure = systemError("cannot open", path)
            close(fd)
            throw failure
        }
        return FileDescriptor(rawValue: fd)
    }

    private static func notAFile(_ path: String, kind: String, what: String) -> StasisError {
        StasisError(.invalidArgument, "\(path) is \(kind), not \(what)", hint: "give the path of \(what) itself: a FIFO, socket or device is never read")
    }

    /// A file's size and how many seconds ago it was last modified, without following a link; nil when it is
    /// not there.
    public static func sizeAndAge(_ path: String) -> (size: UInt64, seconds: Double)? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        return (UInt64(st.st_size), Date().timeIntervalSince1970 - Double(st.st_mtim.tv_sec))
    }

    /// What is at `path` (`followingLinks`: of what a link points to); nil when nothing is there. Any other
    /// failure to look (permission denied on a directory above it) is thrown.
    public static func status(_ path: String, followingLinks: Bool = true) throws(Errno) -> FileStatus? {
        var st = stat()
        guard (followingLinks ? stat(path, &st) : lstat(path, &st)) == 0 else {
            if errno == ENOENT || errno == ENOTDIR { return nil }
            throw Errno(rawValue: errno)
        }
        return FileStatus(st)
    }

    /// Removes a file, if it is there.
    public static func remove(_ path: String) { unlink(path) }

    /// Creates a directory (mode 0700 unless said); one that exists already is not an error.
    public static func makeDirectory(_ path: String, mode: mode_t = 0o700) throws {
        if mkdir(path, mode) != 0 && errno != EEXIST { throw systemError("cannot create directory", path) }
    }

    /// A second name for a file (link(2)): fails with EEXIST rather than replace one.
    public static func link(_ source: String, as destination: String) throws(Errno) {
        guard Glibc.link(source, destination) == 0 else { throw Errno(rawValue: errno) }
    }

    /// Renames `source` to `destination` (one filesystem), replacing a file there.
    public static func rename(_ source: String, to destination: String) throws {
        guard Glibc.rename(source, destination) == 0 else { throw systemError("cannot rename \(source) to", destination) }
    }

    public static func setMode(_ path: String, _ mode: mode_t) throws {
        guard chmod(path, mode) == 0 else { throw systemError("cannot set the mode of", path) }
    }

    /// Refuses a directory stasis is about to trust (a chunk store, a checkpoint) unless it belongs to this
    /// user and no one else may write to it: chunks planted there would count as present, files as verified.
    public static func requireOwnedAndPrivate(_ path: String, what: String) throws {
        var st = stat()
        guard stat(path, &st) == 0 else { throw systemError("cannot examine \(what)", path) }
        if st.st_uid != geteuid() {
            throw StasisError(.permission, "\(what) \(path) belongs to user \(st.st_uid), not to this user (\(geteuid())): stasis does not trust it",
                              hint: "use a \(what) of your own, or chown it to this user if its contents are known good")
        }
        if st.st_mode & 0o022 != 0 {
            throw StasisError(.permission, "\(what) \(path) can be written by other users (mode \(String(st.st_mode & 0o777, radix: 8))): stasis does not trust it",
                              hint: "chmod go-w \(path) (stasis makes its directories 0700)")
        }
    }

    /// True when `path` does not exist or is an empty directory.
    public static func isMissingOrEmptyDirectory(_ path: String) throws -> Bool {
        guard exists(path) else { return true }
        guard isDirectory(path) else { return false }
        return try names(in: path).isEmpty
    }

    public static func size(_ path: String) -> UInt64? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return UInt64(st.st_size)
    }

    /// Creates `path` (mode 0700) and any missing parents (mode 0700 too; existing ones are left alone).
    public static func makePrivateDirectory(_ path: String) throws {
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            prefix += "/" + component
            if mkdir(prefix, 0o700) != 0 && errno != EEXIST { throw systemError("cannot create directory", prefix) }
        }
        guard isDirectory(path) else { throw StasisError(.io, "\(path) exists and is not a directory") }
    }

    /// Makes `path` a directory for secrets (a private key, a restore's work): created fresh with mode 0700
    /// (missing parents too, 0700), or, when it is there already, a directory itself (not a link to one)
    /// that belongs to this user. Another user's directory is refused: its owner could read or replace what
    /// stasis writes there, whatever its mode. `mustBeEmpty` (a key's): it must hold nothing, and is made
    /// 0700 before anything is put in it (emptiness checked again after the chmod, when no one else can add
    /// to it). Otherwise one that others may write to is refused rather than changed (it may be shared on
    /// purpose, as /tmp is).
    public static func makeSecretDirectory(_ path: String, mustBeEmpty: Bool) throws {
        let parent = (path as NSString).deletingLastPathComponent
        if !parent.isEmpty, parent != "/" { try makePrivateDirectory(parent) }
        if mkdir(path, 0o700) == 0 { return }
        guard errno == EEXIST else { throw systemError("cannot create directory", path) }
        let fd = retryingEINTR { open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        guard fd >= 0 else {
            if errno == ELOOP || errno == ENOTDIR {
                let kind = (try? status(path, followingLinks: false))??.kindName ?? "not a directory"  // only names it in the refusal
                throw StasisError(.invalidArgument, "\(path) is \(kind), not a directory: stasis keeps secrets only in a directory itself",
                                  hint: "name a new directory (stasis creates it, mode 0700)")
            }
            throw systemError("cannot open directory", path)
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw systemError("cannot examine", path) }
        guard st.st_uid == geteuid() else {
            throw StasisError(.permission, "\(path) belongs to user \(st.st_uid), not to this user (\(geteuid())): stasis does not keep secrets in another user's directory",
                              hint: "name a new directory (stasis creates it, mode 0700), or one of your own")
        }
        guard mustBeEmpty else {
            guard st.st_mode & 0o022 == 0 else {
                throw StasisError(.permission, "\(path) can be written by other users (mode \(String(st.st_mode & 0o777, radix: 8))): stasis does not keep secrets there",
                                  hint: "chmod 700 \(path), or name a new directory (stasis creates it, mode 0700)")
            }
            return
        }
        let requireEmpty = {
            guard try isMissingOrEmptyDirectory(path) else {
                throw StasisError(.invalidArgument, "\(path) already exists and is not empty", hint: "name a new or empty directory")
            }
        }
        try requireEmpty()
        if st.st_mode & 0o7777 != 0o700 {
            guard fchmod(fd, 0o700) == 0 else { throw systemError("cannot set mode 0700 on", path) }
            try requireEmpty()
        }
    }

    /// A fresh 0700 directory next to `path`, named so that nobody takes it for a finished checkpoint.
    public static func makeStagingSibling(of path: String, owner: Int32) throws -> String {
        let url = URL(fileURLWithPath: path).standardizedFileURL
        let parent = url.deletingLastPathComponent().path
        try makePrivateDirectory(parent)
        var template = Array("\(parent)/.\(url.lastPathComponent).partial-\(owner)-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        guard made != nil else { throw systemError("cannot create a staging directory in", parent) }
        let staging = String(nulTerminated: template)
        guard chmod(staging, 0o700) == 0 else { throw systemError("cannot set mode 0700 on", staging) }
        return staging
    }

    /// A fresh private directory `PREFIX-XXXXXX` in `parent` (the system's temporary directory by default).
    public static func makeTemporaryDirectory(in parent: String = NSTemporaryDirectory(), prefix: String) throws -> String {
        var template = Array("\(parent)/\(prefix)-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        guard made != nil else { throw systemError("cannot create a directory in", parent) }
        return String(nulTerminated: template)
    }

    /// Removes `.NAME.partial-PID-*` siblings of `destination` (staging directories, or files being written)
    /// whose writer PID no longer runs: what a killed dump or export left behind.
    public static func removeAbandonedPartials(of destination: String) {
        let url = URL(fileURLWithPath: destination).standardizedFileURL
        let parent = url.deletingLastPathComponent().path
        let prefix = ".\(url.lastPathComponent).partial-"
        // Tidying on the way: a parent that cannot be listed leaves its leftovers for a later run (and gc).
        guard let names = try? FileSystem.names(in: parent) else { return }
        for name in names where name.hasPrefix(prefix) {
            let owner = name.dropFirst(prefix.count).split(separator: "-").first.flatMap { Int32($0) }
            if let owner, !ProcFS.isLive(owner) { removeTree(parent + "/" + name) }
        }
    }

    /// Opens a directory for use as a descriptor (for CRIU's images_dir_fd, or for fsync).
    public static func openDirectory(_ path: String) throws -> FileDescriptor {
        try attempt("cannot open directory", path) { try FileDescriptor.open(path, .readOnly, options: .directory) }
    }

    public static func fsync(path: String) throws {
        let fd = try attempt("cannot open", path) { try FileDescriptor.open(path, .readOnly) }
        defer { fd.closeQuietly() }
        try attempt("cannot fsync", path) { try fd.sync() }
    }

    /// Bytes an unprivileged writer can still put on the filesystem holding `path`; nil when it cannot be asked.
    public static func availableBytes(at path: String) -> UInt64? {
        var info = statvfs()
        guard statvfs(path, &info) == 0 else { return nil }
        return UInt64(info.f_bavail) * UInt64(info.f_frsize)
    }

    /// When what is at `path` last changed (st_ctim: for a directory, an entry added, removed or renamed);
    /// nil when nothing is there or it cannot be examined.
    public static func changeTime(_ path: String) -> timespec? {
        var st = stat()
        return stat(path, &st) == 0 ? st.st_ctim : nil
    }

    /// Whether some process holds a flock(2) on the file at `path` (tried with a non-blocking exclusive lock,
    /// let go at once); false when there is no such file.
    public static func isFlockHeld(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK
    }

    /// Whether `path` is on a filesystem held in memory (tmpfs, ramfs).
    public static func isInMemory(_ path: String) -> Bool {
        stasis_is_in_memory(path) == 1
    }

    /// Writes the whole of the file at `path` to `fd` (a pipe or a socket), in 1 MiB reads.
    public static func copy(_ path: String, to fd: FileDescriptor) throws {
        let input = try attempt("cannot open", path) { try FileDescriptor.open(path, .readOnly) }
        defer { input.closeQuietly() }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        while true {
            let got = try attempt("cannot read", path) { try input.readSome(into: buffer) }
            if got == 0 { return }
            try attempt("cannot pass on", path) { try fd.write(all: UnsafeRawBufferPointer(rebasing: buffer[0..<got])) }
        }
    }

    /// Writes `data` to `path` through a temporary file, fsync and rename, so readers see all or nothing.
    /// `temporaryDirectory`: where the temporary file is made (on the same filesystem), when no file but the
    /// finished one may ever appear beside `path` (a published checkpoint).
    public static func writeAtomically(_ data: Data, to path: String, mode: mode_t = 0o600, temporaryDirectory: String? = nil) throws {
        let temporary = temporaryDirectory.map { "\($0)/.\(URL(fileURLWithPath: path).lastPathComponent).tmp-\(getpid())" } ?? path + ".tmp-\(getpid())"
        let fd = try attempt("cannot create", temporary) {
            try FileDescriptor.open(temporary, .writeOnly, options: [.create, .truncate], permissions: FilePermissions(rawValue: mode))
        }
        do {
            defer { fd.closeQuietly() }
            try attempt("cannot write", temporary) { try data.withUnsafeBytes { try fd.write(all: $0) } }
            try attempt("cannot set mode on", temporary) { try fd.setPermissions(FilePermissions(rawValue: mode)) }
            try attempt("cannot fsync", temporary) { try fd.sync() }
        } catch {
            unlink(temporary)
            throw error
        }
        if Glibc.rename(temporary, path) != 0 {
            let failure = systemError("cannot rename \(temporary) to", path)
            unlink(temporary)
            throw failure
        }
    }

    /// Renames `source` to `destination` (an empty directory there is replaced), then fsyncs the parent so
    /// the new name is durable.
    public static func publish(_ source: String, as destination: String) throws {
        if isDirectory(destination) { rmdir(destination) }
        guard Glibc.rename(source, destination) == 0 else {
            throw systemError("cannot rename \(source) to", destination)
        }
        try fsync(path: URL(fileURLWithPath: destination).deletingLastPathComponent().path)
    }

    /// Regular files below `root`, as sorted paths relative to it. A directory below it that cannot be
    /// read is an error naming it, not a directory without files.
    public static func regularFiles(under root: String) throws -> [String] {
        var files: [String] = []
        try walk(root) { relative, kind in if kind == S_IFREG { files.append(relative) } }
        return files.sorted()
    }

    /// Calls `visit` with the path relative to `root` and the type (S_IFMT bits) of everything below it, a
    /// directory before what it holds; links are not followed, and nothing on another filesystem (a mount
    /// below `root`) is entered, as FileManager's walk (fts with FTS_XDEV) did. Throws what cannot be listed or
    /// examined, and a name that is not UTF-8 (it could not be named again to open it).
    private static func walk(_ root: String, _ visit: (String, mode_t) throws -> Void) throws {
        var top = stat()
        guard lstat(root, &top) == 0 else { throw systemError("cannot examine", root) }
        var pending = [""]
        while let relative = pending.popLast() {
            let directory = relative.isEmpty ? root : root + "/" + relative
            for name in try names(in: directory) {
                let child = relative.isEmpty ? name : relative + "/" + name
                var st = stat()
                guard lstat(root + "/" + child, &st) == 0 else {
                    if errno == ENOENT && name.contains("\u{FFFD}") {
                        throw StasisError(.io, "cannot handle a file name that is not UTF-8 in \(Format.printable(directory))")
                    }
                    if errno == ENOENT { continue }  // removed since it was listed
                    throw systemError("cannot examine", root + "/" + child)
                }
                let kind = st.st_mode & S_IFMT
                try visit(child, kind)
                if kind == S_IFDIR && st.st_dev == top.st_dev { pending.append(child) }
            }
        }
    }

    /// Makes every directory below and including `root` 0700 and every file 0600.
    public static func makePrivate(tree root: String) throws {
        guard chmod(root, 0o700) == 0 else { throw systemError("cannot set mode 0700 on", root) }
        try walk(root) { relative, kind in
            let path = root + "/" + relative
            switch kind {
            case S_IFDIR: if chmod(path, 0o700) != 0 { throw systemError("cannot set mode 0700 on", path) }
            case S_IFREG: if chmod(path, 0o600) != 0 { throw systemError("cannot set mode 0600 on", path) }
            default: break
            }
        }
    }

    /// Makes everything written to the filesystem holding `path` durable (syncfs).
    public static func syncFilesystem(of path: String) throws {
        let fd = try openDirectory(path)
        defer { fd.closeQuietly() }
        guard stasis_syncfs(fd.rawValue) == 0 else { throw systemError("cannot sync the filesystem of", path) }
    }

    /// Removes a directory if it is empty (rmdir(2)); anything in it keeps it.
    public static func removeEmptyDirectory(_ path: String) { rmdir(path) }

    /// Removes `path` and, if it is a directory, everything in it (links are removed, never followed). Best
    /// effort, for discarding what stasis made (staging, partials): what cannot be removed stays, and the
    /// caller's own outcome is what is reported. It works from each directory's descriptor and the names' raw
    /// bytes, so a name that is not UTF-8 goes too, and it leaves alone whatever is mounted below `path` (as
    /// FileManager's removal, through fts with FTS_XDEV, did): a bind mount in a scratch directory keeps its files.
    public static func removeTree(_ path: String) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard (st.st_mode & S_IFMT) == S_IFDIR else {
            unlink(path)
            return
        }
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { return }  // cannot be listed: left as it is, and rmdir then fails too
        emptyDirectory(fd, device: st.st_dev)
        rmdir(path)
    }

    /// Removes everything in the directory open as `fd` that is on `device`, and closes `fd`.
    private static func emptyDirectory(_ fd: Int32, device: dev_t) {
        guard let stream = fdopendir(fd) else {
            close(fd)
            return
        }
        defer { closedir(stream) }
        while let entry = readdir(stream) {
            withUnsafeBytes(of: entry.pointee.d_name) { raw in
                let name = raw.baseAddress!.assumingMemoryBound(to: CChar.self)
                if strcmp(name, ".") == 0 || strcmp(name, "..") == 0 { return }
                var st = stat()
                guard fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0, st.st_dev == device else { return }
                if (st.st_mode & S_IFMT) == S_IFDIR {
                    let child = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                    if child >= 0 { emptyDirectory(child, device: device) }
                    unlinkat(fd, name, AT_REMOVEDIR)
                } else {
                    unlinkat(fd, name, 0)
                }
            }
        }
    }

    public static func readFile(_ path: String) throws -> Data {
        guard let handle = FileHandle(forReadingAtPath: path) else { throw systemError("cannot open", path) }
        defer { try? handle.close() }  // a read-only descriptor: closing it loses nothing
        do { return try handle.readToEnd() ?? Data() } catch { throw systemError("cannot read", path) }
    }
}
