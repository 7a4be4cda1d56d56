import Foundation
import Glibc
import StasisCore
import StasisImage
import StasisOS
import StasisStore
import StasisTestSupport
import Testing

/// Attacks on stasis's promises that once broke them: a dump killed after its publish, manifests edited to
/// point outside their directory or at other processes, numbers that trapped, stores of other users, chunks
/// planted or damaged in the store. Each test failed before its fix.
extension Integration {
@Suite struct Reliability {
    /// A counter whose checkpoint is finished and whose original is gone.
    func stoppedCheckpoint(_ name: String) throws -> (Workload, String) {
        let workload = try Workload("counter", ["--mem", "8"])
        let checkpoint = Harness.scratch(name) + "/image"
        let dump = try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint)
        #expect(dump.succeeded, "\(dump.stderr)")
        #expect(Harness.waitGone(workload.pid))
        return (workload, checkpoint)
    }

    /// Rewrites a checkpoint's manifest.json through its JSON object (a hand edit).
    func editManifest(_ checkpoint: String, _ edit: (inout [String: Any]) -> Void) throws {
        let path = checkpoint + "/manifest.json"
        var object = try #require(try JSONSerialization.jsonObject(with: try FileSystem.readFile(path)) as? [String: Any])
        edit(&object)
        try FileSystem.writeAtomically(try JSONSerialization.data(withJSONObject: object), to: path)
    }

    /// stasis ended by a signal (a trap) rather than exiting: what a crash looks like from outside.
    func crashed(_ result: Harness.Result) -> Bool { result.status != 0 && result.status != 1 && result.status != 64 }

