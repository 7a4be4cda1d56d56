import Foundation
import StasisContainer
import StasisCore
import StasisTestSupport
import Testing

/// The tar reader's bounds (Tar.Limits), on crafted archives held in memory: each is refused with a short
/// message that says what was beyond which bound, and what is inside them still reads.
@Suite struct TarLimits {
    /// Every entry of `data`, or the error that ended the reading.
    static func entries(_ data: Data) -> Result<[Tar.Reader.Entry], StasisError> {
        let reader = Tar.Reader(data: data, path: "crafted.tar")
        var entries: [Tar.Reader.Entry] = []
        do {
            while let entry = try reader.next() { entries.append(entry) }
            return .success(entries)
        } catch {
            return .failure(error as! StasisError)
        }
    }

    /// The error reading `data` ends in; a message quoting a whole crafted name would be megabytes long.
    static func refusal(_ data: Data) throws -> StasisError {
        guard case .failure(let error) = entries(data) else {
            Issue.record("the crafted archive was read whole")
            throw StasisError(.io, "read whole")
        }
        #expect(error.description.utf8.count < 1000, "an error of \(error.description.utf8.count) bytes")
        return error
    }

    @Test func consecutivePaxHeadersAreBoundedAndTheLastOneHolds() throws {
        // Two in a row (a writer's pax header, then another): the later replaces the earlier, nothing accumulates.
        let two = TarBlocks.paxHeader(TarBlocks.paxRecord("path", "first-name")) + TarBlocks.paxHeader(TarBlocks.paxRecord("path", "second-name"))
            + TarBlocks.file("short", Data("x".utf8)) + TarBlocks.end
        let read = try Self.entries(two).get()
        #expect(read.map(\.name) == ["second-name"])

        let chain = (0..<(Tar.Limits.extendedHeadersPerEntry + 1)).reduce(Data()) { data, index in
            data + TarBlocks.paxHeader(TarBlocks.paxRecord("comment", "header \(index)"))
        } + TarBlocks.file("x", Data()) + TarBlocks.end
        let error = try Self.refusal(chain)
        #expect(error.message.contains("pax or long-name headers in a row"), "\(error)")
    }

    @Test func aHugePaxHeaderIsRefusedBeforeItIsRead() throws {
        // The size field alone says it: the archive need not hold the bytes.
        let huge = TarBlocks.header(name: "PaxHeaders/x", size: .octal(Tar.Limits.extendedHeaderBytes + 1), type: "x") + TarBlocks.end
        let error = try Self.refusal(huge)
        #expect(error.message.contains("pax or long-name header of \(Tar.Limits.extendedHeaderBytes + 1) bytes"), "\(error)")
        // A GNU long name too.
        let long = TarBlocks.header(name: "././@LongLink", size: .octal(16 << 20), type: "L") + TarBlocks.end
        #expect(try Self.refusal(long).message.contains("long-name header"))
    }

    @Test func namesLongerThanPathMaxAreRefusedAndQuotedShort() throws {
        let name = "checkpoint/" + String(repeating: "n", count: Tar.Limits.nameBytes)
        let pax = TarBlocks.paxHeader(TarBlocks.paxRecord("path", name)) + TarBlocks.file("x", Data()) + TarBlocks.end
        #expect(try Self.refusal(pax).message.contains("at most \(Tar.Limits.nameBytes)"))
        let gnu = TarBlocks.header(name: "././@LongLink", size: .octal(UInt64(name.utf8.count + 1)), type: "L")
            + TarBlocks.padded(Data(name.utf8) + Data([0])) + TarBlocks.file("x", Data()) + TarBlocks.end
        let error = try Self.refusal(gnu)
        #expect(error.message.contains("\(name.utf8.count) bytes") && error.message.contains("'..."), "\(error)")
        // Exactly PATH_MAX is a name.
        let longest = String(repeating: "m", count: Tar.Limits.nameBytes)
        let fits = TarBlocks.paxHeader(TarBlocks.paxRecord("path", longest)) + TarBlocks.file("x", Data()) + TarBlocks.end
        #expect(try Self.entries(fits).get().map(\.name) == [longest])
    }

    @Test func aNameHoldingNULIsRefused() throws {
        let pax = TarBlocks.paxHeader(TarBlocks.paxRecord("path", Data("checkpoint/a".utf8) + Data([0]) + Data("/../../b".utf8)))
            + TarBlocks.file("x", Data()) + TarBlocks.end
        #expect(try Self.refusal(pax).message.contains("NUL"))
    }

