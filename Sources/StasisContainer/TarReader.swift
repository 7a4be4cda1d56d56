import Foundation
import StasisCore
import StasisOS

extension Tar {
    /// What a reader accepts. An archive comes from elsewhere and a compressed one can expand a thousandfold,
    /// so every part of it that a reader holds or works through per byte has a bound, each far above what a
    /// checkpoint archive (CRIU's images, a few JSON files, the engine's own files) ever needs.
    public enum Limits {
        /// The longest entry name: PATH_MAX, since an imported entry's name becomes a path.
        public static let nameBytes = 4096
        /// One pax or GNU long-name header's records: writers put a path, a size, times and attributes there
        /// (xattrs, SELinux labels), well under a KiB; 1 MiB leaves room for many attributes.
        public static let extendedHeaderBytes: UInt64 = 1 << 20
        /// Extended headers before one entry: writers put one pax header ('x'), one GNU long name ('L') and
        /// one long link name ('K') there at most, and rarely a global one ('g'). A later one replaces an
        /// earlier one of its kind; more than this many are refused.
        public static let extendedHeadersPerEntry = 4
        /// Entries in an archive, the tars inside it included (containerd's image holds CRIU's tar): CRIU
        /// writes about ten images per process and one per thread, so this is thousands of processes.
        public static let entries = 100_000
        /// Extended headers' bytes in an archive, nested tars included: real archives have under a few hundred
        /// bytes per entry, and this bounds the parsing an archive can ask for (640 bytes for each entry).
        public static let extendedHeaderBytesPerArchive: UInt64 = 64 << 20
        /// A file read whole (config.dump, spec.dump, an OCI index): their JSON is a few KiB, and parsing
        /// takes many times the bytes in memory, so more is refused.
        public static let smallFileBytes: UInt64 = 1 << 20
        /// The largest entry (1 PiB, as Manifest.maxFileBytes): sizes stay far from overflowing any offset.
        public static let entryBytes: UInt64 = 1 << 50
        /// What may follow the end-of-archive blocks (read, so that a decoder checks all of its stream, and
        /// ignored): tar pads to its record size (10 KiB by default, a few MiB with a large -b), and a
        /// stream of concatenated frames may carry more; beyond this the archive is refused.
        public static let trailingBytes: UInt64 = 16 << 20
    }

    /// What an archive has used of `Limits`, shared by its reader and the readers of tars inside its entries.
    final class Budget {
        var entries = 0
        var extendedHeaderBytes: UInt64 = 0
    }

    static let craftedHint = "the archive is damaged, or was made to exhaust its reader: no container engine writes this"

    /// Reads entries from a file descriptor, front to back, within `Limits`.
    public final class Reader {
        public struct Entry {
            public var name: String
            public var size: UInt64
            /// "0" a file, "5" a directory, anything else is skipped by readers of checkpoint archives.
            public var type: Character
            public var isFile: Bool { type == "0" || type == "\0" }
        }

        /// Where the bytes come from: a descriptor (a file, which is sought in, or a pipe), or the current
        /// entry of another reader (a tar inside a tar, as containerd's checkpoint images hold CRIU's images).
        enum Source {
            case descriptor(FileDescriptor)
            case entry(Reader)
            case bytes(Data)
        }

        let source: Source
        let path: String
        let budget: Budget
        /// How far a `.bytes` source has been read.
        private var offset = 0
        private var left: UInt64 = 0  // bytes of the current entry not read yet, padding excluded
        private var padding: UInt64 = 0
        /// Whether the end-of-archive block was read.
        public private(set) var reachedEnd = false
        /// Where skipped bytes go when they must be read through (a pipe, an outer entry): one buffer, reused.
        private var scratch: UnsafeMutableRawBufferPointer?

        public init(fd: FileDescriptor, path: String) {
            source = .descriptor(fd)
            self.path = path
            budget = Budget()
        }

        /// Reads the tar that is `outer`'s current entry (`path` names it in errors), within `outer`'s limits.
        public init(entryOf outer: Reader, path: String) {
            source = .entry(outer)
            self.path = path
            budget = outer.budget
        }

        /// Reads a tar held in memory (a small blob of an image), within the limits of `archive` when given.
        public init(data: Data, path: String, within archive: Reader? = nil) {
            source = .bytes(data)
            self.path = path
            budget = archive?.budget ?? Budget()
        }

