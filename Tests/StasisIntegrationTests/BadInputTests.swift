import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisStore
import StasisTestSupport
import Testing

/// Every bad input gives a clear error and a non-zero exit; none crashes, hangs, loses the running job or
/// leaves a half-restored process.
extension Integration {
@Suite struct BadInput {
    /// A finished checkpoint of a counter whose original is gone, ready to be damaged.
    func checkpointOfStoppedWorkload() throws -> (Workload, String) {
        let workload = try Workload("counter", ["--mem", "8"])
        let checkpoint = Harness.scratch("bad") + "/image"
        let dump = try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint)
        #expect(dump.succeeded, "\(dump.stderr)")
        #expect(Harness.waitGone(workload.pid))
        return (workload, checkpoint)
    }

    @Test func pidThatDoesNotExist() throws {
        let checkpoint = Harness.scratch("bad") + "/image"
        let result = try Harness.stasis("dump", "4000000", "-D", checkpoint)
        #expect(result.status == 1)
        #expect(result.stderr.contains("no running process with PID 4000000"))
        #expect(!FileSystem.exists(checkpoint))
    }

    @Test func existingNonEmptyDirectoryIsRefused() throws {
        let workload = try Workload("counter")
        defer { workload.stop() }
        let checkpoint = Harness.scratch("bad")
        try "keep me".write(toFile: checkpoint + "/precious", atomically: true, encoding: .utf8)
        let result = try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint)
        #expect(result.status == 1)
        #expect(result.stderr.contains("already exists and is not empty"))
        #expect(try String(contentsOfFile: checkpoint + "/precious", encoding: .utf8) == "keep me")
        #expect(workload.verify().hasPrefix("PASS"))
    }

    /// The first chunk of the checkpoint's memory image, stored: (image name, chunk digest, chunk file, its
    /// bytes in the image as errors name them).
    func firstChunk(of checkpoint: String) throws -> (String, String, String, String) {
        let manifest = try Manifest.decode(try FileSystem.readFile(checkpoint + "/manifest.json"), path: checkpoint)
        let pages = try #require(manifest.files.first { $0.path.hasPrefix("pages-") && $0.chunks != nil })
        let digest = try #require(pages.chunks?.first)
        try #require(!digest.isEmpty, "the image starts with zeros")
        let length = pages.chunkLengths?.first ?? Int(min(pages.size, UInt64(manifest.store!.chunkSize)))
        return (pages.path, digest, try DirectoryChunkStore(path: Harness.store, create: false).chunkPath(digest), "bytes 0..<\(length)")
    }

    /// verify and restore both refuse, naming `expected` pieces; nothing is started.
    func expectRefused(_ checkpoint: String, _ workload: Workload, naming expected: [String]) throws {
        let verify = try Harness.stasis("verify", checkpoint)
        #expect(verify.status == 1)
        for text in expected { #expect(verify.stderr.contains(text), "verify: \(verify.stderr)") }
        let restore = try Harness.stasis("restore", "-D", checkpoint)
        #expect(restore.status == 1)
        #expect(restore.stderr.contains("restore refused"), "\(restore.stderr)")
        for text in expected { #expect(restore.stderr.contains(text), "restore: \(restore.stderr)") }
        #expect(!ProcFS.exists(workload.pid), "nothing was started")
    }

    @Test func flippedByteInChunk() throws {
        let (workload, checkpoint) = try checkpointOfStoppedWorkload()
        defer { workload.stop() }
        let (pages, digest, chunk, bytes) = try firstChunk(of: checkpoint)
        let handle = try #require(FileHandle(forUpdatingAtPath: chunk))
        try handle.seek(toOffset: 4096 + 17)
        let byte = try handle.read(upToCount: 1)!.first!
        try handle.seek(toOffset: 4096 + 17)
        try handle.write(contentsOf: Data([byte ^ 0x01]))
        try handle.close()
        try expectRefused(checkpoint, workload, naming: ["chunk \(digest) of \(checkpoint)/\(pages) \(bytes) is damaged"])
    }

    @Test func truncatedChunk() throws {
        let (workload, checkpoint) = try checkpointOfStoppedWorkload()
        defer { workload.stop() }
        let (pages, digest, chunk, _) = try firstChunk(of: checkpoint)
        #expect(truncate(chunk, 1000) == 0)
        try expectRefused(checkpoint, workload, naming: ["chunk \(digest) of \(checkpoint)/\(pages)", "is damaged"])
    }

    @Test func missingChunk() throws {
        let (workload, checkpoint) = try checkpointOfStoppedWorkload()
        defer { workload.stop() }
        let (pages, digest, chunk, bytes) = try firstChunk(of: checkpoint)
        #expect(unlink(chunk) == 0)
        try expectRefused(checkpoint, workload, naming: ["chunk \(digest) of \(checkpoint)/\(pages) \(bytes) is missing from the store"])
    }

    @Test func flippedByteInSmallImage() throws {
        let (workload, checkpoint) = try checkpointOfStoppedWorkload()
        defer { workload.stop() }
        let core = try #require(try FileManager.default.contentsOfDirectory(atPath: checkpoint).first { $0.hasPrefix("core-") })
        let handle = try #require(FileHandle(forUpdatingAtPath: checkpoint + "/" + core))
        let byte = try handle.read(upToCount: 1)!.first!
        try handle.seek(toOffset: 0)
        try handle.write(contentsOf: Data([byte ^ 0x01]))
        try handle.close()
        try expectRefused(checkpoint, workload, naming: [core, "SHA-256"])
    }

    @Test func truncatedSmallImageIsNamed() throws {
        let (workload, checkpoint) = try checkpointOfStoppedWorkload()
        defer { workload.stop() }
        let core = try #require(try FileManager.default.contentsOfDirectory(atPath: checkpoint).first { $0.hasPrefix("core-") })
        #expect(truncate(checkpoint + "/" + core, 10) == 0)
        let verify = try Harness.stasis("verify", checkpoint)
        #expect(verify.status == 1)
        #expect(verify.stderr.contains(core) && verify.stderr.contains("truncated"))
    }

    @Test func truncatedManifest() throws {
        let (workload, checkpoint) = try checkpointOfStoppedWorkload()
        defer { workload.stop() }
        let manifest = checkpoint + "/manifest.json"
        #expect(truncate(manifest, Int(FileSystem.size(manifest)! / 2)) == 0)
        for command in [["verify", checkpoint], ["inspect", checkpoint], ["restore", "-D", checkpoint]] {
            let result = try Harness.stasis(command)
            #expect(result.status == 1, "\(command)")
            #expect(result.stderr.contains("manifest.json is not valid JSON"), "\(command): \(result.stderr)")
        }
        #expect(!ProcFS.exists(workload.pid))
    }

    @Test func manifestOfUnknownFormatVersion() throws {
        let (workload, checkpoint) = try checkpointOfStoppedWorkload()
        defer { workload.stop() }
        let path = checkpoint + "/manifest.json"
        let text = try String(contentsOfFile: path, encoding: .utf8)
            .replacingOccurrences(of: #""formatVersion" : [0-9]+"#, with: "\"formatVersion\" : 99", options: .regularExpression)
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        let result = try Harness.stasis("restore", "-D", checkpoint)
        #expect(result.status == 1)
        #expect(result.stderr.contains("format version 99") && result.stderr.contains("newer stasis"))
    }

    @Test func directoryThatIsNotACheckpoint() throws {
        let empty = Harness.scratch("bad")
        let result = try Harness.stasis("restore", "-D", empty)
        #expect(result.status == 1)
        #expect(result.stderr.contains("no manifest.json"))
    }

    @Test func noCRIUOnPath() throws {
        let workload = try Workload("counter")
        defer { workload.stop() }
        let checkpoint = Harness.scratch("bad") + "/image"
        let environment: [String: String?] = ["PATH": "/usr/bin:/bin", "STASIS_CRIU": nil]
        let dump = try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint, environment: environment)
        #expect(dump.status == 1)
        #expect(dump.stderr.contains("CRIU was not found") && dump.stderr.contains("install-criu.sh"))
        #expect(!FileSystem.exists(checkpoint))
        let check = try Harness.stasis("check", environment: environment)
        #expect(check.status == 1)
        #expect(check.stdout.contains("criu:    missing") && check.stdout.contains("install-criu.sh"))
        #expect(workload.verify().hasPrefix("PASS"))
    }

    /// Also with --leave-running, whose checkpoint is published after the job runs again: a failure there
    /// costs the checkpoint, never the job.
    /// `pages`: the page server fails while CRIU sends it the tree's memory (a dump without --leave-running:
    /// with it, CRIU writes its pages to files).
    @Test(arguments: [("pages", false), ("post-dump", false), ("publish", false), ("publish", true)])
    func failureInsideTheDumpLeavesTheJobRunning(point: String, leaveRunning: Bool) throws {
        let workload = try Workload("tree", ["--count", "2"])
        defer { workload.stop() }
        let checkpoint = Harness.scratch("bad") + "/image"
        let result = try Harness.stasis(["dump", "\(workload.pid)", "-D", checkpoint] + (leaveRunning ? ["--leave-running"] : []),
                                        environment: ["STASIS_FAULT": point])
        #expect(result.status == 1)
        #expect(result.stderr.contains("fault injected at \(point)"))
        #expect(result.stderr.contains("still running"))
        #expect(!FileSystem.exists(checkpoint))
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: (checkpoint as NSString).deletingLastPathComponent)
        #expect(leftovers.allSatisfy { !$0.contains(".partial-") }, "\(leftovers)")
        #expect(workload.treePIDs.count == 3)
        #expect(workload.verify().hasPrefix("PASS"), "the job runs on as it was")
    }

    @Test func failureAfterCRIURestoreLeavesNoHalfRestoredTree() throws {
        let workload = try Workload("tree", ["--count", "2"])
        defer { workload.stop() }
        let pids = workload.treePIDs
        let checkpoint = Harness.scratch("bad") + "/image"
        #expect(try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint).succeeded)
        for pid in pids { #expect(Harness.waitGone(pid)) }
        let result = try Harness.stasis("restore", "-D", checkpoint, environment: ["STASIS_FAULT": "after-restore"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("the restored tree was stopped"))
        for pid in pids { #expect(Harness.waitGone(pid), "PID \(pid) must not be left running") }
        // The checkpoint itself is intact and restores.
        let again = try Harness.stasis("restore", "-D", checkpoint)
        #expect(again.succeeded, "\(again.stderr)")
        #expect(workload.verify().hasPrefix("PASS"))
    }

    @Test func killedDumpLeavesNothingThatLooksFinished() throws {
        let workload = try Workload("memory", ["--mem", "768"])
        defer { workload.stop() }
        let checkpoint = Harness.scratch("bad") + "/image"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Harness.stasis)
        process.arguments = ["dump", "\(workload.pid)", "-D", checkpoint]
        let store = Harness.scratch("killed-store")
        process.environment = ProcessInfo.processInfo.environment.merging(["STASIS_STORE": store]) { $1 }
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Kill stasis while CRIU sends it memory: once the first of the 768 MiB's chunks is being written.
        let parent = (checkpoint as NSString).deletingLastPathComponent
        let deadline = Date().addingTimeInterval(20)
        var sawPages = false
        while !sawPages, Date() < deadline {
            sawPages = ((try? FileManager.default.contentsOfDirectory(atPath: store + "/tmp")) ?? []).isEmpty == false
            if !sawPages { usleep(2_000) }
        }
        kill(process.processIdentifier, SIGKILL)
        #expect(sawPages, "stasis was to be killed while CRIU sent memory, but no chunk was being written")
        process.waitUntilExit()
        usleep(500_000)

        let verify = try Harness.stasis(["verify", checkpoint], environment: ["STASIS_STORE": store])
        let restore = try Harness.stasis(["restore", "-D", checkpoint], environment: ["STASIS_STORE": store])
        // Whatever chunks the killed dump left under their names are whole (half-written ones stay in tmp/).
        let chunks = try DirectoryChunkStore(path: store, create: false)
        for digest in chunks.allChunks() { #expect(throws: Never.self) { try chunks.check(digest) } }
        if FileSystem.exists(checkpoint + "/manifest.json") {
            // stasis was killed after publishing: then the checkpoint is whole.
            #expect(verify.succeeded)
        } else {
            #expect(!verify.succeeded && !restore.succeeded)
        }
        // CRIU loses its peer and thaws the tree: the job runs on.
        let alive = Date().addingTimeInterval(10)
        while !workload.isLive, Date() < alive { usleep(50_000) }
        #expect(workload.isLive)
        #expect(workload.verify(timeout: 60).hasPrefix("PASS"))
        // A new dump to the same place works and clears the dead dump's staging directory.
        try? FileManager.default.removeItem(atPath: checkpoint)
        let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", checkpoint, "--leave-running"], environment: ["STASIS_STORE": store])
        #expect(dump.succeeded, "\(dump.stderr)")
        // gc clears the dead dump's unfinished chunk files.
        #expect(try Harness.stasis(["gc"], environment: ["STASIS_STORE": store]).succeeded)
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: store + "/tmp")) ?? []).isEmpty)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: parent)
        #expect(leftovers.allSatisfy { !$0.contains(".partial-") }, "\(leftovers)")
    }
}
}

