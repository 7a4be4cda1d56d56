import Foundation
import StasisCore
import StasisOS

/// The tar format that container checkpoint archives use (POSIX ustar, with pax headers for what ustar cannot
/// hold: sizes of 8 GiB and more, names of more than 100 bytes). Only what those archives need: regular files
/// and directories, streamed, so that memory stays bounded whatever the size.
public enum Tar {
    static let block = 512

    /// Writes entries to a file descriptor, front to back.
    public struct Writer {
        let fd: FileDescriptor
        let path: String
        public private(set) var bytes: UInt64 = 0

        public init(fd: FileDescriptor, path: String) {
            self.fd = fd
            self.path = path
        }

        public mutating func directory(_ name: String) throws {
            try header(name.hasSuffix("/") ? name : name + "/", size: 0, type: "5", mode: 0o700)
        }

        public mutating func file(_ name: String, contents: Data) throws {
            try header(name, size: UInt64(contents.count), type: "0", mode: 0o600)
            try contents.withUnsafeBytes { try write($0) }
            try pad(UInt64(contents.count))
        }

        /// A file of `size` bytes whose contents `fill` writes to the descriptor it is given (exactly `size`).
        public mutating func file(_ name: String, size: UInt64, fill: (FileDescriptor) throws -> UInt64) throws {
            try header(name, size: size, type: "0", mode: 0o600)
            let written = try fill(fd)
            guard written == size else { throw StasisError(.io, "\(path): \(name) gave \(written) bytes, \(size) expected") }
            bytes += written
            try pad(size)
        }

        /// The two empty blocks that end an archive.
        public mutating func finish() throws {
            try write([UInt8](repeating: 0, count: 2 * Tar.block))
        }

        private mutating func header(_ name: String, size: UInt64, type: Character, mode: Int) throws {
            let nameBytes = Array(name.utf8)
            // What ustar cannot hold goes first, in a pax header for the entry.
            var pax: [(String, String)] = []
            if nameBytes.count > 100 { pax.append(("path", name)) }
            if size > 0o77777777777 { pax.append(("size", String(size))) }
            if !pax.isEmpty {
                var records = Data()
                for (key, value) in pax {
                    // "LEN key=value\n", LEN counting itself.
                    let body = " \(key)=\(value)\n"
                    var length = body.utf8.count + 1
                    while String(length).utf8.count + body.utf8.count > length { length += 1 }
                    records.append(contentsOf: Array((String(length) + body).utf8))
                }
                try write(Tar.headerBlock(name: "PaxHeaders/" + String(name.prefix(80)), size: UInt64(records.count), type: "x", mode: 0o600))
                try records.withUnsafeBytes { try write($0) }
                try pad(UInt64(records.count))
            }
            try write(Tar.headerBlock(name: String(decoding: nameBytes.prefix(100), as: UTF8.self), size: min(size, 0o77777777777), type: type, mode: mode))
        }

        private mutating func pad(_ size: UInt64) throws {
            let rest = Int(size % UInt64(Tar.block))
            if rest > 0 { try write([UInt8](repeating: 0, count: Tar.block - rest)) }
        }

        private mutating func write(_ data: [UInt8]) throws {
            try data.withUnsafeBytes { try write($0) }
        }

        private mutating func write(_ buffer: UnsafeRawBufferPointer) throws {
            try attempt("cannot write", path) { try fd.write(all: buffer) }
            bytes += UInt64(buffer.count)
        }
    }

