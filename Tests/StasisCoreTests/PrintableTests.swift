import StasisCore
import Testing

/// What stasis prints of a name it did not choose: every character a terminal would act on is written out.
@Suite struct PrintableText {
    @Test func ordinaryTextIsUnchanged() {
        for text in ["", "/var/lib/stasis/ckpt-1", "job 42 (parent 1)", "café ünïcödé 日本語 🙂", "a\\b"] {
            #expect(Format.printable(text) == text)
        }
    }

    @Test func controlCharactersAreWrittenOut() {
        #expect(Format.printable("a\nb") == "a\\nb")
        #expect(Format.printable("a\r\tb") == "a\\r\\tb")
        #expect(Format.printable("\u{0}") == "\\u{0}")
        #expect(Format.printable("host\u{1B}]0;owned\u{07}") == "host\\u{1B}]0;owned\\u{7}")
        #expect(Format.printable("\u{1B}[2J") == "\\u{1B}[2J")
        #expect(Format.printable("del\u{7F}") == "del\\u{7F}")
        #expect(Format.printable("c1\u{85}\u{9B}31m") == "c1\\u{85}\\u{9B}31m")
    }

    @Test func bidirectionalOverridesAndIsolatesAreWrittenOut() {
        #expect(Format.printable("evil\u{202E}gpj.exe") == "evil\\u{202E}gpj.exe")
        for value: UInt32 in [0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069] {
            let scalar = Unicode.Scalar(value)!
            #expect(Format.isHostile(scalar))
            #expect(!Format.printable("x" + String(Character(scalar))).unicodeScalars.contains(scalar))
        }
        // Their neighbours, and ordinary right-to-left text, are shown as they are.
        for value: UInt32 in [0x2029, 0x202F, 0x2065, 0x206A, 0x05D0, 0xA0] {
            #expect(!Format.isHostile(Unicode.Scalar(value)!))
        }
    }

    @Test func theFirstHostileCharacterIsNamed() {
        #expect(Format.firstHostileCharacter(in: "/tmp/ok") == nil)
        #expect(Format.firstHostileCharacter(in: "/tmp/a\u{202E}b\nc") == "\u{202E}")
    }

    /// An escaped text has no character left that a terminal acts on, whatever went in.
    @Test func nothingHostileSurvives() {
        var text = ""
        for value in UInt32(0)...0x20FF { if let scalar = Unicode.Scalar(value) { text.unicodeScalars.append(scalar) } }
        for value in UInt32(0x2060)...0x206F { text.unicodeScalars.append(Unicode.Scalar(value)!) }
        #expect(Format.firstHostileCharacter(in: Format.printable(text)) == nil)
    }
}
