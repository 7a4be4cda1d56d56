import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisImage
import StasisStore
import StasisTestSupport
import Testing

/// The store cleans up after its own writers, with real stasis processes killed for real: an export or an
/// import killed midway leaves hidden partials that `stasis gc` finds through the store and removes; a dump
/// killed between its listing and its publish leaves a stale entry that `ls` reports and gc drops, its chunks
/// freed; a store with a level others may write, an empty --store and a grace that is no number are refused.
extension Integration {
@Suite struct StoreHygieneBehaviour {
    /// Starts stasis with STASIS_FAULT=`fault`, waits until it says it stalled there, and kills it (SIGKILL).
    func killStalled(_ arguments: [String], fault: String, store: String) throws {
        let errors = Harness.scratch("stalled") + "/stderr"
        _ = FileManager.default.createFile(atPath: errors, contents: nil)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Harness.stasis)
        process.arguments = arguments
        var environment = ProcessInfo.processInfo.environment
        environment["STASIS_FAULT"] = "\(fault)-stall"
        environment["STASIS_STORE"] = store
        process.environment = environment
        process.standardOutput = FileHandle.nullDevice
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errors))
        try process.run()
        let deadline = Date().addingTimeInterval(60)
        var said = ""
        while Date() < deadline, process.isRunning, !said.contains("stalled at \(fault)") {
            usleep(20_000)
            said = (try? String(contentsOfFile: errors, encoding: .utf8)) ?? ""
        }
        #expect(said.contains("stalled at \(fault)"), "stasis \(arguments[0]) was to stall at \(fault): \(said)")
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        #expect(process.terminationReason == .uncaughtSignal && process.terminationStatus == SIGKILL)
    }

    func partials(in directory: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { $0.contains(".partial-") }.sorted()
    }

    func gc(_ store: String, _ extra: [String] = []) throws -> [String: Any] {
        let result = try Harness.stasis(["gc", "--json", "--store", store] + extra)
        #expect(result.succeeded, "\(result.stderr)")
        return try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any], "\(result.stdout)")
    }

    func records(_ store: String) -> [String] { (try? FileManager.default.contentsOfDirectory(atPath: store + "/writers")) ?? [] }

    /// kill -9 of an export with its hidden bundle file on disk, partly written: gc removes the file (which
    /// the next export of the same name would otherwise be the only one to find) and the record.
    @Test func anExportKilledMidwayLeavesAFileThatGcRemoves() throws {
        let sample = try SampleCheckpoint.make()
        let out = Harness.scratch("export-killed")
        try killStalled(["export", sample.checkpoint, "-o", out + "/bundle"], fault: "partial-written", store: sample.store.path)
        let left = partials(in: out)
        #expect(left.count == 1 && left.first?.hasPrefix(".bundle.partial-") == true, "\(left)")
        #expect((left.first.flatMap { FileSystem.size(out + "/" + $0) } ?? 0) > 0, "the export had written part of the bundle")
        #expect(records(sample.store.path).count == 1, "the dead export's record")
        let report = try gc(sample.store.path)
        #expect(report["removedPartialFiles"] as? Int == 1 && report["removedWriterRecords"] as? Int == 1, "\(report)")
        #expect(partials(in: out).isEmpty && records(sample.store.path).isEmpty)
        // The checkpoint exported is untouched, listed, and exports again.
        #expect(report["checkpoints"] as? Int == 1 && report["removedChunks"] as? Int == 0, "\(report)")
        let again = try Harness.stasis(["export", sample.checkpoint, "-o", out + "/bundle", "--store", sample.store.path])
        #expect(again.succeeded, "\(again.stderr)")
        #expect(records(sample.store.path).isEmpty, "a finished export removes its own record")
    }

    /// kill -9 of an import once its staging directories are made: gc removes both and the record.
    @Test func anImportKilledMidwayLeavesDirectoriesThatGcRemoves() throws {
        let sample = try SampleCheckpoint.make()
        let root = Harness.scratch("import-killed")
        let bundle = root + "/bundle", store = root + "/store"
        let export = try Harness.stasis(["export", sample.checkpoint, "-o", bundle])
        #expect(export.succeeded, "\(export.stderr)")
        try killStalled(["import", bundle, "-D", root + "/imported", "--store", store], fault: "import-staged", store: store)
        #expect(partials(in: root).count == 2 && partials(in: root).allSatisfy { $0.hasPrefix(".imported.partial-") }, "\(partials(in: root))")
        #expect(records(store).count == 1)
        let report = try gc(store)
        #expect(report["removedPartialDirectories"] as? Int == 2 && report["removedWriterRecords"] as? Int == 1, "\(report)")
        #expect(partials(in: root).isEmpty && records(store).isEmpty)
        let again = try Harness.stasis(["import", bundle, "-D", root + "/imported", "--store", store])
        #expect(again.succeeded, "\(again.stderr)")
        #expect(records(store).isEmpty, "a finished import removes its own record")
    }

    /// A dump killed after it listed its checkpoint and before the rename that publishes it: the job runs on,
    /// `ls` shows the entry as stale, and gc drops it (saying so), frees its chunks and removes the staging.
    @Test func aDumpKilledBetweenListingAndPublishLeavesAStaleEntryThatGcCollects() throws {
        let workload = try Workload("counter", ["--mem", "8"])
        defer { workload.stop() }
        let root = Harness.scratch("killed-listed")
        let store = root + "/store"
        let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/image"], environment: ["STASIS_FAULT": "listed-kill", "STASIS_STORE": store])
        #expect(dump.status == SIGKILL, "stasis was to die once listed: \(dump.stderr)")
        #expect(workload.verify().hasPrefix("PASS"), "CRIU thaws the job when stasis dies inside post-dump")
        #expect(!FileSystem.exists(root + "/image"))

        let listing = try Harness.stasis(["ls", "--json", "--store", store])
        #expect(listing.succeeded, "\(listing.stderr)")
        let rows = try #require((try JSONSerialization.jsonObject(with: Data(listing.stdout.utf8)) as? [String: Any])?["checkpoints"] as? [[String: Any]])
        #expect(rows.count == 1 && rows.first?["stale"] as? Bool == true && rows.first?["present"] as? Bool == false, "\(rows)")
        let id = try #require(rows.first?["id"] as? String)
        let text = try Harness.stasis(["ls", "--store", store])
        #expect(text.stdout.contains("\(id)") && text.stdout.contains("stale"), "\(text.stdout)")
        let chunks = try DirectoryChunkStore(path: store, create: false).allChunks()
        #expect(!chunks.isEmpty)

        let preview = try Harness.stasis(["gc", "--dry-run", "--grace", "0", "--store", store])
        #expect(preview.stdout.contains("would drop \(id): its directory \(root)/image is gone"), "\(preview.stdout)")
        let report = try gc(store, ["--grace", "0"])
        let dropped = try #require(report["droppedCheckpoints"] as? [[String: Any]])
        #expect(dropped.count == 1 && dropped.first?["id"] as? String == id && dropped.first?["directory"] as? String == root + "/image", "\(report)")
        #expect(report["removedChunks"] as? Int == chunks.count && report["checkpoints"] as? Int == 0, "\(report)")
        #expect(report["removedPartialDirectories"] as? Int == 2, "the dead dump's staging and work directories: \(report)")
        #expect(try DirectoryChunkStore(path: store, create: false).allChunks().isEmpty, "its chunks are freed")
        #expect(partials(in: root).isEmpty)
        let after = try Harness.stasis(["ls", "--store", store])
        #expect(after.stdout.contains("0 checkpoints"), "\(after.stdout)")
        #expect(workload.verify().hasPrefix("PASS"))
    }

    /// A chunks/XX directory that others may write, or that another user owns, is refused by every command
    /// that opens the store, naming it.
    @Test func aChunkDirectoryOthersMayWriteOrOwnIsRefused() throws {
        let sample = try SampleCheckpoint.make()
        let prefix = sample.store.path + "/chunks/" + sample.store.allChunks()[0].prefix(2)
        #expect(chmod(prefix, 0o777) == 0)
        for arguments in [["ls"], ["gc"], ["verify", sample.checkpoint]] {
            let result = try Harness.stasis(arguments + ["--store", sample.store.path])
            #expect(result.status == 1, "\(arguments[0]): \(result.stderr)")
            #expect(result.stderr.contains("\(prefix) can be written by other users") && result.stderr.contains("chmod go-w"),
                    "\(arguments[0]): \(result.stderr)")
        }
        #expect(chmod(prefix, 0o700) == 0)
        #expect(try Harness.stasis(["ls", "--store", sample.store.path]).succeeded)
        #expect(chown(prefix, 65534, 65534) == 0)
        let foreign = try Harness.stasis(["gc", "--store", sample.store.path])
        #expect(foreign.status == 1 && foreign.stderr.contains("\(prefix) belongs to user 65534"), "\(foreign.stderr)")
    }

    /// `--store ""` (or STASIS_STORE="") would make the current directory a store; a grace that is not a
    /// number of seconds would make gc keep or remove what no one meant.
    @Test func anEmptyStoreAndAGraceThatIsNoNumberAreRefused() throws {
        let cwd = Harness.scratch("empty-store")
        for arguments in [["ls", "--store", ""], ["gc", "--store", ""], ["dump", "1", "-D", cwd + "/x", "--store", ""]] {
            let result = try Harness.run("/bin/sh", ["-c", "cd \(cwd) && exec \"$0\" \"$@\"", Harness.stasis] + arguments)
            #expect(!result.succeeded && result.stderr.contains("--store is empty"), "\(arguments): \(result.stderr)")
        }
        let fromEnvironment = try Harness.run("/bin/sh", ["-c", "cd \(cwd) && exec \"$0\" gc", Harness.stasis], environment: ["STASIS_STORE": ""])
        #expect(fromEnvironment.status == 1 && fromEnvironment.stderr.contains("path is empty"), "\(fromEnvironment.stderr)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: cwd).isEmpty, "nothing was made a store")
        let store = Harness.scratch("grace") + "/store"
        _ = try DirectoryChunkStore(path: store, create: true)
        for grace in ["nan", "inf", "-1", "-nan"] {
            let result = try Harness.stasis(["gc", "--grace=\(grace)", "--store", store])
            #expect(!result.succeeded && result.stderr.contains("--grace must be a number of seconds"), "\(grace): \(result.stderr)")
        }
        #expect(try Harness.stasis(["gc", "--grace", "0", "--store", store]).succeeded)
    }
}
}
