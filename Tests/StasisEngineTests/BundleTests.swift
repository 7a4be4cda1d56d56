import Foundation
import Glibc
import StasisCore
import StasisEngine
import StasisImage
import StasisOS
import StasisStore
import StasisTestSupport
import Testing

/// `stasis export` / `stasis import` on checkpoints built by hand with the store's own APIs: the files of a
/// real checkpoint's shape (small whole images, a chunked memory image with a repeated, a zero and a short
/// chunk), so every byte can be compared after the move.
@Suite struct Bundles {
    func mode(_ path: String) -> mode_t {
        var st = stat()
        return stat(path, &st) == 0 ? st.st_mode & 0o777 : 0
    }

    /// Every file of the checkpoint in `directory`, whole ones read from it and chunked ones rebuilt from `store`.
    func rebuild(_ directory: String, store: ChunkStore?) throws -> [String: Data] {
        let manifest = try Checkpoint.readManifest(directory)
        var out: [String: Data] = [:]
        for entry in manifest.files where entry.chunks == nil { out[entry.path] = try FileSystem.readFile(directory + "/" + entry.path) }
        if let store, let info = manifest.store {
            let target = Harness.scratch("rebuilt")
            let items = manifest.files.compactMap(ChunkedFiles.Item.init)
            try ChunkedFiles.read(items, from: store, checkpoint: directory, chunkSize: info.chunkSize, into: target)
            for item in items { out[item.path] = try FileSystem.readFile(target + "/" + item.path) }
        }
        return out
    }

    /// Nothing of a failed import is left beside the destination: no directory, no staging sibling.
    func expectNothingPublished(_ destination: String) throws {
        #expect(!FileSystem.exists(destination))
        let parent = URL(fileURLWithPath: destination).deletingLastPathComponent().path
        let name = URL(fileURLWithPath: destination).lastPathComponent
        #expect(try FileManager.default.contentsOfDirectory(atPath: parent).allSatisfy { !$0.hasPrefix(".\(name).partial-") })
    }

    func importError(_ bundle: String, into destination: String, store: String) -> StasisError? {
        #expect(throws: StasisError.self) { try BundleOperation.importBundle(bundle, into: destination, store: store) }
    }

