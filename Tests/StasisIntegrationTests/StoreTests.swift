import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisImage
import StasisStore
import StasisTestSupport
import Testing

/// The chunk store with real dumps of real processes: deduplication between checkpoints, codecs, gc and rm,
/// each in a store of its own so the counts are exact.
extension Integration {
@Suite struct ChunkStoreBehaviour {
    func manifest(_ checkpoint: String) throws -> Manifest { try Checkpoint.readManifest(checkpoint) }

    func chunkFiles(_ store: String) -> Set<String> {
        Set((try? DirectoryChunkStore(path: store, create: false))?.allChunks() ?? [])
    }

    /// The codec tags (byte 5 of each chunk file's header) of the chunks a checkpoint lists.
    func codecTags(_ checkpoint: String, store: String) throws -> Set<UInt8> {
        let chunks = try DirectoryChunkStore(path: store, create: false)
        let digests = Set(try manifest(checkpoint).files.flatMap { $0.chunks ?? [] }.filter { !$0.isEmpty })
        return Set(try digests.map { try #require(FileManager.default.contents(atPath: chunks.chunkPath($0)))[5] })
    }

    @Test func secondCheckpointOfARunningJobStoresOnlyWhatChanged() throws {
        let workload = try Workload("counter", ["--mem", "64"])
        defer { workload.stop() }
        let root = Harness.scratch("store")
        let store = root + "/store"
        let env = ["STASIS_STORE": store]
        let first = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/one", "--leave-running"], environment: env)
        #expect(first.succeeded, "\(first.stderr)")
        let second = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/two", "--leave-running"], environment: env)
        #expect(second.succeeded, "\(second.stderr)")
        let one = try #require(try manifest(root + "/one").store)
        let two = try #require(try manifest(root + "/two").store)
        // 64 MiB of pattern (32 chunks) plus the counter's pages: only the chunks holding what ticked are new.
        #expect(one.newChunks >= 32 && one.reusedChunks == 0)
        #expect(two.newChunks <= 3, "second checkpoint wrote \(two.newChunks) chunks")
        #expect(two.reusedChunks >= 30)
        #expect(two.storedBytes * 10 < one.storedBytes, "\(two.storedBytes) added after \(one.storedBytes)")
        #expect(workload.verify().hasPrefix("PASS"))
        // The older checkpoint restores from the shared chunks (the workload's files stay: CRIU reopens its log).
        kill(workload.pid, SIGKILL)
        #expect(Harness.waitGone(workload.pid))
        let restore = try Harness.stasis(["restore", "-D", root + "/one"], environment: env)
        #expect(restore.succeeded, "\(restore.stderr)")
        #expect(workload.verify().hasPrefix("PASS"))
    }

    /// CRIU's pages reach the store once, through the page server: CRIU's log says it sent them down the
    /// socket stasis handed it, the pagemap images stasis wrote for it are in the checkpoint, and the pages
    /// image the manifest lists (as chunks) restores a job that verifies its memory. The same checkpoint
    /// comes from the file path (STASIS_DUMP_PAGES=files: CRIU writes pages-*.img, stasis follows it).
    @Test(arguments: ["page server", "files"])
    func pagesReachTheStoreThroughThePageServer(path: String) throws {
        let workload = try Workload("counter", ["--mem", "32"])
        defer { workload.stop() }
        let root = Harness.scratch("page-server")
        var env = ["STASIS_STORE": root + "/store"]
        if path == "files" { env["STASIS_DUMP_PAGES"] = "files" }
        let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/image"], environment: env)
        try #require(dump.succeeded, "\(dump.stderr)")
        let log = try String(contentsOfFile: root + "/image/criu-dump.log", encoding: .utf8)
        #expect(log.contains("Reusing ps socket") == (path == "page server"), "CRIU's log says otherwise of the \(path) path")
        let files = try manifest(root + "/image").files
        let pages = files.filter { $0.path.hasPrefix("pages-") }
        #expect(pages.count == 1 && pages.allSatisfy { $0.chunks != nil && $0.size >= 32 << 20 }, "\(pages.map(\.path))")
        #expect(files.contains { $0.path == "pagemap-\(workload.pid).img" && $0.chunks == nil })
        #expect(Harness.waitGone(workload.pid))
        let restore = try Harness.stasis(["restore", "-D", root + "/image"], environment: env)
        #expect(restore.succeeded, "\(restore.stderr)")
        #expect(workload.verify().hasPrefix("PASS"))
    }

    /// The counter's pattern-filled buffer compresses: its chunks carry the codec asked for.
    @Test(arguments: ["zstd", "zstd:9", "none"])
    func everyCodecRestores(codec: String) throws {
        let workload = try Workload("counter", ["--mem", "32"])
        defer { workload.stop() }
        let root = Harness.scratch("codec")
        let env = ["STASIS_STORE": root + "/store"]
        let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/ckpt", "--compress", codec], environment: env)
        #expect(dump.succeeded, "\(dump.stderr)")
        #expect(try manifest(root + "/ckpt").store?.codec == (codec == "zstd" ? "zstd:3" : codec))
        // Tags: 0 plain (none, or a chunk that did not shrink), 2 zstd.
        let tags = try codecTags(root + "/ckpt", store: root + "/store")
        #expect(codec == "none" ? tags == [0] : tags.contains(2), "\(tags)")
        #expect(Harness.waitGone(workload.pid))
        let restore = try Harness.stasis(["restore", "-D", root + "/ckpt"], environment: env)
        #expect(restore.succeeded, "\(restore.stderr)")
        #expect(workload.verify().hasPrefix("PASS"))
    }

    /// The images reach CRIU streamed by default and rebuilt as files with --rebuild-dir; each way the memory
    /// comes back intact, for random memory and for zeros (stored as no chunk at all, streamed by vmsplice),
    /// and the rebuilt files are removed afterwards.
    @Test(arguments: [false, true], ["random", "zero"])
    func streamedAndRebuiltRestoresEachVerify(rebuild: Bool, fill: String) throws {
        let workload = try Workload("memory", ["--mem", "40", "--fill", fill])
        defer { workload.stop() }
        let root = Harness.scratch("stream")
        let env = ["STASIS_STORE": root + "/store"]
        #expect(try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/ckpt"], environment: env).succeeded)
        #expect(Harness.waitGone(workload.pid))
        let zeroChunks = try #require(try manifest(root + "/ckpt").store).zeroChunks
        #expect(fill == "zero" ? zeroChunks >= 19 : zeroChunks < 3, "\(zeroChunks) zero chunks")
        try FileManager.default.createDirectory(atPath: root + "/rebuild", withIntermediateDirectories: true)
        let restore = try Harness.stasis(["restore", "-D", root + "/ckpt", "--json"] + (rebuild ? ["--rebuild-dir", root + "/rebuild"] : []),
                                         environment: env)
        #expect(restore.succeeded, "\(restore.stderr)")
        let report = try JSONSerialization.jsonObject(with: Data(restore.stdout.utf8)) as? [String: Any]
        #expect(report?["images"] as? String == (rebuild ? "rebuilt" : "streamed"), "\(restore.stdout)")
        #expect(workload.verify().hasPrefix("PASS"))
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: root + "/rebuild")) ?? []).isEmpty)
    }

    @Test func unknownCodecIsRefusedBeforeAnythingHappens() throws {
        let workload = try Workload("counter")
        defer { workload.stop() }
        let root = Harness.scratch("codec")
        let result = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/ckpt", "--compress", "brotli"],
                                        environment: ["STASIS_STORE": root + "/store"])
        #expect(result.status != 0)
        #expect(result.stderr.contains("unknown compression 'brotli'"))
        #expect(!FileSystem.exists(root + "/ckpt") && !FileSystem.exists(root + "/store"))
        #expect(workload.verify().hasPrefix("PASS"))
    }

    @Test func gcRemovesOnlyChunksNoListedCheckpointUses() throws {
        let workload = try Workload("counter", ["--mem", "16"])
        defer { workload.stop() }
        let root = Harness.scratch("gc")
        let store = root + "/store"
        let env = ["STASIS_STORE": store]
        #expect(try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/one", "--leave-running"], environment: env).succeeded)
        let afterOne = chunkFiles(store)
        #expect(try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/two", "--leave-running"], environment: env).succeeded)
        let used = Set(try manifest(root + "/two").files.flatMap { $0.chunks ?? [] }.filter { !$0.isEmpty })
        let onlyFirst = afterOne.subtracting(used)

        // Nothing unreferenced yet.
        let idle = try Harness.stasis(["gc", "--grace", "0", "--json"], environment: env)
        #expect(idle.succeeded && idle.stdout.contains("\"removedChunks\" : 0"), "\(idle.stdout)")
        let rm = try Harness.stasis(["rm", root + "/one"], environment: env)
        #expect(rm.succeeded, "\(rm.stderr)")
        #expect(!FileSystem.exists(root + "/one"))
        let gc = try Harness.stasis(["gc", "--grace", "0", "--json"], environment: env)
        #expect(gc.succeeded, "\(gc.stderr)")
        #expect(gc.stdout.contains("\"removedChunks\" : \(onlyFirst.count)"), "\(gc.stdout)")
        #expect(chunkFiles(store) == used)
        #expect(try Harness.stasis(["verify", root + "/two"], environment: env).succeeded)
        let list = try Harness.stasis(["ls"], environment: env)
        #expect(list.stdout.contains(root + "/two") && !list.stdout.contains(root + "/one"))
    }

    /// `stasis reserve` on a store in memory: a dump writes into the blanks, its checkpoint restores, gc gives
    /// the removed chunks back; a store on a disk and a size that is none are refused.
    @Test func aReserveIsUsedByADumpAndRefilledByGc() throws {
        let workload = try Workload("memory", ["--mem", "24", "--fill", "random"])
        defer { workload.stop() }
        let root = "/dev/shm/stasis-test-reserve-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { FileSystem.removeTree(root) }
        let env = ["STASIS_STORE": root + "/store"]
        let reserve = try Harness.stasis(["reserve", "16M", "--json"], environment: env)
        #expect(reserve.succeeded && reserve.stdout.contains("\"blanks\" : 8"), "\(reserve.stdout) \(reserve.stderr)")
        let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/ckpt", "--compress", "none"], environment: env)
        #expect(dump.succeeded, "\(dump.stderr)")
        let after = try Harness.stasis(["reserve"], environment: env)
        #expect(after.succeeded && after.stdout.contains(": 0 blank chunk files"), "\(after.stdout)")
        let restore = try Harness.stasis(["restore", "-D", root + "/ckpt"], environment: env)
        #expect(restore.succeeded, "\(restore.stderr)")
        #expect(workload.verify().hasPrefix("PASS"))
        #expect(try Harness.stasis(["rm", root + "/ckpt"], environment: env).succeeded)
        let gc = try Harness.stasis(["gc", "--grace", "0"], environment: env)
        #expect(gc.succeeded && gc.stdout.contains("8 of them kept as the store's reserve"), "\(gc.stdout)")
        #expect(try Harness.stasis(["reserve", "0"], environment: env).succeeded)
        #expect(try FileSystem.namesOrNone(in: root + "/store/reserve").filter { $0.hasPrefix("blank-") }.isEmpty)

        let disk = Harness.scratch("reserve-disk")
        let refused = try Harness.stasis(["reserve", "8M"], environment: ["STASIS_STORE": disk + "/store"])
        #expect(!refused.succeeded && refused.stderr.contains("is not in memory"), "\(refused.stderr)")
        let bad = try Harness.stasis(["reserve", "lots"], environment: env)
        #expect(!bad.succeeded && bad.stderr.contains("is not a size"), "\(bad.stderr)")
    }

    @Test func dumpAndGcAtOnce() throws {
        let workload = try Workload("memory", ["--mem", "256", "--fill", "random"])
        defer { workload.stop() }
        let root = Harness.scratch("gcdump")
        let env = ["STASIS_STORE": root + "/store"]
        // The store must exist for gc; an earlier small checkpoint creates it.
        #expect(try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/first", "--leave-running"], environment: env).succeeded)
        #expect(try Harness.stasis(["rm", root + "/first"], environment: env).succeeded)
        let pid = workload.pid
        let dump = Thread.detachedResult { try Harness.stasis(["dump", "\(pid)", "-D", root + "/ckpt"], environment: env) }
        var collections = 0
        while !dump.isDone {
            let gc = try Harness.stasis(["gc", "--grace", "0"], environment: env)
            #expect(gc.succeeded, "\(gc.stderr)")
            collections += 1
        }
        let result = try dump.value()
        #expect(result.succeeded, "\(result.stderr)")
        #expect(collections >= 1)
        #expect(try Harness.stasis(["gc", "--grace", "0"], environment: env).succeeded)
        let verify = try Harness.stasis(["verify", root + "/ckpt"], environment: env)
        #expect(verify.succeeded, "gc took chunks of a dump that was running: \(verify.stderr)")
        let restore = try Harness.stasis(["restore", "-D", root + "/ckpt"], environment: env)
        #expect(restore.succeeded, "\(restore.stderr)")
        #expect(workload.verify().hasPrefix("PASS"))
    }
}
}
