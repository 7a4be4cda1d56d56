import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisTestSupport
import Testing

/// Listing, links, copies and access checks: what the modules above StasisOS once asked FileManager.
@Suite struct FileSystemQueries {
    func message(_ body: () throws -> Void) -> String {
        do { try body() } catch let error as StasisError { return error.message } catch { return "\(error)" }
        return ""
    }

    @Test func namesListEveryEntryButDotAndDotDot() throws {
        let root = Harness.scratch("names")
        try FileSystem.makeDirectory(root + "/sub")
        try Data().write(to: URL(fileURLWithPath: root + "/file"))
        #expect(symlink("nowhere", root + "/link") == 0)
        #expect(try FileSystem.names(in: root).sorted() == ["file", "link", "sub"])
        #expect(try FileSystem.names(in: root + "/sub") == [])
    }

    /// Missing is empty only where asked; what cannot be listed for another reason is an error naming it.
    @Test func aMissingDirectoryIsEmptyOnlyWhereAsked() throws {
        let root = Harness.scratch("names")
        let missing = root + "/missing"
        #expect(try FileSystem.namesIfPresent(in: missing) == nil)
        #expect(try FileSystem.namesOrNone(in: missing) == [])
        #expect(message { _ = try FileSystem.names(in: missing) } == "cannot read directory \(missing): No such file or directory")
        try Data().write(to: URL(fileURLWithPath: root + "/file"))
        #expect(message { _ = try FileSystem.namesOrNone(in: root + "/file") } == "cannot read directory \(root)/file: Not a directory")
    }

    @Test func aLinkTargetIsReadAsWritten() throws {
        let root = Harness.scratch("link")
        #expect(symlink("../somewhere/else", root + "/link") == 0)
        #expect(try FileSystem.symlinkTarget(root + "/link") == "../somewhere/else")
        #expect(try FileSystem.symlinkTarget("/proc/self/exe").hasPrefix("/"))
        #expect(message { _ = try FileSystem.symlinkTarget(root + "/none") }.hasPrefix("cannot read the link \(root)/none"))
    }

    @Test func aCopyKeepsContentAndModeAndNeverReplaces() throws {
        let root = Harness.scratch("copy")
        let content = Data((0..<3_000_000).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        try content.write(to: URL(fileURLWithPath: root + "/source"))
        try FileSystem.setMode(root + "/source", 0o640)
        try FileSystem.copyFile(root + "/source", to: root + "/copy")
        #expect(try FileSystem.readFile(root + "/copy") == content)
        #expect(try FileSystem.status(root + "/copy")?.permissions == 0o640)
        #expect(message { try FileSystem.copyFile(root + "/source", to: root + "/copy") }.hasPrefix("cannot create \(root)/copy: File exists"))
        #expect(message { try FileSystem.copyFile(root + "/none", to: root + "/other") } == "\(root)/none does not exist")
        #expect(!FileSystem.exists(root + "/other"))
    }

    @Test func accessChecks() throws {
        let root = Harness.scratch("access")
        try Data().write(to: URL(fileURLWithPath: root + "/file"))
        #expect(FileSystem.isReadable(root + "/file"))
        #expect(!FileSystem.isReadable(root + "/none"))
        #expect(FileSystem.isExecutable("/bin/sh"))
        #expect(!FileSystem.isExecutable(root + "/none"))
    }

    /// The walker behind regularFiles, makePrivate and removeTree: every level, links never followed.
    @Test func treesAreWalkedAndRemovedWithoutFollowingLinks() throws {
        let root = Harness.scratch("tree")
        let outside = Harness.scratch("outside")
        try Data("keep".utf8).write(to: URL(fileURLWithPath: outside + "/kept"))
        try FileSystem.makePrivateDirectory(root + "/tree/a/b")
        try Data("1".utf8).write(to: URL(fileURLWithPath: root + "/tree/top"))
        try Data("2".utf8).write(to: URL(fileURLWithPath: root + "/tree/a/b/deep"))
        #expect(symlink(outside, root + "/tree/a/link") == 0)
        #expect(try FileSystem.regularFiles(under: root + "/tree") == ["a/b/deep", "top"])
        try FileSystem.setMode(root + "/tree/a/b/deep", 0o644)
        try FileSystem.makePrivate(tree: root + "/tree")
        #expect(try FileSystem.status(root + "/tree/a/b/deep")?.permissions == 0o600)
        #expect(try FileSystem.status(root + "/tree/a/b")?.permissions == 0o700)
        FileSystem.removeTree(root + "/tree")
        #expect(!FileSystem.exists(root + "/tree"))
        #expect(try FileSystem.readFile(outside + "/kept") == Data("keep".utf8), "a link's target is never removed")
    }

    /// A filesystem mounted below a tree is neither entered nor emptied (FileManager's fts walk had FTS_XDEV).
    @Test func aMountBelowATreeIsLeftAlone() throws {
        let root = Harness.scratch("mounted")
        try FileSystem.makePrivateDirectory(root + "/tree/mnt")
        guard mount("tmpfs", root + "/tree/mnt", "tmpfs", 0, nil) == 0 else {
            Issue.record("cannot mount a tmpfs (errno \(errno)): these tests run as root")
            return
        }
        defer { umount2(root + "/tree/mnt", Int32(MNT_DETACH)) }
        try Data("theirs".utf8).write(to: URL(fileURLWithPath: root + "/tree/mnt/data"))
        try Data("ours".utf8).write(to: URL(fileURLWithPath: root + "/tree/file"))
        #expect(try FileSystem.regularFiles(under: root + "/tree") == ["file"])
        FileSystem.removeTree(root + "/tree")
        #expect(!FileSystem.exists(root + "/tree/file"))
        #expect(try FileSystem.readFile(root + "/tree/mnt/data") == Data("theirs".utf8), "a mounted file was removed")
    }

    /// A name that is not UTF-8 is removed with its directory, and a walk that must name it says so.
    @Test func aNameThatIsNotUTF8() throws {
        let root = Harness.scratch("bytes")
        try FileSystem.makePrivateDirectory(root + "/tree/sub")
        let name: [CChar] = Array((root + "/tree/sub/").utf8CString.dropLast()) + [0x66, CChar(bitPattern: 0xFF), 0]
        let fd = open(name, O_CREAT | O_WRONLY | O_CLOEXEC, 0o600)
        #expect(fd >= 0)
        close(fd)
        #expect(message { _ = try FileSystem.regularFiles(under: root + "/tree") }.contains("not UTF-8"))
        FileSystem.removeTree(root + "/tree")
        #expect(!FileSystem.exists(root + "/tree"))
    }
}