    static func headerBlock(name: String, size: UInt64, type: Character, mode: Int) -> [UInt8] {
        var block = [UInt8](repeating: 0, count: Tar.block)
        func put(_ text: String, at offset: Int, width: Int) {
            for (index, byte) in text.utf8.prefix(width).enumerated() { block[offset + index] = byte }
        }
        func octal(_ value: UInt64, at offset: Int, width: Int) {
            put(String(repeating: "0", count: max(0, width - 1 - String(value, radix: 8).count)) + String(value, radix: 8), at: offset, width: width - 1)
        }
        put(name, at: 0, width: 100)
        octal(UInt64(mode), at: 100, width: 8)
        octal(0, at: 108, width: 8)
        octal(0, at: 116, width: 8)
        octal(size, at: 124, width: 12)
        octal(UInt64(Date().timeIntervalSince1970), at: 136, width: 12)
        put("        ", at: 148, width: 8)
        block[156] = type.asciiValue ?? UInt8(ascii: "0")
        put("ustar", at: 257, width: 6)
        put("00", at: 263, width: 2)
        let sum = block.reduce(0) { $0 + UInt64($1) }
        put(String(repeating: "0", count: max(0, 6 - String(sum, radix: 8).count)) + String(sum, radix: 8), at: 148, width: 6)
        block[154] = 0
        block[155] = UInt8(ascii: " ")
        return block
    }

    /// Reads entries from a file descriptor, front to back.
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
        /// How far a `.bytes` source has been read.
        private var offset = 0
        private var left: UInt64 = 0  // bytes of the current entry not read yet, padding excluded
        private var padding: UInt64 = 0

        public init(fd: FileDescriptor, path: String) {
            source = .descriptor(fd)
            self.path = path
        }

        /// Reads the tar that is `outer`'s current entry (`path` names it in errors).
        public init(entryOf outer: Reader, path: String) {
            source = .entry(outer)
            self.path = path
        }

        /// Reads a tar held in memory (a small blob of an image).
        public init(data: Data, path: String) {
            source = .bytes(data)
            self.path = path
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

        /// The next entry, or nil at the archive's end marker (whatever of the current one was not read is
        /// skipped); an archive that stops without that marker is refused as truncated.
        public func next() throws -> Entry? {
            try skip(left + padding)
            left = 0
            padding = 0
            var pax: [String: String] = [:]
            var gnuLongName: String?
            while true {
                var block = [UInt8](repeating: 0, count: Tar.block)
                // An archive ends with a block of zeros: one that just stops was cut short.
                guard try readExactly(&block) else { throw StasisError(.integrity, "\(path) is truncated (it has no end-of-archive block)") }
                if block.allSatisfy({ $0 == 0 }) { return nil }
                guard Array(block[257..<262]) == Array("ustar".utf8) else {
                    throw StasisError(.notACheckpoint, "\(path) is not a tar archive (or is damaged)")
                }
                let expected = Tar.number(block[148..<156])
                var copy = block
                for index in 148..<156 { copy[index] = UInt8(ascii: " ") }
                guard copy.reduce(0, { $0 + UInt64($1) }) == expected else {
                    throw StasisError(.integrity, "\(path): a damaged tar header")
                }
                let type = Character(UnicodeScalar(block[156]))
                var name = String(decoding: block[0..<100].prefix { $0 != 0 }, as: UTF8.self)
                // POSIX ustar keeps a name's prefix at 345; GNU's "ustar  " header has other fields there.
                if Array(block[257..<265]) == Array("ustar\u{0}00".utf8) {
                    let prefix = String(decoding: block[345..<500].prefix { $0 != 0 }, as: UTF8.self)
                    if !prefix.isEmpty { name = prefix + "/" + name }
                }
                var size = Tar.number(block[124..<136])
                if type == "x" || type == "g" || type == "L" || type == "K" {
                    // Metadata for the next entry: a pax header, or GNU's long name ("L") or link name ("K").
                    guard size <= Tar.metadataLimit else { throw StasisError(.integrity, "\(path): a header of \(size) bytes") }
                    var records = [UInt8](repeating: 0, count: Int(size))
                    guard try readExactly(&records) else { throw StasisError(.integrity, "\(path) ends inside a pax header") }
                    try skip((UInt64(Tar.block) - size % UInt64(Tar.block)) % UInt64(Tar.block))
                    if type == "x" {
                        for record in String(decoding: records, as: UTF8.self).split(separator: "\n") {
                            // "LENGTH KEY=VALUE": a record whose '=' comes before its space is not one.
                            guard let space = record.firstIndex(of: " "), let equals = record.firstIndex(of: "="), space < equals else { continue }
                            pax[String(record[record.index(after: space)..<equals])] = String(record[record.index(after: equals)...])
                        }
                    } else if type == "L" {
                        gnuLongName = String(decoding: records.prefix { $0 != 0 }, as: UTF8.self)
                    }
                    continue
                }
                if let long = gnuLongName { name = long }
                if let long = pax["path"] { name = long }
                if let long = pax["size"] {
                    guard let value = UInt64(long) else { throw StasisError(.integrity, "\(path): a pax size '\(long.prefix(40))' that is not a number") }
                    size = value
                }
                // Base-256 and pax sizes reach 2^64: refused far below, so no offset arithmetic can overflow.
                guard size <= Tar.maxEntryBytes else {
                    throw StasisError(.integrity, "\(path): \(name.prefix(200)) claims \(size) bytes, more than any checkpoint archive holds")
                }
                left = size
                padding = (UInt64(Tar.block) - size % UInt64(Tar.block)) % UInt64(Tar.block)
                if name.hasPrefix("./") { name.removeFirst(2) }
                return Entry(name: name, size: size, type: type)
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

        /// The whole of a small entry (a JSON file), refused above `Tar.metadataLimit`.
        public func readAll() throws -> Data {
            guard left <= Tar.metadataLimit else { throw StasisError(.integrity, "\(path): an entry of \(left) bytes where a small file was expected") }
            var data = Data(count: Int(left))
            let count = data.count
            _ = try data.withUnsafeMutableBytes { try read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<count])) }
            return data
        }

