import Foundation
import Glibc
import StasisCore
import StasisCRIU
import StasisOS
import Testing

/// The page server as the receiving end of CRIU's page-server protocol, spoken here by the test the way
/// CRIU 4.2 speaks it (real CRIU drives it in every integration dump): what it writes, and input no CRIU
/// sends, which must end the session with an error, never a crash or a hang.
@Suite struct CRIUPageServerProtocol {
    /// What the sink was given: bytes per pages image, and the images ended.
    final class Collected: @unchecked Sendable {
        let bytes = Locked<[String: [UInt8]]>([:])
        let ended = Locked<[String]>([])
        var sink: CRIUPageServer.Sink {
            .init(receive: { name, source, count in
                var buffer = [UInt8](repeating: 0, count: count)
                let got = try buffer.withUnsafeMutableBytes { try source.read(filling: $0) }
                guard got == count else { throw StasisError(.io, "short") }
                self.bytes.withLock { $0[name, default: []] += buffer }
            }, end: { name in self.ended.withLock { $0.append(name) } })
        }
    }

    static func header(_ command: UInt32, flags: UInt32 = 0, pages: UInt64 = 0, address: UInt64 = 0, destination: UInt64 = 0) -> [UInt8] {
        func le(_ value: UInt64, _ count: Int) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) } }
        return le(UInt64(flags << 16 | command), 4) + [0, 0, 0, 0] + le(pages, 8) + le(address, 8) + le(destination, 8)
    }

    static func scratch() throws -> String {
        let directory = "/tmp/stasis-page-server-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileSystem.makeDirectory(directory)
        return directory
    }

    @Test func aSessionBecomesCRIUsImages() throws {
        let directory = try Self.scratch()
        defer { FileSystem.removeTree(directory) }
        let collected = Collected()
        let server = try CRIUPageServer(imagesDirectory: directory, sink: collected.sink)
        let criu = server.descriptorForCRIU()
        defer { criu.closeQuietly() }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let data = (0..<(2 * page)).map { UInt8(truncatingIfNeeded: $0 * 7) }

        try criu.write(all: Self.header(4, destination: 42 << 8 | 1))  // OPEN2 pagemap-42
        var hasParent = [UInt8](repeating: 9, count: 1)
        #expect(try hasParent.withUnsafeMutableBytes { try criu.read(filling: $0) } == 1)
        #expect(hasParent == [0])
        try criu.write(all: Self.header(6, flags: 1 << 2, pages: 2, address: 0x7f00_0000_0000, destination: 42 << 8 | 1) + data)
        try criu.write(all: Self.header(0x1024))  // FORCE_CLOSE
        var status = [UInt8](repeating: 9, count: 4)
        #expect(try status.withUnsafeMutableBytes { try criu.read(filling: $0) } == 4)
        #expect(status == [0, 0, 0, 0])

        #expect(server.finish().isEmpty)
        #expect(server.receivedBytes == UInt64(data.count))
        #expect(collected.bytes.current["pages-1.img"] == data)
        #expect(collected.ended.current == ["pages-1.img"])
        // The common and pagemap magics, pagemap_head { pages_id: 1 }, then the one entry.
        let image = try [UInt8](Data(contentsOf: URL(fileURLWithPath: directory + "/pagemap-42.img")))
        #expect(Array(image[0..<8]) == [0x19, 0x43, 0x56, 0x54, 0x25, 0x40, 0x08, 0x56])
        #expect(Array(image[8..<14]) == [2, 0, 0, 0, 0x08, 0x01])
        let entry = [0x08] + [0x80, 0x80, 0x80, 0x80, 0x80, 0xe0, 0x1f] + [0x10, 0x00, 0x20, 0x04, 0x28, 0x02] as [UInt8]
        #expect(Array(image[14...]) == [UInt8(entry.count), 0, 0, 0] + entry)
        var info = stat()
        #expect(stat(directory + "/pagemap-42.img", &info) == 0 && info.st_mode & 0o777 == 0o600)
    }

    @Test(arguments: [("an unknown command", header(99)),
                      ("a pagemap of no known type", header(4, destination: 7 << 8 | 9)),
                      ("a header cut short", Array(header(4).prefix(20))),
                      ("an entry of no pages", header(6, flags: 1 << 2, pages: 0, destination: 1 << 8 | 1))])
    func inputNoCRIUSendsEndsTheSession(what: String, bytes: [UInt8]) throws {
        let directory = try Self.scratch()
        defer { FileSystem.removeTree(directory) }
        let server = try CRIUPageServer(imagesDirectory: directory, sink: Collected().sink)
        let criu = server.descriptorForCRIU()
        defer { criu.closeQuietly() }
        try criu.write(all: bytes)
        if bytes.count < 32 { criu.shutdown(.writing) }
        // The server hangs up on CRIU (its dump then fails) rather than waiting for more.
        var rest = [UInt8](repeating: 0, count: 64)
        _ = try? rest.withUnsafeMutableBytes { try criu.read(filling: $0) }
        let failures = server.finish()
        #expect(failures.count == 1, "\(what)")
        #expect(failures.first.map { "\($0)".contains("page server") } == true, "\(what): \(failures)")
    }
}
