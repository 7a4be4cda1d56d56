import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisTestSupport
import Testing

/// Files the user names are opened without ever waiting on what is not a file.
@Suite struct InputFiles {
    /// The message of the StasisError `body` throws ("" if it throws none or another error).
    func refusal(_ body: () throws -> Void) -> String {
        do { try body() } catch let error as StasisError { return error.message } catch { return "\(error)" }
        return ""
    }

    @Test func aRegularFileIsOpenedBlocking() throws {
        let path = Harness.scratch("input") + "/file"
        try Data("content".utf8).write(to: URL(fileURLWithPath: path))
        let fd = try FileSystem.openInput(path, what: "a bundle")
        defer { fd.closeQuietly() }
        #expect(fcntl(fd.rawValue, F_GETFL) & O_NONBLOCK == 0, "O_NONBLOCK is cleared on a file kept")
        #expect(fcntl(fd.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        #expect(try FileSystem.readFileIfPresent(path) == Data("content".utf8))
    }

    /// A FIFO with no writer: a blocking open would wait for ever; it is refused at once.
    @Test func aFIFOIsRefusedAtOnce() throws {
        let path = Harness.scratch("input") + "/fifo"
        #expect(mkfifo(path, 0o600) == 0)
        let watch = Stopwatch()
        #expect(refusal { _ = try FileSystem.openInput(path, what: "a bundle") } == "\(path) is a FIFO, not a bundle")
        #expect(refusal { _ = try FileSystem.readFileIfPresent(path) } == "\(path) is a FIFO, not a regular file")
        #expect(refusal { try FileSystem.requireInput(path, what: "a checkpoint", directoryAllowed: true) } == "\(path) is a FIFO, not a checkpoint")
        #expect(watch.seconds < 5)
    }

    @Test func socketsDevicesAndDirectoriesAreRefused() throws {
        let root = Harness.scratch("input")
        let listener = try UnixSocket.listen(at: root + "/socket")
        defer { listener.closeQuietly() }
        #expect(refusal { _ = try FileSystem.openInput(root + "/socket", what: "a token file") } == "\(root)/socket is a socket, not a token file")
        #expect(refusal { _ = try FileSystem.openInput("/dev/null", what: "a token file") } == "/dev/null is a character device, not a token file")
        #expect(refusal { _ = try FileSystem.openInput(root, what: "a token file") } == "\(root) is a directory, not a token file")
        try FileSystem.requireInput(root, what: "a checkpoint", directoryAllowed: true)
        #expect(refusal { _ = try FileSystem.openInput(root + "/missing", what: "a bundle") } == "\(root)/missing does not exist")
        #expect(try FileSystem.openInputIfPresent(root + "/missing", what: "a bundle") == nil)
    }

    /// A secret is never read through a link.
    @Test func aLinkIsRefusedWhereLinksAreNotFollowed() throws {
        let root = Harness.scratch("input")
        try Data("secret".utf8).write(to: URL(fileURLWithPath: root + "/file"))
        #expect(symlink(root + "/file", root + "/link") == 0)
        #expect(refusal { _ = try FileSystem.openInput(root + "/link", what: "a token file", followingLinks: false) }
            == "\(root)/link is a symbolic link, not a token file")
        try FileSystem.openInput(root + "/link", what: "a bundle").closeQuietly()
    }
}

/// Directories that hold secrets (a TLS key) are this user's and 0700 before anything goes in.
@Suite struct SecretDirectories {
    func mode(_ path: String) throws -> UInt32 { try #require(try FileSystem.status(path, followingLinks: false)).permissions }

    @Test func aNewDirectoryIsMadePrivate() throws {
        let path = Harness.scratch("secret") + "/a/b/tls"
        try FileSystem.makeSecretDirectory(path, mustBeEmpty: true)
        #expect(try mode(path) == 0o700)
    }

    @Test func anEmptyDirectoryOfThisUserIsMadePrivate() throws {
        let path = Harness.scratch("secret") + "/tls"
        #expect(mkdir(path, 0o777) == 0 && chmod(path, 0o777) == 0)
        try FileSystem.makeSecretDirectory(path, mustBeEmpty: true)
        #expect(try mode(path) == 0o700)
    }

    /// A shared directory (as /tmp is) is refused, never made private under its other users.
    @Test func aDirectoryOthersWriteIsRefusedNotChanged() throws {
        let root = Harness.scratch("secret")
        let shared = root + "/shared"
        #expect(mkdir(shared, 0o777) == 0 && chmod(shared, 0o1777) == 0)
        try Data().write(to: URL(fileURLWithPath: shared + "/someone's"))
        #expect(throws: StasisError.self) { try FileSystem.makeSecretDirectory(shared, mustBeEmpty: true) }
        #expect(throws: StasisError.self) { try FileSystem.makeSecretDirectory(shared, mustBeEmpty: false) }
        #expect(try mode(shared) == 0o1777)
    }

    @Test func anotherUsersDirectoryIsRefusedAndLeftAlone() throws {
        let path = Harness.scratch("secret") + "/tls"
        #expect(mkdir(path, 0o777) == 0 && chmod(path, 0o777) == 0 && chown(path, 65534, 65534) == 0)
        #expect(throws: StasisError.self) { try FileSystem.makeSecretDirectory(path, mustBeEmpty: true) }
        let now = Date()
        #expect(throws: StasisError.self) { try TLSConfiguration.generate(in: path, name: "test", validity: now...now.addingTimeInterval(3600)) }
        #expect(!FileSystem.exists(path + "/key.pem"), "no key was written into it")
        #expect(try mode(path) == 0o777)
    }

    @Test func aLinkOrANonEmptyDirectoryIsRefused() throws {
        let root = Harness.scratch("secret")
        try FileSystem.makePrivateDirectory(root + "/real")
        #expect(symlink(root + "/real", root + "/link") == 0)
        #expect(throws: StasisError.self) { try FileSystem.makeSecretDirectory(root + "/link", mustBeEmpty: true) }
        try Data().write(to: URL(fileURLWithPath: root + "/real/planted"))
        #expect(throws: StasisError.self) { try FileSystem.makeSecretDirectory(root + "/real", mustBeEmpty: true) }
        try FileSystem.makeSecretDirectory(root + "/real", mustBeEmpty: false)
        try Data().write(to: URL(fileURLWithPath: root + "/file"))
        #expect(throws: StasisError.self) { try FileSystem.makeSecretDirectory(root + "/file", mustBeEmpty: true) }
        #expect(throws: StasisError.self) { try FileSystem.makeSecretDirectory(root + "/file", mustBeEmpty: false) }
    }
}