extension Integration {
    /// GPU paths that CI can reach without a GPU.
    @Suite struct GPUWithoutDriver {
        @Test func checkpointWithGPUStateIsRefusedBeforeAnythingIsRestored() throws {
            let workload = try Workload("counter")
            defer { workload.stop() }
            let checkpoint = Harness.scratch("gpu") + "/image"
            #expect(try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint).succeeded)
            #expect(Harness.waitGone(workload.pid))
            // Give the checkpoint a GPU section, as a dump on a GPU machine writes it.
            let path = checkpoint + "/manifest.json"
            var manifest = try Manifest.decode(try Data(contentsOf: URL(fileURLWithPath: path)), path: path)
            manifest.gpu = .init(driverVersion: "13.0",
                                 devices: [.init(index: 0, uuid: "GPU-f11ae0fe-3cf1-c82a-81c8-c19640ddf9e0", name: "NVIDIA H200", memoryBytes: 150_000_000_000)],
                                 processes: [.init(pid: workload.pid, devices: ["GPU-f11ae0fe-3cf1-c82a-81c8-c19640ddf9e0"], deviceMemoryBytes: 1 << 30)])
            try Manifest.encoder().encode(manifest).write(to: URL(fileURLWithPath: path))
            let inspect = try Harness.stasis("inspect", checkpoint)
            #expect(inspect.stdout.contains("GPU 0 GPU-f11ae0fe-3cf1-c82a-81c8-c19640ddf9e0 NVIDIA H200"))
            let restore = try Harness.stasis("restore", "-D", checkpoint)
            #expect(restore.status == 1)
            #expect(restore.stderr.contains("no GPU driver"), "\(restore.stderr)")
            #expect(!ProcFS.exists(workload.pid), "nothing was restored")
        }

