import StasisCore
import Testing

/// Sizes as a person writes them (`stasis reserve 32G`).
@Suite struct ByteSizes {
    @Test func unitsAreBinary() {
        #expect(Format.parseBytes("0") == 0)
        #expect(Format.parseBytes("4096") == 4096)
        #expect(Format.parseBytes("1K") == 1024)
        #expect(Format.parseBytes("512M") == 512 << 20)
        #expect(Format.parseBytes("32G") == 32 << 30)
        #expect(Format.parseBytes("32GiB") == 32 << 30)
        #expect(Format.parseBytes("2gb") == 2 << 30)
        #expect(Format.parseBytes("1T") == 1 << 40)
        #expect(Format.parseBytes("7B") == 7)
    }

    @Test func whatIsNotASizeIsRefused() {
        for text in ["", "G", "GiB", "-1G", "+5", "1.5G", "12X", "1 G", "99999999999999999999", "17179869184T", "٣G"] {
            #expect(Format.parseBytes(text) == nil, "\(text)")
        }
    }
}
