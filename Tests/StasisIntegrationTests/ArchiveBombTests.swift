import Foundation
import Glibc
import StasisContainer
import StasisCore
import StasisOS
import StasisTestSupport
import Testing

extension Integration {
    /// Crafted checkpoint archives that expand a thousandfold (issue 32: a 923 KiB .tar.zst took inspect and
    /// import to 2 GB and 130 s) against the built `stasis`: each ends in a short, clear error, within a
    /// bounded peak memory of the stasis process (ru_maxrss) and a few seconds. Also: concatenated zstd
    /// frames and gzip members, and container ids that would name another path or print as another.
    @Suite struct ArchiveBombs {
        /// The peak memory a reader may reach on any archive (stasis itself takes about 30 MiB).
        static let memoryBound: UInt64 = 256 << 20
        /// Seconds a refusal may take (about one on this machine's debug build; the bombs took minutes).
        static let timeBound = 20.0

        /// A checkpoint archive that import takes: CRIU's inventory, config.dump, spec.dump, tar's padding.
        static func checkpointArchive(id: String = "0123456789abcdef") -> Data {
            let config = try! JSONSerialization.data(withJSONObject: ["id": id, "name": "bomb-test", "runtime": "runc"])
            let spec = Data(#"{"ociVersion":"1.0.2","annotations":{"io.container.manager":"libpod"}}"#.utf8)
            return TarBlocks.header(name: "checkpoint/", size: .octal(0), type: "5")
                + TarBlocks.file("checkpoint/inventory.img", Data((0..<8192).map { UInt8($0 % 251) }))
                + TarBlocks.file("config.dump", config) + TarBlocks.file("spec.dump", spec) + Data(count: 10240)
        }

        /// Writes `pieces` (each repeated its count of times) through `compressor` ("zstd", "gzip") into
        /// `path`, streaming, so that gigabytes of input need no memory or disk here.
        static func compress(_ pieces: [(Data, Int)], with compressor: String, to path: String) throws {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: try #require(Spawn.which(compressor), "\(compressor) is not installed"))
            process.arguments = compressor == "zstd" ? ["-q", "-1", "-c"] : ["-1", "-c"]
            FileManager.default.createFile(atPath: path, contents: nil)
            let output = try #require(FileHandle(forWritingAtPath: path))
            let input = Pipe()
            process.standardInput = input
            process.standardOutput = output
            try process.run()
            for (data, count) in pieces {
                for _ in 0..<count { try input.fileHandleForWriting.write(contentsOf: data) }
            }
            try input.fileHandleForWriting.close()
            process.waitUntilExit()
            try output.close()
            #expect(process.terminationStatus == 0, "\(compressor) failed")
        }

        /// `inspect` and `import` of `archive`: each refused saying `expected`, in a short message, bounded in
        /// memory and time, leaving no checkpoint directory.
        static func expectRefused(_ archive: String, saying expected: String, _ what: String) throws {
            let root = Harness.scratch("bomb-run")
            for arguments in [["inspect", archive], ["import", archive, "-D", root + "/imported", "--store", root + "/store"]] {
                let run = try Harness.measuredStasis(arguments)
                let command = "\(what): stasis \(arguments[0])"
                print("\(command): status \(run.status), \(String(format: "%.1f", run.peakMiB)) MiB peak, \(String(format: "%.2f", run.seconds)) s")
                #expect(run.status == 1 && run.stderr.contains(expected), "\(command): \(run.stderr.prefix(2000))")
                #expect(run.stderr.utf8.count < 2000, "\(command): an error of \(run.stderr.utf8.count) bytes")
                #expect(run.peakBytes < memoryBound, "\(command): \(run.peakMiB) MiB at its peak")
                #expect(run.seconds < timeBound, "\(command): \(run.seconds) s")
            }
            #expect(!FileManager.default.fileExists(atPath: root + "/imported"), "\(what): a refused import left its directory")
        }

        @Test func consecutivePaxHeadersAreRefused() throws {
            let root = Harness.scratch("bomb-pax")
            // Each header under the 1 MiB bound; they used to be merged, however many came.
            let record = TarBlocks.paxRecord("comment", String(repeating: "c", count: 512 << 10))
            try Self.compress([(TarBlocks.paxHeader(record), 400), (TarBlocks.file("config.dump", Data("{}".utf8)) + TarBlocks.end, 1)],
                              with: "zstd", to: root + "/chain.tar.zst")
            try Self.expectRefused(root + "/chain.tar.zst", saying: "pax or long-name headers in a row", "a chain of 400 pax headers")
            // A few headers of 16 MiB: refused by their size field, before they are read.
            let huge = TarBlocks.paxRecord("comment", String(repeating: "h", count: 16 << 20))
            try Self.compress([(TarBlocks.paxHeader(huge), 20), (TarBlocks.end, 1)], with: "zstd", to: root + "/huge.tar.zst")
            try Self.expectRefused(root + "/huge.tar.zst", saying: "pax or long-name header of", "pax headers of 16 MiB")
        }

        @Test func extendedHeadersAreBoundedPerArchive() throws {
            let root = Harness.scratch("bomb-extended")
            // Four headers of almost 1 MiB before every entry: each allowed, their sum is not.
            let record = TarBlocks.paxRecord("comment", String(repeating: "c", count: (1 << 20) - 64))
            // (Directories: import passes over them, so that it too reads on to the bound.)
            let entry = TarBlocks.paxHeader(record) + TarBlocks.paxHeader(record) + TarBlocks.paxHeader(record) + TarBlocks.paxHeader(record)
                + TarBlocks.header(name: "checkpoint/", size: .octal(0), type: "5")
            try Self.compress([(entry, 100), (TarBlocks.end, 1)], with: "zstd", to: root + "/extended.tar.zst")
            try Self.expectRefused(root + "/extended.tar.zst", saying: "MiB of pax and long-name headers", "400 pax headers of 1 MiB")
        }

        @Test func namesBeyondPathMaxAreRefusedAndLongNamesAreNotKept() throws {
            let root = Harness.scratch("bomb-names")
            let tooLong = TarBlocks.paxHeader(TarBlocks.paxRecord("path", "checkpoint/" + String(repeating: "n", count: 16 << 20)))
            try Self.compress([(tooLong, 1), (TarBlocks.file("x", Data()) + TarBlocks.end, 1)], with: "zstd", to: root + "/long.tar.zst")
            // 16 MiB is beyond the 1 MiB a header may hold; PATH_MAX + 1 is beyond a name's bound.
            try Self.expectRefused(root + "/long.tar.zst", saying: "pax or long-name header of", "a name of 16 MiB")
            let justOver = TarBlocks.paxHeader(TarBlocks.paxRecord("path", "checkpoint/" + String(repeating: "n", count: Tar.Limits.nameBytes)))
            try Self.compress([(justOver, 1), (TarBlocks.file("x", Data()) + TarBlocks.end, 1)], with: "zstd", to: root + "/over.tar.zst")
            try Self.expectRefused(root + "/over.tar.zst", saying: "(at most \(Tar.Limits.nameBytes))", "a name of PATH_MAX + 12 bytes")

            // 14,000 names of 4,000 bytes (56 MB of names, within every bound): inspect describes the archive
            // without keeping them all (it lists 1000).
            var names = Data()
            for index in 0..<14_000 {
                let name = "checkpoint/\(index)-" + String(repeating: "y", count: 4000)
                names += TarBlocks.paxHeader(TarBlocks.paxRecord("path", name)) + TarBlocks.file("placeholder", Data())
            }
            try Self.compress([(names, 1), (Self.checkpointArchive(), 1)], with: "zstd", to: root + "/names.tar.zst")
            let inspect = try Harness.measuredStasis(["inspect", "--json", root + "/names.tar.zst"])
            print("14,000 names of 4 KB: inspect \(String(format: "%.1f", inspect.peakMiB)) MiB peak, \(String(format: "%.2f", inspect.seconds)) s")
            #expect(inspect.succeeded, "\(inspect.stderr)")
            let summary = try JSONSerialization.jsonObject(with: Data(inspect.stdout.utf8)) as? [String: Any]
            #expect(summary?["fileCount"] as? Int == 14_003 && (summary?["files"] as? [String])?.count == 1000, "\(inspect.stdout.prefix(300))")
            #expect(inspect.peakBytes < Self.memoryBound && inspect.seconds < Self.timeBound)
        }

        @Test func entriesAreBoundedPerArchive() throws {
            let root = Harness.scratch("bomb-entries")
            // Directories: import passes over them, so that it too reads on to the bound.
            let entry = TarBlocks.header(name: "checkpoint/", size: .octal(0), type: "5")
            try Self.compress([(entry, Tar.Limits.entries + 10), (TarBlocks.end, 1)], with: "zstd", to: root + "/entries.tar.zst")
            try Self.expectRefused(root + "/entries.tar.zst", saying: "more than \(Tar.Limits.entries) entries", "\(Tar.Limits.entries + 10) entries")
        }

        @Test func aStreamThatGoesOnAfterTheTarIsRefused() throws {
            let root = Harness.scratch("bomb-trailing")
            // A valid archive, then 256 MiB of zeros: a few hundred KiB compressed, decoded without end.
            let zeros = Data(count: 1 << 20)
            for compressor in ["zstd", "gzip"] {
                let path = root + "/trailing.tar." + compressor
                try Self.compress([(Self.checkpointArchive(), 1), (zeros, 256)], with: compressor, to: path)
                try Self.expectRefused(path, saying: "MiB after the end of its tar archive", "256 MiB after a \(compressor) archive")
            }
        }

        @Test func concatenatedFramesAndMembersAreReadWhole() throws {
            let root = Harness.scratch("frames")
            // The archive in one frame, then a second frame (or gzip member) of data after the tar's end.
            var after = Data(count: 200 << 10)
            after += Data((0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) })
            for compressor in ["zstd", "gzip"] {
                let first = root + "/first." + compressor, second = root + "/second." + compressor
                try Self.compress([(Self.checkpointArchive(), 1)], with: compressor, to: first)
                try Self.compress([(after, 1)], with: compressor, to: second)
                let both = root + "/both.tar." + compressor
                try (Data(contentsOf: URL(fileURLWithPath: first)) + Data(contentsOf: URL(fileURLWithPath: second))).write(to: URL(fileURLWithPath: both))
                let inspect = try Harness.stasis("inspect", both)
                #expect(inspect.succeeded && inspect.stdout.contains("bomb-test"), "\(compressor): \(inspect.stderr)")
                let imported = try Harness.stasis("import", both, "-D", root + "/imported-" + compressor, "--store", root + "/store")
                #expect(imported.succeeded && imported.stdout.contains("imported container 0123456789abcdef"), "\(compressor): \(imported.stderr)")

                // The second frame damaged: its checksum is still checked, though it lies after the tar.
                var damaged = try Data(contentsOf: URL(fileURLWithPath: both))
                damaged[damaged.count - 6] ^= 0x55
                let bad = root + "/damaged.tar." + compressor
                try damaged.write(to: URL(fileURLWithPath: bad))
                let refused = try Harness.stasis("import", bad, "-D", root + "/damaged-" + compressor, "--store", root + "/store")
                #expect(!refused.succeeded && !refused.stderr.contains("Broken pipe"), "\(compressor): \(refused.stderr)")
                #expect(!FileManager.default.fileExists(atPath: root + "/damaged-" + compressor))
            }
        }