        private func readExactly(_ buffer: inout [UInt8]) throws -> Bool {
            let got = try buffer.withUnsafeMutableBytes { try fill($0) }
            if got == 0 { return false }
            if got < buffer.count { throw StasisError(.integrity, "\(path) is truncated") }
            return true
        }

        private func skip(_ count: UInt64) throws {
            guard count > 0 else { return }
            guard count <= Tar.maxEntryBytes + UInt64(Tar.block) else { throw StasisError(.integrity, "\(path): an entry of \(count) bytes") }
            // A file seeks past it; a pipe (ESPIPE) or an outer entry is read through.
            if case .descriptor(let fd) = source, (try? fd.seek(offset: Int64(count), from: .current)) != nil { return }
            var rest = count
            var scratch = [UInt8](repeating: 0, count: 65536)
            while rest > 0 {
                let want = Int(min(UInt64(scratch.count), rest))
                let n = try scratch.withUnsafeMutableBytes { try fill(UnsafeMutableRawBufferPointer(rebasing: $0[0..<want])) }
                if n < want { throw StasisError(.integrity, "\(path) is truncated") }
                rest -= UInt64(n)
            }
        }
    }

    /// The largest entry a reader accepts (1 PiB, as Manifest.maxFileBytes).
    static let maxEntryBytes: UInt64 = 1 << 50

    /// The most a header or a small file read whole may hold (an archive's sizes are not trusted further).
    static let metadataLimit: UInt64 = 16 << 20

    /// An octal field (NUL- or space-terminated), or a GNU base-256 one.
    static func number(_ field: ArraySlice<UInt8>) -> UInt64 {
        if let first = field.first, first & 0x80 != 0 {
            return field.dropFirst().reduce(UInt64(first & 0x7f)) { $0 << 8 | UInt64($1) }
        }
        let digits = field.drop { $0 == UInt8(ascii: " ") }.prefix { $0 != 0 && $0 != UInt8(ascii: " ") }
        return UInt64(String(decoding: digits, as: UTF8.self), radix: 8) ?? 0
    }
}