        deinit { scratch?.deallocate() }

        /// The next entry, or nil at the archive's end marker (whatever of the current one was not read is
        /// skipped); an archive that stops without that marker is refused as truncated, one beyond `Limits`
        /// as such.
        public func next() throws -> Entry? {
            guard !reachedEnd else { return nil }
            try skip(left + padding)
            left = 0
            padding = 0
            var extended = Extended()
            var block = [UInt8](repeating: 0, count: Tar.block)
            while true {
                // An archive ends with a block of zeros: one that just stops was cut short.
                guard try readExactly(&block) else { throw StasisError(.integrity, "\(path) is truncated (it has no end-of-archive block)") }
                if block.allSatisfy({ $0 == 0 }) {
                    reachedEnd = true
                    return nil
                }
                try Tar.checkHeader(block, archive: path)
                let type = block[156]
                if Tar.extendedHeaderTypes.contains(type) {
                    try readExtendedHeader(type: type, size: Tar.number(block[124..<136]), into: &extended)
                    continue
                }
                return try entry(block, extended: extended)
            }
        }

        /// The entry `block` heads, with what its extended headers said.
        private func entry(_ block: [UInt8], extended: Extended) throws -> Entry {
            budget.entries += 1
            guard budget.entries <= Limits.entries else {
                throw StasisError(.integrity, "\(path) holds more than \(Limits.entries) entries, more than any checkpoint archive", hint: Tar.craftedHint)
            }
            var name = extended.paxPath ?? extended.longName ?? Tar.ustarName(block)
            try Tar.checkName(name, archive: path)
            let size = extended.paxSize ?? Tar.number(block[124..<136])
            // Base-256 and pax sizes reach 2^64: refused far below, so no offset arithmetic can overflow.
            guard size <= Limits.entryBytes else {
                throw StasisError(.integrity, "\(path): \(ArchiveText.quoted(name)) claims \(size) bytes, more than any checkpoint archive holds")
            }
            left = size
            padding = Tar.padding(size)
            if name.hasPrefix("./") { name.removeFirst(2) }
            return Entry(name: name, size: size, type: Character(UnicodeScalar(block[156])))
        }

        /// What the extended headers before an entry said: each kind replaces what an earlier one of its kind said.
        struct Extended {
            var count = 0
            var paxPath: String?
            var paxSize: UInt64?
            var longName: String?
        }

        /// Reads a pax header ('x', or a global 'g', whose records are not needed), or GNU's long name ('L')
        /// or long link name ('K'), of `size` bytes, within `Limits`.
        private func readExtendedHeader(type: UInt8, size: UInt64, into extended: inout Extended) throws {
            extended.count += 1
            guard extended.count <= Limits.extendedHeadersPerEntry else {
                throw StasisError(.integrity, "\(path) has more than \(Limits.extendedHeadersPerEntry) pax or long-name headers in a row", hint: Tar.craftedHint)
            }
            guard size <= Limits.extendedHeaderBytes else {
                throw StasisError(.integrity, "\(path) has a pax or long-name header of \(size) bytes (at most \(Limits.extendedHeaderBytes >> 20) MiB are read)",
                                  hint: Tar.craftedHint)
            }
            budget.extendedHeaderBytes += size
            guard budget.extendedHeaderBytes <= Limits.extendedHeaderBytesPerArchive else {
                throw StasisError(.integrity, "\(path) has more than \(Limits.extendedHeaderBytesPerArchive >> 20) MiB of pax and long-name headers",
                                  hint: Tar.craftedHint)
            }
            var records = [UInt8](repeating: 0, count: Int(size))
            if size > 0 {
                guard try readExactly(&records) else { throw StasisError(.integrity, "\(path) ends inside a pax header") }
            }
            try skip(Tar.padding(size))
            switch type {
            case UInt8(ascii: "x"):
                let pax = try Tar.paxRecords(records, archive: path)
                extended.paxPath = pax.path
                extended.paxSize = pax.size
            case UInt8(ascii: "L"):
                extended.longName = String(decoding: records.prefix { $0 != 0 }, as: UTF8.self)
            default:
                break
            }
        }