        @Test func hostileContainerIDsAreRefused() throws {
            let root = Harness.scratch("hostile-ids")
            for (index, id) in ["..", ".", "", "../../etc", "a/b", "job\nstasis: restored", "evil\u{202E}gpj.exe", "a\u{2066}b", "\u{1B}[2Jx", "a\u{0}b"].enumerated() {
                let path = root + "/\(index).tar"
                try Self.checkpointArchive(id: id).write(to: URL(fileURLWithPath: path))
                let imported = try Harness.stasis("import", path, "-D", root + "/imported-\(index)", "--store", root + "/store")
                let shown = id.unicodeScalars.map { String($0.value, radix: 16) }
                #expect(!imported.succeeded && imported.stderr.contains("not a container id"), "\(shown): \(imported.stderr)")
                #expect(!imported.stderr.contains("\u{202E}") && !imported.stderr.contains("\u{1B}") && !imported.stderr.dropLast().contains("\nstasis: restored"),
                        "\(shown): the error prints the id raw")
                #expect(!FileManager.default.fileExists(atPath: root + "/imported-\(index)"), "\(shown)")
                let inspect = try Harness.stasis("inspect", path)
                #expect(!inspect.succeeded && inspect.stderr.contains("not a container id"), "\(shown): \(inspect.stdout)\(inspect.stderr)")
            }
        }
    }
}
