import Foundation
import Glibc
import StasisCore
import StasisOS
import Testing

@Suite struct SpawnedChildren {
    /// A descriptor opened without close-on-exec (as Foundation's pipes are) stays out of a spawned child:
    /// a daemon the child leaves behind would otherwise hold it open for ever.
    @Test func aChildInheritsOnlyTheDescriptorsItIsGiven() throws {
        var ends: [Int32] = [0, 0]
        #expect(pipe(&ends) == 0)
        defer { close(ends[0]); close(ends[1]) }
        let (readEnd, writeEnd) = try FileDescriptor.makePipe()
        defer { readEnd.closeQuietly() }
        let pid = try Spawn.start("/bin/sh", ["-c", "ls /proc/self/fd"], descriptors: [writeEnd: 1])
        writeEnd.closeQuietly()
        let listing = FileHandle(fileDescriptor: readEnd.rawValue, closeOnDealloc: false).readDataToEndOfFile()
        #expect(Spawn.wait(pid) == 0)
        let inherited = String(decoding: listing, as: UTF8.self).split(separator: "\n").compactMap { Int32($0) }
        // 0, 1, 2, and the descriptor ls itself opens for /proc/self/fd.
        #expect(!inherited.contains(ends[0]) && !inherited.contains(ends[1]), "the child got \(inherited), the leaky pipe is \(ends)")
        #expect(inherited.filter { $0 > 2 }.count <= 1, "\(inherited)")
    }
}

@Suite struct TLSIdentities {
    @Test func fingerprintsReadAsPrintedByStasisAndByOpenSSL() throws {
        let hex = String(repeating: "ab", count: 32)
        let colons = stride(from: 0, to: 64, by: 2).map { String(hex.uppercased().dropFirst($0).prefix(2)) }.joined(separator: ":")
        #expect(try TLSFingerprint.parse("sha256:" + hex) == [UInt8](repeating: 0xab, count: 32))
        #expect(try TLSFingerprint.parse(colons) == [UInt8](repeating: 0xab, count: 32))
        for bad in ["", "sha256:", String(hex.dropLast(2)), hex + "00", "sha256:" + String(hex.dropLast()) + "g"] {
            #expect(throws: StasisError.self) { try TLSFingerprint.parse(bad) }
        }
    }

    /// A generated identity: its key 0600, never replaced, and its fingerprint the certificate's.
    @Test func anIdentityIsMadeOnceWithAPrivateKey() throws {
        let directory = NSTemporaryDirectory() + "stasis-tls-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let now = Date()
        let fingerprint = try TLSConfiguration.generate(in: directory, name: "test", validity: now...now.addingTimeInterval(3600))
        #expect(try TLSFingerprint.of(certificate: directory + "/cert.pem") == fingerprint)
        let key = try #require(try FileSystem.status(directory + "/key.pem"))
        #expect(key.permissions & 0o777 == 0o600)
        #expect(throws: StasisError.self) { try TLSConfiguration.generate(in: directory, name: "test", validity: now...now.addingTimeInterval(3600)) }
        #expect(try TLSFingerprint.of(certificate: directory + "/cert.pem") == fingerprint, "the first identity is kept")
        // A configuration names whom to accept, and refuses a key others can read.
        #expect(throws: StasisError.self) { try TLSConfiguration(directory: directory, pinned: [], caFile: nil) }
        _ = try TLSConfiguration(directory: directory, pinned: [fingerprint], caFile: nil)
        chmod(directory + "/key.pem", 0o644)
        #expect(throws: StasisError.self) { try TLSConfiguration(directory: directory, pinned: [fingerprint], caFile: nil) }
    }
}