    @Test func movesEveryByteIntoAFreshStore() throws {
        let sample = try SampleCheckpoint.make()
        let bundle = sample.root + "/moved.stasis"
        let exported = try BundleOperation.export(sample.checkpoint, to: bundle, store: nil)
        #expect(exported.files == 2 && exported.chunkedFiles == 1 && exported.chunks == 3)
        #expect(exported.bundleBytes == FileSystem.size(bundle))
        #expect(mode(bundle) == 0o600)

        let destination = sample.root + "/imported"
        let storeB = sample.root + "/store-b"
        let imported = try BundleOperation.importBundle(bundle, into: destination, store: storeB)
        #expect(imported.statistics.chunks == 3 && imported.statistics.newChunks == 3 && imported.statistics.reusedChunks == 0)
        #expect(imported.store == storeB)

        // The same checkpoint, now pointing at store B, private, listed there, and identical byte for byte.
        var manifest = try Checkpoint.readManifest(destination)
        #expect(manifest.store?.path == storeB)
        manifest.store?.path = sample.store.path
        #expect(manifest == sample.manifest)
        #expect(mode(destination) == 0o700)
        for name in try FileManager.default.contentsOfDirectory(atPath: destination) { #expect(mode(destination + "/" + name) == 0o600, "\(name)") }
        let target = try DirectoryChunkStore(path: storeB, create: false)
        #expect(StoreCatalog(store: target).entry(id: manifest.id)?.directory == destination)
        #expect(try rebuild(destination, store: target) == sample.contents)

        // A second copy of the same checkpoint in that store is refused; nothing of it appears.
        let again = importError(bundle, into: sample.root + "/again", store: storeB)
        #expect(again?.code == .invalidArgument && again?.message.contains("already in the store") == true)
        try expectNothingPublished(sample.root + "/again")

        // Back into the original store once the original is removed: its chunks (not yet collected) are reused.
        _ = try StoreCatalog(store: sample.store).remove(sample.checkpoint)
        let back = try BundleOperation.importBundle(bundle, into: sample.root + "/back", store: sample.store.path)
        #expect(back.statistics.newChunks == 0 && back.statistics.reusedChunks == 3)
        #expect(try rebuild(sample.root + "/back", store: sample.store) == sample.contents)
    }

    @Test func checkpointWithoutChunksNeedsNoStoreAndKeepsSegmentedDigests() throws {
        let sample = try SampleCheckpoint.make(chunked: false, largeWholeFile: true)
        #expect(sample.manifest.files.first { $0.path == "big.img" }?.segments?.count == 2)
        let bundle = sample.root + "/whole.stasis"
        let exported = try BundleOperation.export(sample.checkpoint, to: bundle, store: nil)
        #expect(exported.files == 4 && exported.chunks == 0)
        let storeB = sample.root + "/store-b"
        let imported = try BundleOperation.importBundle(bundle, into: sample.root + "/imported", store: storeB)
        #expect(imported.store == nil && !FileSystem.exists(storeB))
        #expect(try rebuild(sample.root + "/imported", store: nil) == sample.contents)
    }

    /// Where a record's payload starts: after its kind, name length, name and payload length.
    func payloadOffset(in data: Data, kind: UInt8, name: String) throws -> Int {
        let header = Data([kind, UInt8(name.utf8.count), 0]) + Data(name.utf8)
        let found = try #require(data.range(of: header))
        return found.upperBound + 8
    }

    @Test(arguments: ["chunk", "file", "manifest", "end"])
    func flippedByteIsRefusedNamingTheRecord(_ record: String) throws {
        let sample = try SampleCheckpoint.make()
        let bundle = sample.root + "/b.stasis"
        _ = try BundleOperation.export(sample.checkpoint, to: bundle, store: nil)
        var data = try FileSystem.readFile(bundle)
        let digest = try #require(sample.manifest.files.first { $0.chunks != nil }?.chunks?.last)
        let offset: Int
        let expected: String
        switch record {
        case "chunk":
            offset = try payloadOffset(in: data, kind: 0x43, name: digest) + 500
            expected = "(chunk \(digest))"
        case "file":
            offset = try payloadOffset(in: data, kind: 0x46, name: "core-1.img") + 100
            expected = "(file core-1.img)"
        case "manifest":
            // Still valid JSON, still a valid manifest: only the bundle's own SHA-256 can tell.
            offset = try #require(data.range(of: Data("bundle-test-host".utf8))).lowerBound + 3
            expected = "(end)"
        default:
            offset = data.count - 1
            expected = "(end)"
        }
        data[offset] ^= 0x20
        let damaged = sample.root + "/damaged.stasis"
        try data.write(to: URL(fileURLWithPath: damaged))
        let destination = sample.root + "/imported"
        let error = importError(damaged, into: destination, store: sample.root + "/store-b")
        #expect(error?.code == .integrity)
        #expect(error?.message.contains("is damaged") == true && error?.message.contains(expected) == true, "\(error?.message ?? "")")
        try expectNothingPublished(destination)
    }

    @Test func truncatedBundleIsRefused() throws {
        let sample = try SampleCheckpoint.make()
        let bundle = sample.root + "/b.stasis"
        _ = try BundleOperation.export(sample.checkpoint, to: bundle, store: nil)
        let data = try FileSystem.readFile(bundle)
        // Inside the end record, exactly before it, inside a chunk, inside the manifest, inside the header.
        for length in [data.count - 1, data.count - 43, data.count / 2, 200, 9] {
            let cut = sample.root + "/cut-\(length).stasis"
            try data.prefix(length).write(to: URL(fileURLWithPath: cut))
            let destination = sample.root + "/imported-\(length)"
            let error = importError(cut, into: destination, store: sample.root + "/store-b")
            #expect(error?.code == .integrity, "cut at \(length)")
            #expect(error?.message.contains("truncated") == true, "cut at \(length): \(error?.message ?? "")")
            try expectNothingPublished(destination)
        }
    }

    @Test func importIntoANonEmptyDirectoryIsRefused() throws {
        let sample = try SampleCheckpoint.make()
        let bundle = sample.root + "/b.stasis"
        _ = try BundleOperation.export(sample.checkpoint, to: bundle, store: nil)
        let destination = sample.root + "/occupied"
        try FileSystem.makePrivateDirectory(destination)
        try Data("keep".utf8).write(to: URL(fileURLWithPath: destination + "/mine"))
        let error = importError(bundle, into: destination, store: sample.root + "/store-b")
        #expect(error?.code == .directoryNotEmpty)
        #expect(try FileManager.default.contentsOfDirectory(atPath: destination) == ["mine"])
        #expect(!FileSystem.exists(sample.root + "/store-b"), "refused before the store is touched")
    }

    @Test func exportRefusesADamagedCheckpointAndLeavesNoFile() throws {
        let sample = try SampleCheckpoint.make()
        func expectRefused(_ code: StasisError.Code, _ text: String) {
            let bundle = sample.root + "/b.stasis"
            let error = #expect(throws: StasisError.self) { try BundleOperation.export(sample.checkpoint, to: bundle, store: nil) }
            #expect(error?.code == code)
            #expect(error?.message.contains(text) == true, "\(error?.message ?? "")")
            #expect(try! FileManager.default.contentsOfDirectory(atPath: sample.root).allSatisfy { !$0.hasPrefix(".b.stasis") })
        }
        // An existing file is never overwritten.
        try Data("old".utf8).write(to: URL(fileURLWithPath: sample.root + "/b.stasis"))
        expectRefused(.invalidArgument, "already exists")
        #expect(try FileSystem.readFile(sample.root + "/b.stasis") == Data("old".utf8))
        unlink(sample.root + "/b.stasis")
        #expect(!FileSystem.exists(sample.root + "/b.stasis"))

        // A chunk gone from the store.
        let digest = try #require(sample.manifest.files.first { $0.chunks != nil }?.chunks?.first)
        let chunk = sample.store.chunkPath(digest)
        let saved = try FileSystem.readFile(chunk)
        unlink(chunk)
        expectRefused(.integrity, "chunk \(digest)")
        #expect(!FileSystem.exists(sample.root + "/b.stasis"))
        try saved.write(to: URL(fileURLWithPath: chunk))

        // A whole file changed after the checkpoint was taken.
        var core = try FileSystem.readFile(sample.checkpoint + "/core-1.img")
        core[10] ^= 1
        try core.write(to: URL(fileURLWithPath: sample.checkpoint + "/core-1.img"))
        expectRefused(.integrity, "core-1.img")
        #expect(!FileSystem.exists(sample.root + "/b.stasis"))
    }

    @Test func commandsPrintWhatTheyDidAndFailClearly() throws {
        let sample = try SampleCheckpoint.make()
        let bundle = sample.root + "/b.stasis"
        let export = try Harness.stasis("export", sample.checkpoint, "-o", bundle, "--json")
        #expect(export.succeeded, "\(export.stderr)")
        let report = try JSONSerialization.jsonObject(with: Data(export.stdout.utf8)) as? [String: Any]
        #expect(report?["chunks"] as? Int == 3 && report?["bundleBytes"] as? Int == Int(FileSystem.size(bundle) ?? 0))

        let destination = sample.root + "/imported"
        let store = sample.root + "/store-b"
        let imported = try Harness.stasis("import", bundle, "-D", destination, "--store", store)
        #expect(imported.succeeded, "\(imported.stderr)")
        #expect(imported.stdout.contains("imported checkpoint \(sample.manifest.id) into \(destination)"))
        #expect(imported.stdout.contains("3 new"))

        let occupied = try Harness.stasis("import", bundle, "-D", destination, "--store", store, "--json")
        #expect(occupied.status != 0)
        #expect(occupied.stdout.contains("\"code\" : \"directory-not-empty\""), "\(occupied.stdout)")
        #expect(occupied.stderr.contains("not empty"))

        let garbage = sample.root + "/garbage"
        try Data("hello, not a bundle".utf8).write(to: URL(fileURLWithPath: garbage))
        let refused = try Harness.stasis("import", garbage, "-D", sample.root + "/other", "--store", store)
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("is not a stasis bundle"))
    }
}