        @Test func badGPUMapIsAUsageError() throws {
            let result = try Harness.stasis("restore", "-D", "/nonexistent", "--gpu-map", "GPU-1")
            #expect(result.status == 64)
            #expect(result.stderr.contains("OLD=NEW"))
        }

        @Test func checkReportsNoDriverAsANormalAnswer() throws {
            let result = try Harness.stasis("check", "--json")
            #expect(result.succeeded, "\(result.stderr)")
            #expect(!result.stderr.contains("Looks good"), "CRIU's own words stay out of --json's streams: \(result.stderr)")
            // The answer matches whether this machine can load the driver at all.
            let loadable = dlopen("libcuda.so.1", RTLD_NOW).map { dlclose($0); return true } ?? false
            #expect(result.stdout.contains("\"driverLoaded\" : \(loadable)"), "\(result.stdout)")
        }
    }
}

extension Integration {
    @Suite struct NoSpace {
        /// A checkpoint directory on a filesystem too small for CRIU's images (4 MiB, 32 MiB of memory, the
        /// store elsewhere): with the pages through files (STASIS_DUMP_PAGES=files) a clear error and the job
        /// runs on; with the page server the pages never touch that filesystem, and the dump succeeds.
        @Test func fullFilesystemIsReportedAndTheJobRunsOn() throws {
            let (mountPoint, unmount) = try tinyFilesystem("tiny")
            defer { unmount() }
            let workload = try Workload("counter", ["--mem", "32"])
            defer { workload.stop() }
            let result = try Harness.stasis(["dump", "\(workload.pid)", "-D", mountPoint + "/image"], environment: ["STASIS_DUMP_PAGES": "files"])
            #expect(result.status == 1)
            #expect(result.stderr.contains("ran out of space") && result.stderr.contains("No space left on device"), "\(result.stderr)")
            #expect(result.stderr.contains("full log: "))
            #expect(!FileSystem.exists(mountPoint + "/image"))
            #expect(workload.verify().hasPrefix("PASS"))

            let dump = try Harness.stasis("dump", "\(workload.pid)", "-D", mountPoint + "/image")
            #expect(dump.succeeded, "\(dump.stderr)")
            #expect(Harness.waitGone(workload.pid))
            let restore = try Harness.stasis("restore", "-D", mountPoint + "/image")
            #expect(restore.succeeded, "\(restore.stderr)")
            #expect(workload.verify().hasPrefix("PASS"))
        }

