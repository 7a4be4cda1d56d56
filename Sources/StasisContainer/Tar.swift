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

    /// An octal field (NUL- or space-terminated), or a GNU base-256 one.
    static func number(_ field: ArraySlice<UInt8>) -> UInt64 {
        if let first = field.first, first & 0x80 != 0 {
            return field.dropFirst().reduce(UInt64(first & 0x7f)) { $0 << 8 | UInt64($1) }
        }
        let digits = field.drop { $0 == UInt8(ascii: " ") }.prefix { $0 != 0 && $0 != UInt8(ascii: " ") }
        return UInt64(String(decoding: digits, as: UTF8.self), radix: 8) ?? 0
    }
}
