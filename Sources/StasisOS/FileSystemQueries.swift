import Foundation
import Glibc
import StasisCore

// Listing, reading links, copying and access checks: what the modules above StasisOS used FileManager for.
// Each failure is a StasisError naming the path; the `IfPresent` forms take a missing path for empty, and
// only that: a directory that cannot be read (permission denied, not a directory) is still an error.
extension FileSystem {
    /// The names in `directory` (not "." or ".."), in the order the filesystem gives them.
    public static func names(in directory: String) throws -> [String] {
        guard let names = try namesIfPresent(in: directory) else {
            throw systemError("cannot read directory", directory, errno: ENOENT)
        }
        return names
    }

    /// The names in `directory`, or nil when nothing is there (it, or a directory above it, is missing).
    public static func namesIfPresent(in directory: String) throws -> [String]? {
        guard let stream = opendir(directory) else {
            if errno == ENOENT { return nil }
            throw systemError("cannot read directory", directory)
        }
        defer { closedir(stream) }
        var names: [String] = []
        while true {
            errno = 0
            guard let entry = readdir(stream) else {
                if errno != 0 { throw systemError("cannot read directory", directory) }
                return names
            }
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
    }

    /// The names in `directory`, none when it is missing: for directories stasis creates on demand (a store's
    /// `writers/`, a staging directory's scratch), where "not there yet" means "nothing in it".
    public static func namesOrNone(in directory: String) throws -> [String] {
        try namesIfPresent(in: directory) ?? []
    }

    /// Where the symbolic link at `path` points (readlink(2)), as written in the link.
    public static func symlinkTarget(_ path: String) throws -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = buffer.withUnsafeMutableBufferPointer { readlink(path, $0.baseAddress!, $0.count - 1) }
        guard count >= 0 else { throw systemError("cannot read the link", path) }
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Whether this process may read `path` (access(2) with R_OK).
    public static func isReadable(_ path: String) -> Bool { access(path, R_OK) == 0 }

    /// Copies the regular file `source` to `destination`, which must not exist yet, with the source's mode
    /// (as `cp` without `-p` would, but never more than the source allows); `durable` syncs the copy (not
    /// wanted for scratch copies removed within the operation, such as a restore's rebuilt images).
    public static func copyFile(_ source: String, to destination: String, durable: Bool = true) throws {
        let input = try openInput(source, what: "a regular file")
        defer { input.closeQuietly() }
        var st = stat()
        guard fstat(input.rawValue, &st) == 0 else { throw systemError("cannot examine", source) }
        let output = try attempt("cannot create", destination) {
            try FileDescriptor.open(destination, .writeOnly, options: [.create, .exclusiveCreate],
                                    permissions: FilePermissions(rawValue: st.st_mode & 0o7777))
        }
        do {
            defer { output.closeQuietly() }
            try copy(source, to: output)
            if durable { try attempt("cannot fsync", destination) { try output.sync() } }
        } catch {
            remove(destination)
            throw error
        }
    }
}
