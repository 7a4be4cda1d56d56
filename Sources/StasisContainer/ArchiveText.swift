import StasisCore

/// Text that comes from an archive (entry names, container ids) is the archive writer's: it may be megabytes
/// long, or hold a newline, a terminal escape or a bidi override that makes one name read as another. These
/// quote it for messages and check it where it names something.
public enum ArchiveText {
    /// The most characters of one name a message quotes.
    public static let quotedLimit = 200

    /// `text` fit for a message, in quotes: control characters and bidi overrides escaped (\n, \u{1B},
    /// \u{202E}), cut to `limit` characters (then its whole length is said).
    public static func quoted(_ text: String, limit: Int = quotedLimit) -> String {
        var out = ""
        var shown = 0
        for scalar in text.unicodeScalars {
            if shown >= limit { return "'" + out + "'... (\(text.utf8.count) bytes in all)" }
            out += isHostile(scalar) ? escaped(scalar) : String(scalar)
            shown += 1
        }
        return "'" + out + "'"
    }

    /// Whether `text` holds a control character (C0, DEL, C1) or a bidi override or isolate. (Its UTF-8 is
    /// scanned byte by byte: names reach 4096 bytes, archives 100,000 names, and debug builds are slow.)
    public static func hasHostileCharacters(_ text: String) -> Bool {
        var text = text
        return text.withUTF8 { bytes in
            let count = bytes.count
            var index = 0
            while index < count {
                let byte = bytes[index]
                if byte < 0x20 || byte == 0x7F { return true }
                // U+0080-U+009F: C2 80-9F. U+202A-U+202E: E2 80 AA-AE. U+2066-U+2069: E2 81 A6-A9.
                if byte == 0xC2, index + 1 < count, bytes[index + 1] <= 0x9F { return true }
                if byte == 0xE2, index + 2 < count {
                    let (second, third) = (bytes[index + 1], bytes[index + 2])
                    if second == 0x80 && (0xAA...0xAE).contains(third) || second == 0x81 && (0xA6...0xA9).contains(third) { return true }
                }
                index += 1
            }
            return false
        }
    }

    /// Refuses a container id read from an archive (config.dump, containerd's annotations) that cannot be one:
    /// empty, `.` or `..`, or holding `/`, NUL, a control character or a bidi override. Engines make ids of
    /// letters, digits, `_`, `-` and `.`; these are what would let an id name another path or print as another.
    public static func checkContainerID(_ id: String, archive: String) throws {
        let problem: String?
        if id.isEmpty {
            problem = "is empty"
        } else if id == "." || id == ".." {
            problem = "names a directory"
        } else if id.contains("/") {
            problem = "holds '/'"
        } else if hasHostileCharacters(id) {
            problem = "holds a control character or a bidi override"
        } else {
            problem = nil
        }
        if let problem {
            throw StasisError(.integrity, "\(archive) names the container \(quoted(id)), which \(problem): not a container id",
                              hint: "the archive is damaged or crafted; podman, CRI-O and containerd write ids of letters, digits, '_', '-' and '.'")
        }
    }

    /// C0 controls, DEL, C1 controls, and the bidi embeddings, overrides and isolates (U+202A-U+202E,
    /// U+2066-U+2069).
    static func isHostile(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.value {
        case 0x00...0x1F, 0x7F...0x9F, 0x202A...0x202E, 0x2066...0x2069: return true
        default: return false
        }
    }

    private static func escaped(_ scalar: Unicode.Scalar) -> String {
        switch scalar {
        case "\n": return "\\n"
        case "\t": return "\\t"
        case "\r": return "\\r"
        default: return "\\u{" + String(scalar.value, radix: 16, uppercase: true) + "}"
        }
    }
}
