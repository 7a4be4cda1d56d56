import Foundation
import Glibc
import StasisCore
@testable import StasisEngine
import StasisImage
import StasisOS
import StasisAgentStandIn
import StasisStore
import StasisTestSupport
import Testing

/// Random and mutated inputs against everything that reads files from elsewhere: manifests (inspect, verify,
/// restore), bundles (import), checkpoint archives' tar headers and pax records (inspect, import) and
/// containerd images' OCI index JSON (inspect). Every case must end in
/// a StasisError or a success, never a trap (which would end this test process) or another error type, and
/// a failed import must leave nothing behind. Seeded (STASIS_FUZZ_SEED, printed on failure) and bounded by
/// time (STASIS_FUZZ_SECONDS per target), so CI runs thousands of cases in a fixed budget.
@Suite struct Fuzz {
    static let seed = UInt64(ProcessInfo.processInfo.environment["STASIS_FUZZ_SEED"] ?? "") ?? 20261206
    static let seconds = Double(ProcessInfo.processInfo.environment["STASIS_FUZZ_SECONDS"] ?? "") ?? 6

    typealias Generator = SplitMix

    /// Runs `body` for cases 0, 1, ... until the time budget is spent; returns how many ran.
    static func run(_ name: String, minimum: Int, _ body: (Int, inout Generator) throws -> Void) rethrows -> Int {
        // Each target its own stream of the seed (FNV-1a over its name), so one target's changes leave the others' cases as they were.
        var generator = Generator(state: name.utf8.reduce(seed ^ 0xcbf2_9ce4_8422_2325) { ($0 ^ UInt64($1)) &* 0x100_0000_01b3 })
        let watch = Stopwatch()
        var count = 0
        while count < minimum || watch.seconds < seconds {
            try body(count, &generator)
            count += 1
            if count >= 100_000 { break }
        }
        print("fuzz \(name): \(count) cases in \(Format.seconds(watch.seconds)), seed \(seed)")
        return count
    }

    /// What a case may end in: nothing, or a StasisError. Anything else is recorded as a failure.
    static func expectClean(_ what: String, _ body: () throws -> Void) {
        do {
            try body()
        } catch is StasisError {
        } catch {
            Issue.record("\(what) (seed \(seed)): not a StasisError: \(type(of: error)) \(error)")
        }
    }

    // MARK: manifests

    static let hostileIntegers: [Int] = [0, -1, 1, Int.max, Int.min, Int(Int32.max), Int(Int32.min), 4096, 1 << 62, -4096]
    static let hostileReals: [Double] = [0.5, 1e300, -1e300]
    static func hostileNumber(_ random: inout Generator) -> Any {
        Int.random(in: 0..<5, using: &random) == 0 ? hostileReals.randomElement(using: &random)! : hostileIntegers.randomElement(using: &random)!
    }
    static let hostileStrings: [String] = ["", "..", "../../x", "/etc/passwd", "a/../../b", "pages-1.img", "gpu/1/../..", "\u{0}",
                                           String(repeating: "f", count: 64), String(repeating: "x", count: 5000), "manifest.json", "é"]

    /// One random change somewhere in a JSON value: a number, a string, a deleted key, a duplicated element,
    /// a value of another type.
    static func mutate(_ value: Any, _ random: inout Generator, depth: Int = 0) -> Any {
        if var object = value as? [String: Any], !object.isEmpty {
            let key = object.keys.sorted()[Int.random(in: 0..<object.count, using: &random)]
            switch Int.random(in: 0..<8, using: &random) {
            case 0: object.removeValue(forKey: key)
            case 1: object[key] = hostileStrings.randomElement(using: &random)!
            default: object[key] = mutate(object[key]!, &random, depth: depth + 1)
            }
            return object
        }
        if var array = value as? [Any], !array.isEmpty {
            let index = Int.random(in: 0..<array.count, using: &random)
            switch Int.random(in: 0..<6, using: &random) {
            case 0: array.append(array[index])
            case 1: array.remove(at: index)
            default: array[index] = mutate(array[index], &random, depth: depth + 1)
            }
            return array
        }
        if value is String { return Bool.random(using: &random) ? hostileStrings.randomElement(using: &random)! : hostileNumber(&random) }
        if value is NSNumber { return Int.random(in: 0..<4, using: &random) == 0 ? hostileStrings.randomElement(using: &random)! : hostileNumber(&random) }
        return hostileNumber(&random)
    }