    /// stasis is killed at each step from the publish of the checkpoint to CRIU's exit (STASIS_FAULT=STEP-kill).
    /// Whatever the step, the job is not lost: either CRIU thawed it (killed inside post-dump, CRIU lost its
    /// peer) or the published checkpoint verifies and restores. The dead dump's work directory is found by gc.
    @Test(arguments: ["published", "criu-exited", "manifest-rewritten", "log-moved"])
    func aDumpKilledAfterItsPublishLeavesACheckpointThatRestores(step: String) throws {
        let workload = try Workload("counter", ["--mem", "8"])
        defer { workload.stop() }
        let root = Harness.scratch("killed-\(step)")
        let checkpoint = root + "/image"
        let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", checkpoint], environment: ["STASIS_FAULT": "\(step)-kill"])
        #expect(dump.status == SIGKILL, "stasis was to die at \(step): \(dump.stderr)")
        if step == "published" {
            #expect(workload.verify().hasPrefix("PASS"), "CRIU thaws the tree when stasis dies inside post-dump")
            kill(workload.pid, SIGKILL)
        }
        #expect(Harness.waitGone(workload.pid))
        let verify = try Harness.stasis("verify", checkpoint)
        #expect(verify.succeeded, "\(verify.stderr)")
        let restore = try Harness.stasis("restore", "-D", checkpoint)
        #expect(restore.succeeded, "\(restore.stderr)")
        #expect(restore.stdout.contains("root PID \(workload.pid)"), "\(restore.stdout)")
        #expect(workload.verify().hasPrefix("PASS"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: root).contains { $0.contains(".partial-") } == (step != "log-moved"),
                "until gc, the dead dump's work directory is there (log-moved removed it itself)")
        let gc = try Harness.stasis("gc")
        #expect(gc.succeeded, "\(gc.stderr)")
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: root).filter { $0.contains(".partial-") }
        #expect(leftovers.isEmpty, "gc removes a dead dump's partial directories: \(leftovers)")
    }

    /// A dump killed before its publish (inside post-dump, the tree frozen) leaves a staging directory as big
    /// as the image; CRIU thaws the job, and gc finds and removes what the dead dump left.
    @Test func gcRemovesWhatADumpKilledBeforeItsPublishLeft() throws {
        let workload = try Workload("counter", ["--mem", "8"])
        defer { workload.stop() }
        let root = Harness.scratch("killed-early")
        let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/image"], environment: ["STASIS_FAULT": "post-dump-kill"])
        #expect(dump.status == SIGKILL)
        #expect(workload.verify().hasPrefix("PASS"), "the job runs on")
        #expect(!FileSystem.exists(root + "/image"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: root).filter { $0.contains(".partial-") }.count == 2)
        let gc = try Harness.stasis("gc", "--json")
        #expect(gc.succeeded, "\(gc.stderr)")
        let report = try JSONSerialization.jsonObject(with: Data(gc.stdout.utf8)) as? [String: Any]
        #expect(report?["removedPartialDirectories"] as? Int == 2, "\(gc.stdout)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: root).isEmpty)
    }

    /// A chunked file named ../../x passes no check: verify, inspect, export and restore (streamed and
    /// rebuilt) refuse it, and nothing is written outside the rebuild directory.
    @Test func aManifestNamingAPathOutsideIsRefusedEverywhere() throws {
        let (workload, checkpoint) = try stoppedCheckpoint("outside")
        defer { workload.stop() }
        let escaped = "../../escaped-\(UInt32.random(in: 0...UInt32.max)).img"
        try editManifest(checkpoint) { object in
            var files = object["files"] as! [[String: Any]]
            let index = files.firstIndex { ($0["path"] as! String).hasPrefix("pages-") }!
            files[index]["path"] = escaped
            object["files"] = files
        }
        let rebuild = Harness.scratch("outside-rebuild") + "/r"
        for arguments in [["verify", checkpoint], ["inspect", checkpoint], ["export", checkpoint, "-o", Harness.scratch("outside-export") + "/b"],
                          ["restore", "-D", checkpoint], ["restore", "-D", checkpoint, "--rebuild-dir", rebuild]] {
            let result = try Harness.stasis(arguments)
            #expect(result.status == 1, "\(arguments[0]): \(result.stderr)")
            #expect(result.stderr.contains("is not a plain relative path"), "\(arguments[0]): \(result.stderr)")
        }
        let outside = URL(fileURLWithPath: rebuild + "/stasis-rebuild-x/" + escaped).standardizedFileURL.path
        #expect(!FileSystem.exists(outside))
        #expect(!ProcFS.exists(workload.pid), "nothing was restored")
    }

    /// A negative PID (a process group; -1 is every process) in the manifest is refused before anything runs.
    @Test func aManifestWithANegativePIDIsRefused() throws {
        let (workload, checkpoint) = try stoppedCheckpoint("negative")
        defer { workload.stop() }
        try editManifest(checkpoint) { object in
            var tree = object["processTree"] as! [String: Any]
            var processes = tree["processes"] as! [[String: Any]]
            processes[0]["pid"] = -1
            tree["processes"] = processes
            tree["rootPID"] = -1
            object["processTree"] = tree
        }
        let restore = try Harness.stasis("restore", "-D", checkpoint)
        #expect(restore.status == 1)
        #expect(restore.stderr.contains("process PID -1 is not a PID"), "\(restore.stderr)")
        #expect(!ProcFS.exists(workload.pid))
    }

    /// The root PID a restore prints is the one CRIU restored, not whatever the manifest claims; and a
    /// failure after CRIU stops only the tree CRIU restored.
    @Test func theRestoredRootIsTheOneCRIUReports() throws {
        let (workload, checkpoint) = try stoppedCheckpoint("root")
        defer { workload.stop() }
        let claimed: Int32 = 4_000_003
        try editManifest(checkpoint) { object in
            var tree = object["processTree"] as! [String: Any]
            var processes = tree["processes"] as! [[String: Any]]
            var fake = processes[0]
            fake["pid"] = Int(claimed)
            processes.insert(fake, at: 0)
            tree["processes"] = processes
            tree["rootPID"] = Int(claimed)
            object["processTree"] = tree
        }
        let restore = try Harness.stasis("restore", "-D", checkpoint)
        #expect(restore.succeeded, "\(restore.stderr)")
        #expect(restore.stdout.contains("root PID \(workload.pid)"), "\(restore.stdout)")
        #expect(workload.verify().hasPrefix("PASS"))
    }

    /// Numbers that trapped (a chunk size of 0 divided by) are refused with an error.
    @Test(arguments: [0, -2097152, 3, 1 << 40])
    func aChunkSizeOutOfRangeIsAnErrorNotACrash(size: Int) throws {
        let (workload, checkpoint) = try stoppedCheckpoint("chunksize")
        defer { workload.stop() }
        try editManifest(checkpoint) { object in
            var store = object["store"] as! [String: Any]
            store["chunkSize"] = size
            object["store"] = store
        }
        for arguments in [["verify", checkpoint], ["restore", "-D", checkpoint], ["inspect", checkpoint]] {
            let result = try Harness.stasis(arguments)
            #expect(!crashed(result), "\(arguments[0]) crashed: status \(result.status)")
            #expect(result.status == 1 && result.stderr.contains("chunk size \(size) is not"), "\(arguments[0]): \(result.stderr)")
        }
    }

    /// Tar sizes of 2^63 and more (base-256 and pax) trapped on overflow and left a .partial directory.
    @Test(arguments: ["base256", "pax"])
    func aTarSizeBeyondAnyArchiveIsRefused(kind: String) throws {
        let root = Harness.scratch("tar-\(kind)")
        let archive = root + "/huge.tar"
        var data = Data()
        if kind == "pax" {
            let record = "29 size=18446744073709551615\n"
            data += TarBlocks.header(name: "PaxHeaders/config.dump", size: .octal(UInt64(record.utf8.count)), type: "x")
            data += TarBlocks.padded(Data(record.utf8))
            data += TarBlocks.header(name: "config.dump", size: .octal(0), type: "0")
        } else {
            data += TarBlocks.header(name: "config.dump", size: .base256(1 << 63), type: "0")
        }
        data += Data(count: 1024)
        try data.write(to: URL(fileURLWithPath: archive))
        let inspect = try Harness.stasis("inspect", archive)
        #expect(!crashed(inspect) && inspect.status == 1, "inspect: \(inspect.status) \(inspect.stderr)")
        let imported = try Harness.stasis("import", archive, "-D", root + "/ckpt")
        #expect(!crashed(imported) && imported.status == 1, "import: \(imported.status) \(imported.stderr)")
        #expect(imported.stderr.contains("claims") || imported.stderr.contains("not a number"), "\(imported.stderr)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: root) == ["huge.tar"], "nothing left behind")
    }

    /// An engine's config.dump that is not JSON, or lacks what stasis reads, is named as such (it was a raw
    /// DecodingError), and nothing is left behind.
    @Test(arguments: ["{not json", #"{"name": "x"}"#])
    func aBadConfigDumpIsNamed(config: String) throws {
        let root = Harness.scratch("bad-config")
        let archive = root + "/bad.tar"
        var data = Data()
        for (name, contents) in [("config.dump", config), ("spec.dump", "{}"), ("checkpoint/inventory.img", "inventory")] {
            data += TarBlocks.header(name: name, size: .octal(UInt64(contents.utf8.count)), type: "0")
            data += TarBlocks.padded(Data(contents.utf8))
        }
        data += Data(count: 1024)
        try data.write(to: URL(fileURLWithPath: archive))
        for arguments in [["inspect", archive], ["import", archive, "-D", root + "/ckpt"]] {
            let result = try Harness.stasis(arguments)
            #expect(result.status == 1, "\(arguments[0]): \(result.stderr)")
            #expect(result.stderr.contains("its config.dump"), "\(arguments[0]): \(result.stderr)")
            #expect(!result.stderr.contains("DecodingError"), "\(result.stderr)")
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: root) == ["bad.tar"], "nothing left behind")
    }

    /// A store that another user owns, or that others may write to, is refused before the job is touched.
    @Test(arguments: ["owner", "mode"])
    func aStoreOthersControlIsRefused(how: String) throws {
        let workload = try Workload("counter", ["--mem", "8"])
        defer { workload.stop() }
        let root = Harness.scratch("foreign-store")
        let store = root + "/store"
        #expect(try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/one", "--leave-running", "--store", store]).succeeded)
        if how == "owner" { #expect(chown(store, 65534, 65534) == 0) } else { #expect(chmod(store, 0o777) == 0) }
        let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/two", "--store", store])
        #expect(dump.status == 1)
        #expect(dump.stderr.contains(how == "owner" ? "belongs to user 65534" : "can be written by other users"), "\(dump.stderr)")
        #expect(!FileSystem.exists(root + "/two"))
        #expect(workload.verify().hasPrefix("PASS"), "the job runs on")
        let restore = try Harness.stasis(["restore", "-D", root + "/one", "--store", store])
        #expect(restore.status == 1 && restore.stderr.contains("stasis does not trust it"), "\(restore.stderr)")
    }

    /// A checkpoint directory that others may write to is not trusted either; one stasis cannot read says
    /// permission denied, not "no manifest.json".
    @Test func aCheckpointOthersControlOrThatCannotBeReadIsNamedAsSuch() throws {
        let (workload, checkpoint) = try stoppedCheckpoint("foreign-checkpoint")
        defer { workload.stop() }
        #expect(chmod(checkpoint, 0o777) == 0)
        let verify = try Harness.stasis("verify", checkpoint)
        #expect(verify.status == 1 && verify.stderr.contains("can be written by other users"), "\(verify.stderr)")
        #expect(chmod(checkpoint, 0o700) == 0)
        // As another user: the directory (0700, root's) cannot even be looked into.
        #expect(chmod((checkpoint as NSString).deletingLastPathComponent, 0o755) == 0)
        let asNobody = try Harness.run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", Harness.stasis, "verify", checkpoint])
        #expect(asNobody.status == 1)
        #expect(asNobody.stderr.contains("Permission denied") || asNobody.stderr.contains("belongs to user 0"), "\(asNobody.stderr)")
        #expect(!asNobody.stderr.contains("has no manifest.json"))
    }

    /// A chunk planted by another user, or damaged since it was written, is not counted as already there:
    /// the next dump writes its own copy, so the checkpoint that ends the job restores.
    @Test(arguments: ["planted", "damaged"])
    func aReusedChunkIsKnownGood(how: String) throws {
        let workload = try Workload("counter", ["--mem", "16"])
        defer { workload.stop() }
        let root = Harness.scratch("reuse-\(how)")
        let store = root + "/store"
        #expect(try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/one", "--leave-running", "--store", store]).succeeded)
        let manifest = try Checkpoint.readManifest(root + "/one")
        let pages = try #require(manifest.files.first { $0.path.hasPrefix("pages-") && $0.chunks != nil })
        // The pattern buffer's chunks do not change between the dumps: the second reuses them.
        let digest = try #require(pages.chunks?.filter { !$0.isEmpty }.dropFirst().first)
        let chunk = try DirectoryChunkStore(path: store, create: false).chunkPath(digest)
        let original = try FileSystem.readFile(chunk)
        var bad = original
        bad[bad.count / 2] ^= 0x5a
        unlink(chunk)
        try bad.write(to: URL(fileURLWithPath: chunk))
        if how == "planted" { #expect(chown(chunk, 65534, 65534) == 0) }
        let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/two", "--store", store])
        #expect(dump.succeeded, "\(dump.stderr)")
        #expect(Harness.waitGone(workload.pid))
        let restore = try Harness.stasis(["restore", "-D", root + "/two", "--store", store])
        #expect(restore.succeeded, "\(restore.stderr)")
        #expect(workload.verify().hasPrefix("PASS"))
        var st = stat()
        #expect(stat(chunk, &st) == 0 && st.st_uid == geteuid(), "the dump put its own copy in place")
    }

    /// Small ones: a -D whose parent is missing is refused, not created; PID 1 and kernel threads are named.
    @Test func mistakesAreNamed() throws {
        let workload = try Workload("counter")
        defer { workload.stop() }
        let missing = Harness.scratch("missing-parent") + "/no/such/dir/image"
        let dump = try Harness.stasis("dump", "\(workload.pid)", "-D", missing)
        #expect(dump.status == 1 && dump.stderr.contains("is not a directory"), "\(dump.stderr)")
        #expect(!FileSystem.exists((missing as NSString).deletingLastPathComponent))
        #expect(workload.verify().hasPrefix("PASS"))
        let initProcess = try Harness.stasis("dump", "1", "-D", Harness.scratch("init") + "/image")
        #expect(initProcess.status == 1 && initProcess.stderr.contains("is this system's init"), "\(initProcess.stderr)")
        let kthread = try Harness.stasis("dump", "2", "-D", Harness.scratch("kthread") + "/image")
        #expect(kthread.status == 1 && kthread.stderr.contains("is a kernel thread"), "\(kthread.stderr)")
    }
}
}