        /// A tiny tmpfs, unmounted when the test ends.
        func tinyFilesystem(_ name: String) throws -> (String, () -> Void) {
            let mountPoint = Harness.scratch(name)
            let mount = try Harness.run("/bin/mount", ["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", mountPoint])
            try #require(mount.succeeded, "cannot mount a tmpfs: \(mount.stderr)")
            return (mountPoint, { _ = try? Harness.run("/bin/umount", [mountPoint]) })
        }

        /// A chunk store that fills up during the dump: a clear error, no checkpoint, the job runs on.
        @Test func fullStoreIsReportedAndTheJobRunsOn() throws {
            let (store, unmount) = try tinyFilesystem("tiny-store")
            defer { unmount() }
            let workload = try Workload("counter", ["--mem", "32"])
            defer { workload.stop() }
            let checkpoint = Harness.scratch("full-store") + "/image"
            let result = try Harness.stasis(["dump", "\(workload.pid)", "-D", checkpoint], environment: ["STASIS_STORE": store])
            #expect(result.status == 1)
            #expect(result.stderr.contains("the chunk store ran out of space"), "\(result.stderr)")
            #expect(!FileSystem.exists(checkpoint))
            #expect(workload.verify().hasPrefix("PASS"))
        }

        /// No room to rebuild the memory images for CRIU: refused before anything starts, with the way out.
        @Test func restoreWithoutRoomToRebuildIsRefused() throws {
            let (rebuild, unmount) = try tinyFilesystem("tiny-rebuild")
            defer { unmount() }
            let workload = try Workload("counter", ["--mem", "32"])
            defer { workload.stop() }
            let checkpoint = Harness.scratch("rebuild") + "/image"
            #expect(try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint).succeeded)
            #expect(Harness.waitGone(workload.pid))
            let result = try Harness.stasis("restore", "-D", checkpoint, "--rebuild-dir", rebuild)
            #expect(result.status == 1)
            #expect(result.stderr.contains("rebuilding the memory images for CRIU needs") && result.stderr.contains("--rebuild-dir"), "\(result.stderr)")
            #expect(!ProcFS.exists(workload.pid))
            #expect(((try? FileManager.default.contentsOfDirectory(atPath: rebuild)) ?? []).isEmpty)
        }
    }
}
