import Foundation

/// Tar header blocks for crafted archives.
public enum TarBlocks {
    public enum Size { case octal(UInt64), base256(UInt64) }

    public static func header(name: String, size: Size, type: Character) -> Data {
        var block = [UInt8](repeating: 0, count: 512)
        for (index, byte) in name.utf8.prefix(100).enumerated() { block[index] = byte }
        for (index, byte) in "0000600\0".utf8.enumerated() { block[100 + index] = byte }
        switch size {
        case .octal(let value):
            for (index, byte) in (String(repeating: "0", count: max(0, 11 - String(value, radix: 8).count)) + String(value, radix: 8)).utf8.prefix(11).enumerated() {
                block[124 + index] = byte
            }
        case .base256(let value):
            block[124] = 0x80
            for index in 0..<8 { block[128 + index] = UInt8(truncatingIfNeeded: value >> (8 * (7 - index))) }
        }
        block[156] = type.asciiValue ?? 0x30
        for (index, byte) in "ustar\u{0}00".utf8.enumerated() { block[257 + index] = byte }
        for index in 148..<156 { block[index] = 0x20 }
        let sum = block.reduce(0) { $0 + Int($1) }
        for (index, byte) in (String(repeating: "0", count: max(0, 6 - String(sum, radix: 8).count)) + String(sum, radix: 8)).utf8.enumerated() {
            block[148 + index] = byte
        }
        block[154] = 0
        return Data(block)
    }

    public static func padded(_ data: Data) -> Data { data + Data(count: (512 - data.count % 512) % 512) }

    /// One pax record, "LENGTH KEY=VALUE\n", LENGTH counting the whole record.
    public static func paxRecord(_ key: String, _ value: Data) -> Data {
        let body = Data(" \(key)=".utf8) + value + Data("\n".utf8)
        var length = body.count + 1
        while String(length).utf8.count + body.count > length { length += 1 }
        return Data(String(length).utf8) + body
    }

    public static func paxRecord(_ key: String, _ value: String) -> Data { paxRecord(key, Data(value.utf8)) }

    /// A pax header ('x') holding `records`, padded.
    public static func paxHeader(_ records: Data, type: Character = "x") -> Data {
        header(name: "PaxHeaders/entry", size: .octal(UInt64(records.count)), type: type) + padded(records)
    }

    /// A regular file entry, padded.
    public static func file(_ name: String, _ contents: Data) -> Data {
        header(name: name, size: .octal(UInt64(contents.count)), type: "0") + padded(contents)
    }

    /// The two blocks of zeros that end an archive.
    public static let end = Data(count: 1024)
}
