import ArgumentParser
import StasisCore

/// Checks of the command line that argument parsing does not make.
enum Arguments {
    /// Refuses a command line holding an argument that is not valid UTF-8, naming it. swift-argument-parser
    /// decodes argv with replacement, so a path with such bytes would silently become another path (its bad
    /// bytes turned into U+FFFD); stasis keeps paths as text (in manifests, JSON, messages), so it cannot
    /// carry them either. Checked on the raw bytes, before parsing.
    static func requireUTF8(_ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>, count: Int32) throws {
        var previous: String?
        for index in 1..<Int(max(count, 1)) {
            guard let pointer = argv[index] else { continue }
            guard let text = String(validatingCString: pointer) else {
                let bytes = Array(UnsafeBufferPointer(start: pointer, count: strlenOf(pointer))).map { UInt8(bitPattern: $0) }
                let which = previous.map { $0.hasPrefix("-") ? "argument \(index) (after \(Format.printable($0)))" : "argument \(index)" } ?? "argument \(index)"
                throw StasisError(.invalidArgument, "\(which) is not valid UTF-8: \(shown(bytes))",
                                  hint: "stasis keeps paths and names as text: rename the file or directory to a UTF-8 name")
            }
            previous = text
        }
    }

    /// Refuses, for an option naming a file or directory stasis creates (-D, -o, --spool), a path with a
    /// control character or a bidirectional override in it: such a name could not be printed as it is, and
    /// a newline in it would split the lines that list it.
    static func requireCreatableName(_ path: String, option: String) throws {
        guard let character = Format.firstHostileCharacter(in: path) else { return }
        throw ValidationError("\(option) \(Format.printable(path)): the name holds \(Format.printable(String(Character(character)))), "
            + "a control or bidirectional character; choose a name without them")
    }

    /// Bytes as text: printable ASCII as it is, everything else as \xHH.
    private static func shown(_ bytes: [UInt8]) -> String {
        bytes.map { byte in
            guard !(0x20..<0x7F).contains(byte) else { return String(UnicodeScalar(byte)) }
            let hex = String(byte, radix: 16, uppercase: true)
            return "\\x" + (hex.count == 1 ? "0" + hex : hex)
        }.joined()
    }

    private static func strlenOf(_ pointer: UnsafeMutablePointer<CChar>) -> Int {
        var length = 0
        while pointer[length] != 0 { length += 1 }
        return length
    }
}