        /// Reads up to `buffer.count` bytes of the current entry; 0 at its end.
        public func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
            let want = Int(min(UInt64(buffer.count), left))
            guard want > 0 else { return 0 }
            let got = try fill(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<want]))
            if got < want { throw StasisError(.integrity, "\(path) ends inside an entry (truncated)") }
            left -= UInt64(got)
            return got
        }

        /// The whole of a small entry (a JSON file), refused above `Limits.smallFileBytes`.
        public func readAll() throws -> Data {
            guard left <= Limits.smallFileBytes else {
                throw StasisError(.integrity, "\(path): an entry of \(left) bytes where a small file (at most \(Limits.smallFileBytes >> 20) MiB) was expected",
                                  hint: Tar.craftedHint)
            }
            var data = Data(count: Int(left))
            let count = data.count
            _ = try data.withUnsafeMutableBytes { try read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<count])) }
            return data
        }

        /// Fills `buffer` unless the source ends first; returns the bytes read.
        private func fill(_ buffer: UnsafeMutableRawBufferPointer) throws -> Int {
            switch source {
            case .bytes(let data):
                let count = min(buffer.count, data.count - offset)
                guard count > 0 else { return 0 }
                data.withUnsafeBytes { bytes in
                    buffer.baseAddress!.copyMemory(from: bytes.baseAddress! + offset, byteCount: count)
                }
                offset += count
                return count
            case .descriptor(let fd):
                return try attempt("cannot read", path) { try fd.read(filling: buffer) }
            case .entry(let outer):
                var done = 0
                while done < buffer.count {
                    let got = try outer.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]))
                    if got == 0 { break }
                    done += got
                }
                return done
            }
        }

        private func readExactly(_ buffer: inout [UInt8]) throws -> Bool {
            let got = try buffer.withUnsafeMutableBytes { try fill($0) }
            if got == 0 { return false }
            if got < buffer.count { throw StasisError(.integrity, "\(path) is truncated") }
            return true
        }

        /// Passes over `count` bytes nobody reads: sought past in a file, else read through one reused buffer.
        private func skip(_ count: UInt64) throws {
            guard count > 0 else { return }
            guard count <= Limits.entryBytes + UInt64(Tar.block) else { throw StasisError(.integrity, "\(path): an entry of \(count) bytes") }
            // A file seeks past it; a pipe (ESPIPE) or an outer entry is read through.
            if case .descriptor(let fd) = source, (try? fd.seek(offset: Int64(count), from: .current)) != nil { return }
            let buffer = scratch ?? UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 4096)
            scratch = buffer
            var rest = count
            while rest > 0 {
                let want = Int(min(UInt64(buffer.count), rest))
                let n = try fill(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<want]))
                if n < want { throw StasisError(.integrity, "\(path) is truncated") }
                rest -= UInt64(n)
            }
        }
    }

    /// pax headers ('x', 'g') and GNU's long name and long link name ('L', 'K'): metadata for the next entry.
    static let extendedHeaderTypes: Set<UInt8> = [UInt8(ascii: "x"), UInt8(ascii: "g"), UInt8(ascii: "L"), UInt8(ascii: "K")]

    /// Bytes of zeros after `size` bytes of contents, to the next block.
    static func padding(_ size: UInt64) -> UInt64 { (UInt64(block) - size % UInt64(block)) % UInt64(block) }

    /// Refuses a block that is not a ustar header, or whose checksum does not match.
    static func checkHeader(_ header: [UInt8], archive: String) throws {
        guard header[257] == UInt8(ascii: "u"), header[258..<262].elementsEqual("star".utf8) else {
            throw StasisError(.notACheckpoint, "\(archive) is not a tar archive (or is damaged)")
        }
        let expected = number(header[148..<156])
        // The checksum counts its own field as spaces.
        var sum: UInt64 = 8 * UInt64(UInt8(ascii: " "))
        header.withUnsafeBufferPointer { bytes in
            var index = 0
            while index < block {
                if index < 148 || index >= 156 { sum += UInt64(bytes[index]) }
                index += 1
            }
        }
        guard sum == expected else { throw StasisError(.integrity, "\(archive): a damaged tar header") }
    }

    /// The name a ustar header holds: its name field, behind its prefix field in POSIX ustar (GNU's "ustar  "
    /// header has other fields there).
    static func ustarName(_ header: [UInt8]) -> String {
        let name = String(decoding: header[0..<100].prefix { $0 != 0 }, as: UTF8.self)
        guard header[257..<265].elementsEqual("ustar\u{0}00".utf8) else { return name }
        let prefix = String(decoding: header[345..<500].prefix { $0 != 0 }, as: UTF8.self)
        return prefix.isEmpty ? name : prefix + "/" + name
    }

    /// Refuses a name longer than PATH_MAX. (A ustar or GNU name ends at its first NUL; a pax path holding one
    /// is refused where it is read.)
    static func checkName(_ name: String, archive: String) throws {
        guard name.utf8.count <= Limits.nameBytes else {
            throw StasisError(.integrity, "\(archive) names an entry of \(name.utf8.count) bytes, \(ArchiveText.quoted(name)) (at most \(Limits.nameBytes))",
                              hint: craftedHint)
        }
    }

    /// Whether `bytes` holds a NUL (a plain loop: generic searches are slow in debug builds).
    static func containsNUL(_ bytes: ArraySlice<UInt8>) -> Bool {
        bytes.withUnsafeBufferPointer { buffer in
            var index = 0
            while index < buffer.count {
                if buffer[index] == 0 { return true }
                index += 1
            }
            return false
        }
    }

    /// The records of a pax header that a reader uses ("path" and "size"). Each record is "LENGTH KEY=VALUE\n",
    /// LENGTH counting the whole record: one of another shape is refused (it would shift every later one).
    /// A path longer than `Limits.nameBytes` is refused before it is made a String.
    public static func paxRecords(_ bytes: [UInt8], archive: String) throws -> (path: String?, size: UInt64?) {
        var path: String?
        var size: UInt64?
        var at = 0
        func damaged(_ what: String) -> StasisError {
            StasisError(.integrity, "\(archive) has a damaged pax header (\(what) at byte \(at))", hint: craftedHint)
        }
        while at < bytes.count, bytes[at] != 0 {  // NULs after the last record are padding
            // LENGTH: at most 7 digits, since a header holds at most 1 MiB.
            var length = 0
            var cursor = at
            while cursor < bytes.count, cursor - at < 8, let digit = decimalDigit(bytes[cursor]) {
                length = length * 10 + digit
                cursor += 1
            }
            guard cursor > at, cursor < bytes.count, bytes[cursor] == UInt8(ascii: " ") else { throw damaged("a record without its length") }
            let end = at + length
            guard length > cursor - at + 1, end <= bytes.count, bytes[end - 1] == UInt8(ascii: "\n") else {
                throw damaged("a record whose length does not match")
            }
            let body = bytes[(cursor + 1)..<(end - 1)]
            guard let equals = body.firstIndex(of: UInt8(ascii: "=")), equals > body.startIndex else { throw damaged("a record without a key") }
            let key = body[body.startIndex..<equals]
            let value = body[(equals + 1)...]
            if key.elementsEqual("path".utf8) {
                guard value.count <= Limits.nameBytes else {
                    throw StasisError(.integrity, "\(archive) names an entry of \(value.count) bytes in a pax header (at most \(Limits.nameBytes))",
                                      hint: craftedHint)
                }
                // A NUL would cut the name short where it names a file.
                guard !containsNUL(value) else {
                    throw StasisError(.integrity, "\(archive) names an entry holding NUL in a pax header", hint: craftedHint)
                }
                // An empty value takes the keyword back: the header's own name then holds.
                path = value.isEmpty ? nil : String(decoding: value, as: UTF8.self)
            } else if key.elementsEqual("size".utf8) {
                guard value.count <= 20, let number = UInt64(String(decoding: value, as: UTF8.self)) else {
                    throw StasisError(.integrity, "\(archive): a pax size \(ArchiveText.quoted(String(decoding: value.prefix(40), as: UTF8.self))) that is not a number",
                                      hint: craftedHint)
                }
                size = number
            }
            at = end
        }
        return (path, size)
    }

    private static func decimalDigit(_ byte: UInt8) -> Int? {
        byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") ? Int(byte - UInt8(ascii: "0")) : nil
    }
}