    @Test func damagedPaxRecordsAreRefused() throws {
        let cases: [Data] = [
            Data("9999 path=x\n".utf8),          // a length beyond the header
            Data("5 path=abcdef\n".utf8),        // a length that does not end at a newline
            Data("path=abc\n".utf8),             // no length
            Data("12 pathabcd\n".utf8),          // no '='
            Data("0 x=y\n".utf8),                // a length of nothing
            TarBlocks.paxRecord("size", "12abc"), // a size that is not a number
        ]
        for records in cases {
            let error = try Self.refusal(TarBlocks.paxHeader(records) + TarBlocks.file("x", Data()) + TarBlocks.end)
            #expect(error.message.contains("pax"), "\(String(decoding: records, as: UTF8.self)): \(error)")
        }
        // NULs after the last record are padding, and other keys are passed over.
        let padded = TarBlocks.paxRecord("mtime", "1.5") + TarBlocks.paxRecord("path", "p") + Data(count: 7)
        #expect(try Self.entries(TarBlocks.paxHeader(padded) + TarBlocks.file("x", Data()) + TarBlocks.end).get().map(\.name) == ["p"])
    }

    @Test func theEntriesOfAnArchiveAreCounted() throws {
        let entry = TarBlocks.file("checkpoint/pages-1.img", Data())
        var data = Data(capacity: entry.count * (Tar.Limits.entries + 1) + 1024)
        for _ in 0...Tar.Limits.entries { data += entry }
        data += TarBlocks.end
        #expect(try Self.refusal(data).message.contains("more than \(Tar.Limits.entries) entries"))
    }

    @Test func theExtendedHeadersOfAnArchiveAreCounted() throws {
        // Each header under its own bound, four before each entry: the archive's total is what ends it.
        let record = TarBlocks.paxRecord("comment", String(repeating: "c", count: Int(Tar.Limits.extendedHeaderBytes) - 64))
        let perEntry = (0..<Tar.Limits.extendedHeadersPerEntry).reduce(Data()) { data, _ in data + TarBlocks.paxHeader(record) }
            + TarBlocks.file("x", Data())
        let entriesNeeded = Int(Tar.Limits.extendedHeaderBytesPerArchive / UInt64(record.count)) / Tar.Limits.extendedHeadersPerEntry + 1
        var data = Data()
        for _ in 0..<entriesNeeded { data += perEntry }
        data += TarBlocks.end
        #expect(try Self.refusal(data).message.contains("MiB of pax and long-name headers"))
    }

    @Test func aSmallFileReadWholeIsBounded() throws {
        let data = TarBlocks.header(name: "config.dump", size: .octal(Tar.Limits.smallFileBytes + 1), type: "0") + TarBlocks.end
        let reader = Tar.Reader(data: data, path: "crafted.tar")
        _ = try reader.next()
        #expect(throws: StasisError.self) { _ = try reader.readAll() }
    }

    @Test func archiveTextIsQuotedShortAndEscaped() {
        #expect(ArchiveText.quoted("a\nb\u{1B}[31m\u{202E}c") == #"'a\nb\u{1B}[31m\u{202E}c'"#)
        let long = ArchiveText.quoted(String(repeating: "x", count: 10_000))
        #expect(long.count < 260 && long.hasSuffix("(10000 bytes in all)"), "\(long)")
        #expect(!ArchiveText.hasHostileCharacters("checkpoint/pages-1.img") && !ArchiveText.hasHostileCharacters("é日本"))
        for hostile in ["a\u{0}", "a\n", "\u{7F}", "\u{85}", "\u{202A}", "x\u{202E}y", "\u{2066}", "\u{2069}"] {
            #expect(ArchiveText.hasHostileCharacters(hostile), "\(hostile.unicodeScalars.map { $0.value })")
        }
    }

    @Test func containerIDsThatNameAnotherPathOrPrintAsAnotherAreRefused() {
        for id in ["0123456789abcdef", "magical_test", "a.b-c"] {
            #expect(throws: Never.self) { try ArchiveText.checkContainerID(id, archive: "a.tar") }
        }
        for id in ["", ".", "..", "../x", "a/b", "a\u{0}b", "a\nb", "id\u{202E}fdp.exe", "a\u{2067}b", "\u{1B}[2J"] {
            #expect(throws: StasisError.self, "\(id.unicodeScalars.map { $0.value })") { try ArchiveText.checkContainerID(id, archive: "a.tar") }
        }
    }
}
