import Foundation
import Glibc
import StasisContainer
import StasisCore
import StasisOS
import StasisTestSupport
import Testing

/// The tar that checkpoint archives use, against GNU tar: names beyond ustar's 100 bytes go through a pax
/// header, contents come back byte for byte, and a damaged header is refused.
@Suite struct TarFormat {
    @Test func longNamesAndContentsRoundTripAndGNUTarAgrees() throws {
        let directory = Harness.scratch("tar")
        let path = directory + "/a.tar"
        let long = "checkpoint/" + String(repeating: "x", count: 140) + ".img"
        let contents: [(String, Data)] = [("config.dump", Data("{}".utf8)), (long, Data((0..<1500).map { UInt8($0 % 251) })), ("empty", Data())]
        let fd = try FileDescriptor.open(path, .writeOnly, options: [.create, .exclusiveCreate], permissions: .ownerReadWrite)
        var writer = Tar.Writer(fd: fd, path: path)
        try writer.directory("checkpoint/")
        for (name, data) in contents { try writer.file(name, contents: data) }
        try writer.finish()
        fd.closeQuietly()
        let listing = try Harness.run("/bin/tar", ["-tf", path]).stdout.split(separator: "\n").map(String.init)
        #expect(listing == ["checkpoint/"] + contents.map(\.0))
        let readFD = try FileDescriptor.open(path, .readOnly)
        defer { readFD.closeQuietly() }
        let reader = Tar.Reader(fd: readFD, path: path)
        var read: [(String, Data)] = []
        while let entry = try reader.next() {
            if entry.isFile { read.append((entry.name, try reader.readAll())) }
        }
        #expect(read.map(\.0) == contents.map(\.0) && read.map(\.1) == contents.map(\.1))

        // GNU tar's own format carries long names in "././@LongLink" entries: they come back whole too.
        let source = directory + "/gnu"
        try FileManager.default.createDirectory(atPath: source, withIntermediateDirectories: true)
        let longFile = String(repeating: "y", count: 150) + ".img"
        try Data("long".utf8).write(to: URL(fileURLWithPath: source + "/" + longFile))
        #expect(try Harness.run("/bin/tar", ["--format=gnu", "-cf", directory + "/gnu.tar", "-C", source, longFile]).succeeded)
        let gnuFD = try FileDescriptor.open(directory + "/gnu.tar", .readOnly)
        defer { gnuFD.closeQuietly() }
        let gnuReader = Tar.Reader(fd: gnuFD, path: directory + "/gnu.tar")
        let gnuEntry = try #require(try gnuReader.next())
        let gnuContents = try gnuReader.readAll()
        #expect(gnuEntry.name == longFile && String(decoding: gnuContents, as: UTF8.self) == "long")

        // One flipped byte in a header: its checksum no longer matches.
        let bytes = NSMutableData(contentsOfFile: path)!
        bytes.mutableBytes.storeBytes(of: UInt8(ascii: "Z"), toByteOffset: 2, as: UInt8.self)
        bytes.write(toFile: path, atomically: true)
        let again = try FileDescriptor.open(path, .readOnly)
        defer { again.closeQuietly() }
        #expect(throws: StasisError.self) { _ = try Tar.Reader(fd: again, path: path).next() }
    }
}