    /// Raw damage to bytes: flips, a cut, an insertion.
    static func damage(_ data: Data, _ random: inout Generator) -> Data {
        var bytes = [UInt8](data)
        guard !bytes.isEmpty else { return Data([0x7b]) }
        switch Int.random(in: 0..<4, using: &random) {
        case 0:
            for _ in 0..<Int.random(in: 1...8, using: &random) { bytes[Int.random(in: 0..<bytes.count, using: &random)] ^= UInt8.random(in: 1...255, using: &random) }
        case 1:
            bytes.removeSubrange(Int.random(in: 0..<bytes.count, using: &random)...)
        case 2:
            let at = Int.random(in: 0..<bytes.count, using: &random)
            let width = min(8, bytes.count - at)
            for offset in 0..<width { bytes[at + offset] = 0xff }
        default:
            bytes.insert(contentsOf: (0..<Int.random(in: 1...64, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) },
                         at: Int.random(in: 0...bytes.count, using: &random))
        }
        return Data(bytes)
    }

    /// Mutated manifests in a real checkpoint directory (files and chunks in a store) go through what inspect,
    /// verify and restore read: decoding, the shape check, the whole files, every chunk, and, for those that
    /// pass all that, a restore whose rebuild must stay inside its directory (CRIU then refuses the sample's
    /// made-up images).
    @Test func mutatedManifests() throws {
        let sample = try SampleCheckpoint.make()
        let path = sample.checkpoint + "/" + Manifest.fileName
        let original = try FileSystem.readFile(path)
        let object = try JSONSerialization.jsonObject(with: original)
        let rebuildRoot = Harness.scratch("fuzz-rebuild")
        var restores = 0
        let cases = Self.run("manifest", minimum: 2000) { index, random in
            let mutated: Data
            if index % 3 == 0 {
                mutated = Self.damage(original, &random)
            } else {
                var value = object
                for _ in 0..<Int.random(in: 1...3, using: &random) { value = Self.mutate(value, &random) }
                guard let data = try? JSONSerialization.data(withJSONObject: value) else { return }
                mutated = data
            }
            try? FileManager.default.removeItem(atPath: path)
            try? mutated.write(to: URL(fileURLWithPath: path))
            Self.expectClean("manifest case \(index)") {
                let manifest = try Checkpoint.readManifest(sample.checkpoint)
                _ = try Checkpoint.verify(sample.checkpoint, manifest: manifest, store: sample.store)
                guard restores < 10 else { return }
                restores += 1
                var options = RestoreOperation.Options(directory: sample.checkpoint)
                options.store = sample.store.path
                options.rebuildRoot = rebuildRoot
                options.workDirectory = Harness.scratch("fuzz-work")
                options.skipCPUCheck = true
                _ = try RestoreOperation(options).run()
            }
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: rebuildRoot).isEmpty, "rebuilds are removed")
        #expect(cases >= 2000)
    }

    // MARK: bundles

    /// Damaged bundles are refused whole: no directory, no partial sibling, no chunk file left in the store's tmp/.
    @Test func damagedBundles() throws {
        let sample = try SampleCheckpoint.make()
        let root = Harness.scratch("fuzz-bundle")
        let bundle = root + "/good.stasis"
        _ = try BundleOperation.export(sample.checkpoint, to: bundle, store: sample.store.path)
        let good = try FileSystem.readFile(bundle)
        let store = root + "/store"
        let cases = Self.run("bundle", minimum: 300) { index, random in
            let bad = root + "/bad.stasis"
            var data = Self.damage(good, &random)
            if index % 4 == 0 {
                // Aim at the headers: the first records hold the manifest's length and the first file's.
                var bytes = [UInt8](good)
                let at = Int.random(in: 0..<min(bytes.count, 4096), using: &random)
                bytes[at] ^= UInt8.random(in: 1...255, using: &random)
                data = Data(bytes)
            }
            unlink(bad)
            try? data.write(to: URL(fileURLWithPath: bad))
            let destination = root + "/imported-\(index)"
            var imported = false
            Self.expectClean("bundle case \(index)") {
                _ = try BundleOperation.importBundle(bad, into: destination, store: store)
                imported = true
            }
            if imported {
                _ = try? StoreCatalog(store: try DirectoryChunkStore(path: store, create: false)).remove(destination)
            } else {
                #expect(!FileSystem.exists(destination), "bundle case \(index): a failed import left its directory")
            }
            let left = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).filter { $0.contains(".partial-") }
            #expect(left.isEmpty, "bundle case \(index) left \(left)")
            let temporary = (try? FileManager.default.contentsOfDirectory(atPath: store + "/tmp")) ?? []
            #expect(temporary.isEmpty, "bundle case \(index) left chunk files in tmp/: \(temporary)")
        }
        #expect(cases >= 300)
    }

    // MARK: tar headers

    /// A random tar header block with a valid checksum: random name, type and size field (octal, base-256,
    /// or a pax record before it).
    static func randomEntry(_ random: inout Generator) -> Data {
        let names = ["config.dump", "spec.dump", "checkpoint/inventory.img", "checkpoint/pages-1.img", "../x", "/abs", "rootfs-diff.tar",
                     String(repeating: "n", count: 99), "checkpoint/"]
        let types: [Character] = ["0", "5", "x", "L", "g", "K", "2", "3", "\0", "7"]
        let name = names.randomElement(using: &random)!
        let type = types.randomElement(using: &random)!
        let sizes: [UInt64] = [0, 1, 511, 512, 4096, UInt64(Int32.max), 1 << 33, 1 << 62, 1 << 63, UInt64.max, UInt64.max - 511]
        let size = sizes.randomElement(using: &random)!
        var data = Data()
        switch Int.random(in: 0..<3, using: &random) {
        case 0:
            data += TarBlocks.header(name: name, size: .octal(min(size, 0o77777777777)), type: type)
        case 1:
            data += TarBlocks.header(name: name, size: .base256(size), type: type)
        default:
            let value = Bool.random(using: &random) ? String(size) : ["-1", "x", "", "99999999999999999999999999"].randomElement(using: &random)!
            let body = " size=\(value)\n"
            let record = "\(body.utf8.count + String(body.utf8.count + 2).count)\(body)"
            data += TarBlocks.header(name: "PaxHeaders/" + name, size: .octal(UInt64(record.utf8.count)), type: "x")
            data += TarBlocks.padded(Data(record.utf8))
            data += TarBlocks.header(name: name, size: .octal(0), type: type)
        }
        let payload = Int.random(in: 0..<3, using: &random) * 512
        data += Data((0..<payload).map { _ in UInt8.random(in: 0...255, using: &random) })
        return data
    }

    /// Archives of random entries: `inspect` (summarize) and `import` end in a StasisError or a checkpoint, and
    /// a failed import leaves nothing behind.
    @Test func craftedTarHeaders() throws {
        let root = Harness.scratch("fuzz-tar")
        let store = root + "/store"
        let cases = Self.run("tar", minimum: 1000) { index, random in
            let archive = root + "/case.tar"
            var data = Data()
            for _ in 0..<Int.random(in: 1...4, using: &random) { data += Self.randomEntry(&random) }
            if Bool.random(using: &random) { data += Data(count: 1024) }
            unlink(archive)
            try? data.write(to: URL(fileURLWithPath: archive))
            Self.expectClean("tar case \(index) summarize") { _ = try ArchiveOperation.summarize(archive) }
            let destination = root + "/imported"
            var imported = false
            Self.expectClean("tar case \(index) import") {
                _ = try ArchiveOperation.importArchive(archive, into: destination, store: store)
                imported = true
            }
            if imported { FileSystem.removeTree(destination) }
            let left = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).filter { $0 != "case.tar" && $0 != "store" }
            #expect(left.isEmpty, "tar case \(index) left \(left)")
        }
        #expect(cases >= 1000)
    }

    // MARK: pax records

    /// The bounds a reader keeps, whatever it is given (Tar.Limits and ArchiveOperation.listedFiles): a
    /// name of PATH_MAX, 1000 names listed, 256 MiB at the peak of a stasis that reads an archive.
    static let nameBytes = 4096
    static let listedFiles = 1000
    static let memoryBound: UInt64 = 256 << 20

    /// Every `every`th case (and the first) also runs the built `stasis inspect` on the case's file, and its
    /// peak memory is held to `memoryBound`: what is bounded must show in the process that reads.
    static func expectBoundedInspect(_ archive: String, _ what: String) throws {
        let run = try Harness.measuredStasis(["inspect", archive])
        #expect(run.status == 0 || run.status == 1, "\(what) (seed \(seed)): stasis inspect ended with \(run.status): \(run.stderr.prefix(500))")
        #expect(run.peakBytes < memoryBound, "\(what) (seed \(seed)): stasis inspect peaked at \(run.peakMiB) MiB")
        #expect(run.stderr.utf8.count < 4000, "\(what) (seed \(seed)): an error of \(run.stderr.utf8.count) bytes")
    }

    /// Whether `text` would reach a terminal as something else (a control character or a bidi override).
    static func isHostile(_ text: String) -> Bool {
        text.unicodeScalars.contains { (0...0x1F).contains($0.value) || (0x7F...0x9F).contains($0.value) || (0x202A...0x202E).contains($0.value)
            || (0x2066...0x2069).contains($0.value) }
    }

    static let paxKeys = ["path", "size", "mtime", "linkpath", "comment", "SCHILY.xattr.security.selinux", "GNU.sparse.size", "path", "size"]
    static let paxValues: [Data] = [
        Data("checkpoint/pages-1.img".utf8), Data("config.dump".utf8), Data("../../etc/passwd".utf8), Data("12".utf8), Data("-1".utf8),
        Data("99999999999999999999999".utf8), Data("1.5".utf8), Data("".utf8), Data("a\u{0}b".utf8), Data("x\ny".utf8), Data("é\u{202E}gpj".utf8),
        Data(repeating: UInt8(ascii: "n"), count: 4095), Data(repeating: UInt8(ascii: "n"), count: 4096), Data(repeating: UInt8(ascii: "n"), count: 4097),
        Data(repeating: UInt8(ascii: "v"), count: 100_000), Data([0xff, 0xfe, 0x80]),
    ]

    /// The records of one pax header: well-formed, or with a length off, a newline missing, NULs after, raw damage.
    static func randomPaxRecords(_ random: inout Generator) -> Data {
        var records = Data()
        for _ in 0..<Int.random(in: 1...4, using: &random) {
            let key = paxKeys.randomElement(using: &random)!
            let value = paxValues.randomElement(using: &random)!
            var record = TarBlocks.paxRecord(key, value)
            switch Int.random(in: 0..<10, using: &random) {
            case 0:  // a length off by a little, or far
                let body = record.drop { $0 != UInt8(ascii: " ") }
                let length = [record.count - 1, record.count + 1, 0, 9_999_999, Int(Int32.max)].randomElement(using: &random)!
                record = Data(String(length).utf8) + body
            case 1: record.removeLast()  // no newline
            case 2: record = Data(record.drop { $0 != UInt8(ascii: " ") })  // no length
            default: break
            }
            records += record
        }
        switch Int.random(in: 0..<6, using: &random) {
        case 0: records += Data(count: Int.random(in: 1...600, using: &random))
        case 1: records = damage(records, &random)
        default: break
        }
        return records
    }

    /// Archives whose entries are led by random pax headers (one to six in a row, pax, global or GNU long
    /// names): inspect and import end in a StasisError or a success that keeps the bounds, and the built
    /// `stasis inspect` stays within `memoryBound` on them.
    @Test func paxRecords() throws {
        let root = Harness.scratch("fuzz-pax")
        let store = root + "/store"
        var measured = 0
        let cases = try Self.run("pax", minimum: 400) { index, random in
            var data = Data()
            for _ in 0..<Int.random(in: 1...3, using: &random) {
                for _ in 0..<Int.random(in: 1...6, using: &random) {
                    let type: Character = ["x", "x", "x", "g", "L"].randomElement(using: &random)!
                    data += TarBlocks.paxHeader(Self.randomPaxRecords(&random), type: type)
                }
                let name = ["checkpoint/inventory.img", "checkpoint/pages-1.img", "rootfs-diff.tar", "x"].randomElement(using: &random)!
                data += TarBlocks.file(name, Data(count: Int.random(in: 0...3, using: &random) * 100))
            }
            let config = Data(#"{"id":"0123456789abcdef","name":"fuzz"}"#.utf8)
            data += TarBlocks.file("config.dump", config) + TarBlocks.file("spec.dump", Data("{}".utf8)) + TarBlocks.end
            let archive = root + "/case.tar"
            unlink(archive)
            try? data.write(to: URL(fileURLWithPath: archive))
            Self.expectClean("pax case \(index) summarize") {
                let summary = try ArchiveOperation.summarize(archive)
                #expect(summary.files.count <= Self.listedFiles && summary.files.allSatisfy { $0.utf8.count <= Self.nameBytes && !$0.utf8.contains(0) },
                        "pax case \(index) (seed \(Self.seed)): a name beyond the bounds was listed")
            }
            let destination = root + "/imported"
            var imported = false
            Self.expectClean("pax case \(index) import") {
                _ = try ArchiveOperation.importArchive(archive, into: destination, store: store)
                imported = true
            }
            if imported { FileSystem.removeTree(destination) }
            let left = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).filter { $0 != "case.tar" && $0 != "store" }
            #expect(left.isEmpty, "pax case \(index) (seed \(Self.seed)) left \(left)")
            if index % 100 == 0 {
                try Self.expectBoundedInspect(archive, "pax case \(index)")
                measured += 1
            }
        }
        #expect(cases >= 400 && measured >= 4)
    }

    // MARK: OCI index JSON (containerd's checkpoint images)

    /// A containerd checkpoint image as `ctr image export` writes it (an OCI layout), from its two indexes:
    /// the checkpoint's own (its parts, by media type) and index.json (naming it).
    static func ociImage(index: Data, checkpoint: Data, criu: Data) -> Data {
        let checkpointDigest = String(repeating: "c", count: 64), criuDigest = String(repeating: "a", count: 64)
        return TarBlocks.file("oci-layout", Data(#"{"imageLayoutVersion":"1.0.0"}"#.utf8))
            + TarBlocks.header(name: "blobs/", size: .octal(0), type: "5") + TarBlocks.header(name: "blobs/sha256/", size: .octal(0), type: "5")
            + TarBlocks.file("blobs/sha256/" + criuDigest, criu) + TarBlocks.file("blobs/sha256/" + checkpointDigest, checkpoint)
            + TarBlocks.file("index.json", index) + TarBlocks.end
    }

    static let hostileAnnotations: [String] = ["docker.io/library/busybox:latest", "io.containerd.runc.v2", "overlayfs", "a\nb", "evil\u{202E}gpj",
                                               "\u{1B}[2J", String(repeating: "r", count: 5000), "", "\u{0}"]

    /// The two indexes, mutated: their JSON values (Fuzz.mutate), raw damage, hostile annotations, a part
    /// listed tens of thousands of times, deep nesting.
    static func ociIndexes(_ random: inout Generator) -> (index: Data, checkpoint: Data) {
        let criuType = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
        var checkpoint: [String: Any] = [
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [["mediaType": criuType, "digest": "sha256:" + String(repeating: "a", count: 64), "size": 3072],
                          ["mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + String(repeating: "b", count: 64), "size": 10]],
            "annotations": ["io.containerd.checkpoint.runtime": "io.containerd.runc.v2", "io.containerd.checkpoint.snapshotter": "overlayfs",
                            "org.opencontainers.image.ref.name": "docker.io/library/busybox:latest"],
        ]
        var index: [String: Any] = [
            "schemaVersion": 2,
            "manifests": [["mediaType": "application/vnd.oci.image.index.v1+json", "digest": "sha256:" + String(repeating: "c", count: 64), "size": 500,
                           "annotations": ["io.containerd.image.name": "checkpoint/fuzz:1"]]],
        ]
        switch Int.random(in: 0..<8, using: &random) {
        case 0:
            var annotations = checkpoint["annotations"] as! [String: Any]
            annotations[annotations.keys.sorted().randomElement(using: &random)!] = hostileAnnotations.randomElement(using: &random)!
            checkpoint["annotations"] = annotations
        case 1:
            index["manifests"] = [["digest": "sha256:" + String(repeating: "c", count: 64),
                                   "annotations": ["io.containerd.image.name": hostileAnnotations.randomElement(using: &random)!]]]
        case 2:
            let parts = checkpoint["manifests"] as! [Any]
            checkpoint["manifests"] = Array(repeating: parts[1], count: Int.random(in: 1_000...5_000, using: &random)) + parts
        default:
            for _ in 0..<Int.random(in: 1...3, using: &random) {
                if Bool.random(using: &random) { checkpoint = mutate(checkpoint, &random) as? [String: Any] ?? [:] } else { index = mutate(index, &random) as? [String: Any] ?? [:] }
            }
        }
        var indexData = (try? JSONSerialization.data(withJSONObject: index)) ?? Data("{}".utf8)
        // The checkpoint's index is a small blob (at most 64 KiB are kept): past that, it is not read at all.
        var checkpointData = (try? JSONSerialization.data(withJSONObject: checkpoint)) ?? Data("{}".utf8)
        switch Int.random(in: 0..<10, using: &random) {
        case 0: indexData = damage(indexData, &random)
        case 1: checkpointData = damage(checkpointData, &random)
        case 2: indexData = Data(repeating: UInt8(ascii: "["), count: 200_000) + Data(repeating: UInt8(ascii: "]"), count: 200_000)
        case 3: indexData = Data((#"{"manifests":["# + String(repeating: #"{"a":[1,2,3]},"#, count: 70_000) + "{}]}").utf8)
        default: break
        }
        return (indexData, checkpointData)
    }

    /// containerd images with mutated indexes: inspect ends in a StasisError or a summary that prints nothing
    /// hostile and lists at most 1000 files, and the built `stasis inspect` stays within `memoryBound`.
    @Test func ociIndexJSON() throws {
        let root = Harness.scratch("fuzz-oci")
        var criu = Data()
        for name in ["inventory.img", "core-1.img", "pages-1.img", "pagemap-1.img"] { criu += TarBlocks.file(name, Data(count: 100)) }
        criu += TarBlocks.end
        var measured = 0
        let cases = try Self.run("oci", minimum: 200) { index, random in
            let (indexData, checkpointData) = Self.ociIndexes(&random)
            let archive = root + "/case.tar"
            unlink(archive)
            try? Self.ociImage(index: indexData, checkpoint: checkpointData, criu: criu).write(to: URL(fileURLWithPath: archive))
            Self.expectClean("oci case \(index) summarize") {
                let summary = try ArchiveOperation.summarize(archive)
                let printed = [summary.engine, summary.container, summary.name, summary.runtime ?? ""] + summary.files
                #expect(!printed.contains(where: Self.isHostile) && summary.files.count <= Self.listedFiles,
                        "oci case \(index) (seed \(Self.seed)): \(printed.map { $0.prefix(80) })")
            }
            if index % 75 == 0 || indexData.count > 500_000 && measured < 8 {
                try Self.expectBoundedInspect(archive, "oci case \(index)")
                measured += 1
            }
        }
        #expect(cases >= 200 && measured >= 3)
    }
}
