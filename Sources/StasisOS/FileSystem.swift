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
    /// denied) is thrown as it is, not taken for "missing".
    public static func readFileIfPresent(_ path: String) throws -> Data? {
        let fd = retryingEINTR { open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW) }
        guard fd >= 0 else {
            if errno == ENOENT { return nil }
            throw systemError("cannot read", path)
        }
        let handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        do { return try handle.readToEnd() ?? Data() } catch { throw systemError("cannot read", path) }
    }

    /// A file's size and how many seconds ago it was last modified, without following a link; nil when it is
    /// not there.
    public static func sizeAndAge(_ path: String) -> (size: UInt64, seconds: Double)? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        return (UInt64(st.st_size), Date().timeIntervalSince1970 - Double(st.st_mtim.tv_sec))
    }

    /// Removes a file, if it is there.
    public static func remove(_ path: String) { unlink(path) }

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
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: path) else {
            throw systemError("cannot read directory", path)
        }
        return entries.isEmpty
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

    /// Removes `.NAME.partial-PID-*` siblings of `destination` (staging directories, or files being written)
    /// whose writer PID no longer runs: what a killed dump or export left behind.
    public static func removeAbandonedPartials(of destination: String) {
        let url = URL(fileURLWithPath: destination).standardizedFileURL
        let parent = url.deletingLastPathComponent().path
        let prefix = ".\(url.lastPathComponent).partial-"
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: parent) else { return }
        for name in names where name.hasPrefix(prefix) {
            let owner = name.dropFirst(prefix.count).split(separator: "-").first.flatMap { Int32($0) }
            if let owner, !ProcFS.isLive(owner) { removeTree(parent + "/" + name) }
        }
    }

    /// Opens a directory for use as a descriptor (for CRIU's images_dir_fd, or for fsync).
    public static func openDirectory(_ path: String) throws -> Int32 {
        let fd = retryingEINTR { open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        guard fd >= 0 else { throw systemError("cannot open directory", path) }
        return fd
    }

    public static func fsync(path: String) throws {
        let fd = retryingEINTR { open(path, O_RDONLY | O_CLOEXEC) }
        guard fd >= 0 else { throw systemError("cannot open", path) }
        defer { close(fd) }
        guard Glibc.fsync(fd) == 0 else { throw systemError("cannot fsync", path) }
    }

    /// Hands all of `bytes` to the pipe `fd` by reference (vmsplice(2)): the caller must never change those
    /// pages afterwards. Returns nil, or the errno of the failure.
    public static func vmspliceAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int32? {
        var done = 0
        while done < bytes.count {
            let moved = retryingEINTR { stasis_vmsplice(fd, bytes.baseAddress! + done, UInt(bytes.count - done)) }
            if moved < 0 { return errno }
            if moved == 0 { return EIO }
            done += moved
        }
        return nil
    }

    /// Bytes an unprivileged writer can still put on the filesystem holding `path`; nil when it cannot be asked.
    public static func availableBytes(at path: String) -> UInt64? {
        var info = statvfs()
        guard statvfs(path, &info) == 0 else { return nil }
        return UInt64(info.f_bavail) * UInt64(info.f_frsize)
    }

    /// Writes all of `bytes` to `fd` (at `offset` with pwrite, else at its position). Returns nil, or the
    /// errno of the failure (EIO when the kernel wrote nothing without saying why).
    public static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: off_t? = nil) -> Int32? {
        var done = 0
        while done < bytes.count {
            let wrote = retryingEINTR {
                offset.map { pwrite(fd, bytes.baseAddress! + done, bytes.count - done, $0 + off_t(done)) }
                    ?? write(fd, bytes.baseAddress! + done, bytes.count - done)
            }
            if wrote < 0 { return errno }
            if wrote == 0 { return EIO }
            done += wrote
        }
        return nil
    }

    /// Writes the whole of the file at `path` to `fd` (a pipe or a socket), in 1 MiB reads.
    public static func copy(_ path: String, to fd: Int32) throws {
        let input = retryingEINTR { open(path, O_RDONLY | O_CLOEXEC) }
        guard input >= 0 else { throw systemError("cannot open", path) }
        defer { close(input) }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        while true {
            let got = retryingEINTR { read(input, buffer.baseAddress, buffer.count) }
            if got < 0 { throw systemError("cannot read", path) }
            if got == 0 { return }
            if let failure = writeAll(fd, UnsafeRawBufferPointer(rebasing: buffer[0..<got])) {
                throw systemError("cannot pass on", path, errno: failure)
            }
        }
    }

    /// Writes `data` to `path` through a temporary file, fsync and rename, so readers see all or nothing.
    /// `temporaryDirectory`: where the temporary file is made (on the same filesystem), when no file but the
    /// finished one may ever appear beside `path` (a published checkpoint).
    public static func writeAtomically(_ data: Data, to path: String, mode: mode_t = 0o600, temporaryDirectory: String? = nil) throws {
        let temporary = temporaryDirectory.map { "\($0)/.\(URL(fileURLWithPath: path).lastPathComponent).tmp-\(getpid())" } ?? path + ".tmp-\(getpid())"
        let fd = retryingEINTR { open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode) }
        guard fd >= 0 else { throw systemError("cannot create", temporary) }
        var failure: StasisError?
        if let code = data.withUnsafeBytes({ writeAll(fd, $0) }) { failure = systemError("cannot write", temporary, errno: code) }
        if failure == nil, fchmod(fd, mode) != 0 { failure = systemError("cannot set mode on", temporary) }
        if failure == nil, Glibc.fsync(fd) != 0 { failure = systemError("cannot fsync", temporary) }
        close(fd)
        if failure == nil, Glibc.rename(temporary, path) != 0 { failure = systemError("cannot rename \(temporary) to", path) }
        if let failure {
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

    /// Regular files below `root`, as sorted paths relative to it.
    public static func regularFiles(under root: String) throws -> [String] {
        guard let walker = FileManager.default.enumerator(atPath: root) else {
            throw systemError("cannot read directory", root)
        }
        var files: [String] = []
        while let relative = walker.nextObject() as? String {
            var st = stat()
            if lstat(root + "/" + relative, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG {
                files.append(relative)
            }
        }
        return files.sorted()
    }

    /// Makes every directory below and including `root` 0700 and every file 0600.
    public static func makePrivate(tree root: String) throws {
        guard chmod(root, 0o700) == 0 else { throw systemError("cannot set mode 0700 on", root) }
        guard let walker = FileManager.default.enumerator(atPath: root) else { return }
        while let relative = walker.nextObject() as? String {
            let path = root + "/" + relative
            var st = stat()
            guard lstat(path, &st) == 0 else { continue }
            switch st.st_mode & S_IFMT {
            case S_IFDIR: if chmod(path, 0o700) != 0 { throw systemError("cannot set mode 0700 on", path) }
            case S_IFREG: if chmod(path, 0o600) != 0 { throw systemError("cannot set mode 0600 on", path) }
            default: break
            }
        }
    }

    /// Frees the blocks of a byte range of an open file, keeping its size; false where the filesystem cannot.
    @discardableResult
    public static func punchHole(_ fd: Int32, offset: UInt64, length: UInt64) -> Bool {
        stasis_punch_hole(fd, Int64(offset), Int64(length)) == 0
    }

    /// Starts writing a byte range of an open file back to disk, without waiting.
    public static func startWriteback(_ fd: Int32, offset: UInt64, length: UInt64) {
        _ = stasis_start_writeback(fd, Int64(offset), Int64(length))
    }

    /// Makes everything written to the filesystem holding `path` durable (syncfs).
    public static func syncFilesystem(of path: String) throws {
        let fd = try openDirectory(path)
        defer { close(fd) }
        guard stasis_syncfs(fd) == 0 else { throw systemError("cannot sync the filesystem of", path) }
    }

    public static func removeTree(_ path: String) {
        try? FileManager.default.removeItem(atPath: path)
    }

    public static func readFile(_ path: String) throws -> Data {
        guard let handle = FileHandle(forReadingAtPath: path) else { throw systemError("cannot open", path) }
        defer { try? handle.close() }
        do { return try handle.readToEnd() ?? Data() } catch { throw systemError("cannot read", path) }
    }
}
