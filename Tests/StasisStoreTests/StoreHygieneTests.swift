import Foundation
import Glibc
import StasisCore
import StasisOS
@testable import StasisStore
import StasisTestSupport
import Testing

/// The store cleans up after its own writers and checks itself: what dead writers recorded goes at gc (their
/// partial files and directories, their records, half-written records), nothing of a live writer does, a
/// reused PID is not taken for the writer, stale entries are dropped with their chunks, and every level of
/// the store must be this user's alone.
@Suite struct StoreHygiene {
    /// A PID above the kernel's limit (4194304): no process has it.
    static let deadPID: Int32 = 4_194_999

    func makeStore(_ name: String) throws -> (root: String, store: ChunkStore) {
        let root = Harness.scratch(name)
        return (root, try DirectoryChunkStore(path: root + "/store", create: true))
    }

    func write(_ text: String, to path: String) throws {
        try FileSystem.makePrivateDirectory(URL(fileURLWithPath: path).deletingLastPathComponent().path)
        try Data(text.utf8).write(to: URL(fileURLWithPath: path))
    }

    func names(_ directory: String) -> Set<String> { Set((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []) }

    @Test func whatDeadWritersRecordedGoesAndALiveWritersStays() throws {
        let (root, store) = try makeStore("writers")
        let out = root + "/out"
        try FileSystem.makePrivateDirectory(out)
        let dead = Self.deadPID
        // A dead dump's staging directory (named exactly), a dead export's file (a pattern), and files of the
        // same destination that are not the dead writer's.
        try FileSystem.makePrivateDirectory("\(out)/.ckpt.partial-\(dead)-AbC123/sub")
        try write("image", to: "\(out)/.ckpt.partial-\(dead)-AbC123/sub/pages-1.img")
        try write("half a bundle", to: "\(out)/.b.partial-\(dead)-77")
        try write("half a bundle", to: "\(out)/.b.partial-\(dead)-78")
        try write("another writer's", to: "\(out)/.b.partial-\(dead + 1)-1")
        try write("\(out)/.ckpt.partial-\(dead)-AbC123\n\(out)/.b.partial-\(dead)-*\n/etc/passwd\n\(out)/../x/.y.partial-\(dead)-1\n",
                  to: "\(store.path)/writers/\(dead).12345.99")
        // Leftovers of writing a record, new and old style, and an old-style record (no start time).
        try write("\(out)/.b.partial-\(dead)-77\n", to: "\(store.path)/writers/\(dead).12345.100.tmp-\(dead)")
        try write("", to: "\(store.path)/writers/\(dead).101.tmp-\(dead)")
        try write("\(out)/.old.partial-\(dead)-q\n", to: "\(store.path)/writers/\(dead).102")
        try FileSystem.makePrivateDirectory("\(out)/.old.partial-\(dead)-q")
        // This process, alive: its record and partials stay.
        let live = try StoreWriter(store: store, partialsOf: out + "/mine")
        try write("mine", to: "\(out)/.mine.partial-\(getpid())-5")

        let catalog = StoreCatalog(store: store)
        let preview = try catalog.collect(dryRun: true, graceSeconds: 0)
        #expect(preview.removedPartialDirectories == 2 && preview.removedPartialFiles == 2 && preview.removedWriterRecords == 4, "\(preview)")
        #expect(names(out).count == 6, "a dry run removes nothing")

        let report = try catalog.collect(graceSeconds: 0)
        #expect(report.removedPartialDirectories == 2 && report.removedPartialFiles == 2 && report.removedWriterRecords == 4, "\(report)")
        #expect(names(out) == [".b.partial-\(dead + 1)-1", ".mine.partial-\(getpid())-5"])
        #expect(names(store.path + "/writers") == [URL(fileURLWithPath: live.record).lastPathComponent])
        #expect(FileSystem.exists("/etc/passwd"))
        live.release()
        #expect(names(store.path + "/writers").isEmpty)
    }

    /// A record naming this very PID but another start time is a dead writer whose PID was reused.
    @Test func aReusedPIDIsNotTakenForTheWriter() throws {
        let (root, store) = try makeStore("reused")
        let me = try #require(ProcessIdentity.current.startTime)
        try write("partial", to: "\(root)/.b.partial-\(getpid())-1")
        try write("\(root)/.b.partial-\(getpid())-*\n", to: "\(store.path)/writers/\(getpid()).\(me + 1).7")
        try write("\(root)/.c.partial-\(getpid())-*\n", to: "\(store.path)/writers/\(getpid()).\(me).8")
        try write("partial", to: "\(root)/.c.partial-\(getpid())-1")
        let report = try StoreCatalog(store: store).collect(graceSeconds: 0)
        #expect(report.removedPartialFiles == 1 && report.removedWriterRecords == 1, "\(report)")
        #expect(!FileSystem.exists("\(root)/.b.partial-\(getpid())-1"))
        #expect(FileSystem.exists("\(root)/.c.partial-\(getpid())-1"), "the record of this live process stays, and what it lists")
    }

    @Test func recordNamesAndLines() {
        #expect(StoreWriter.writer(ofRecordNamed: "12.345.678") == ProcessIdentity(pid: 12, startTime: 345))
        #expect(StoreWriter.writer(ofRecordNamed: "12.678") == ProcessIdentity(pid: 12, startTime: nil))
        #expect(StoreWriter.writer(ofRecordNamed: "12.345.678.tmp-12") == ProcessIdentity(pid: 12, startTime: 345))
        for bad in ["x.1", "12", "12.x.1", "0.1.2", "-3.1.2", "12.1.2.3", "12.1.tmp-x", ".tmp-1"] {
            #expect(StoreWriter.writer(ofRecordNamed: bad) == nil, "\(bad)")
        }
        #expect(StoreWriter.isPartial("/a/.b.partial-7-*", of: 7))
        #expect(StoreWriter.isPartial("/a/.b.partial-7-xyz", of: 7))
        for bad in ["/a/.b.partial-8-*", "/a/b.partial-7-*", "/a/.b.partial-7-*x", "/a/.b*.partial-7-*", "a/.b.partial-7-1",
                    "/a/../.b.partial-7-1", "/", "/a/*"] {
            #expect(!StoreWriter.isPartial(bad, of: 7), "\(bad)")
        }
        #expect(StoreWriter.partialPattern(of: "/a/./b/../c", owner: 9) == "/a/.c.partial-9-*")
    }

    @Test func thisProcessIsLiveAndAnotherStartTimeIsNot() throws {
        let me = ProcessIdentity.current
        let start = try #require(me.startTime)
        #expect(me.isLive)
        #expect(!ProcessIdentity(pid: me.pid, startTime: start + 1).isLive)
        #expect(!ProcessIdentity(pid: Self.deadPID, startTime: nil).isLive)
    }

    /// A checkpoint whose directory is gone is dropped by gc, which says so, and its chunks go; a rescue
    /// entry (no directory), a directory with a manifest that does not parse, and one present stay listed.
    @Test func staleEntriesAreDroppedAndTheirChunksFreed() throws {
        let gone = try SampleCheckpoint.make()
        let store = gone.store, catalog = StoreCatalog(store: gone.store)
        let chunks = Set(store.allChunks())
        #expect(!chunks.isEmpty)
        var rescue = SampleCheckpoint.manifest()
        rescue.id = "rescue-1-by-2-abc"
        try catalog.register(rescue, directory: "(device memory of PID 1, held by its agent)")
        var damaged = SampleCheckpoint.manifest()
        damaged.id = "damaged-one"
        let damagedDirectory = gone.root + "/damaged"
        try write("{not json", to: damagedDirectory + "/manifest.json")
        try catalog.register(damaged, directory: damagedDirectory)
        var replaced = SampleCheckpoint.manifest()
        replaced.id = "replaced-one"
        try catalog.register(replaced, directory: gone.checkpoint)  // the directory holds another checkpoint's manifest
        let stale = try catalog.entries().filter(StoreCatalog.isStale).map(\.manifest.id)
        #expect(stale == ["replaced-one"], "the sample's own directory is there")

        FileSystem.removeTree(gone.checkpoint)
        #expect(Set(try catalog.entries().filter(StoreCatalog.isStale).map(\.manifest.id)) == [gone.manifest.id, "replaced-one"])
        let preview = try catalog.collect(dryRun: true, graceSeconds: 0)
        #expect(Set(preview.droppedCheckpoints.map(\.id)) == [gone.manifest.id, "replaced-one"])
        #expect(preview.removedChunks == chunks.count)
        #expect(try catalog.entries().count == 4, "a dry run drops nothing")
        #expect(Set(store.allChunks()) == chunks)

        let report = try catalog.collect(graceSeconds: 0)
        #expect(report.droppedCheckpoints.contains(.init(id: gone.manifest.id, directory: gone.checkpoint)), "\(report)")
        #expect(report.removedChunks == chunks.count && report.checkpoints == 2, "\(report)")
        #expect(Set(try catalog.entries().map(\.manifest.id)) == [rescue.id, damaged.id])
        #expect(store.allChunks().isEmpty)
    }

    /// Every level stasis reads or writes must be this user's and closed to others, a chunks/XX included.
    @Test(arguments: ["chunks/XX", "writers", "checkpoints", "tmp", "chunks"])
    func aLevelOthersMayWriteOrOwnIsRefused(level: String) throws {
        let sample = try SampleCheckpoint.make()
        let path = sample.store.path + "/" + (level == "chunks/XX" ? "chunks/" + sample.store.allChunks()[0].prefix(2) : level)
        try FileSystem.makePrivateDirectory(path)
        #expect(chmod(path, 0o777) == 0)
        let open = #expect(throws: StasisError.self) { try DirectoryChunkStore(path: sample.store.path, create: false) }
        #expect(open?.code == .permission && open?.message.contains(path + " can be written by other users") == true, "\(String(describing: open))")
        #expect(chmod(path, 0o700) == 0)
        _ = try DirectoryChunkStore(path: sample.store.path, create: false)
        guard geteuid() == 0 else { return }
        #expect(chown(path, 65534, 65534) == 0)
        let foreign = #expect(throws: StasisError.self) { try DirectoryChunkStore(path: sample.store.path, create: true) }
        #expect(foreign?.message.contains(path + " belongs to user 65534") == true, "\(String(describing: foreign))")
    }

    @Test func anEmptyStorePathAndABadGraceAreRefused() throws {
        let empty = #expect(throws: StasisError.self) { try DirectoryChunkStore(path: "", create: true) }
        #expect(empty?.message.contains("path is empty") == true)
        let (_, store) = try makeStore("grace")
        for grace in [Double.nan, .infinity, -1] {
            let refused = #expect(throws: StasisError.self) { try StoreCatalog(store: store).collect(graceSeconds: grace) }
            #expect(refused?.code == .invalidArgument, "\(grace)")
        }
    }
}
