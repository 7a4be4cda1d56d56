import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisTestSupport
import Testing

/// Real workloads, real CRIU: each builds state, is checkpointed, killed, restored, and checks itself.
/// Serialized: restores reuse PIDs and share the machine's two cores.
extension Integration {
@Suite struct CheckpointRestore {
    /// Dumps the workload (which ends it), restores it, and returns the checkpoint directory. `restoreByArgument`:
    /// `stasis restore DIR` instead of `-D DIR`.
    func roundTrip(_ workload: Workload, dumpArguments: [String] = [], restoreByArgument: Bool = false) throws -> String {
        let checkpoint = Harness.scratch("ckpt") + "/image"
        let pidsBefore = workload.treePIDs
        let descriptorsBefore = workload.descriptorSignature
        #expect(workload.verify().hasPrefix("PASS"), "the workload must be healthy before the dump")

        let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", checkpoint] + dumpArguments)
        #expect(dump.succeeded, "dump failed: \(dump.stderr)")
        #expect(Harness.waitGone(workload.pid), "without --leave-running the tree is gone after the dump")

        let restore = try Harness.stasis(["restore"] + (restoreByArgument ? [checkpoint] : ["-D", checkpoint]))
        #expect(restore.succeeded, "restore failed: \(restore.stderr)")
        #expect(restore.stdout.contains("root PID \(workload.pid)"))
        #expect(workload.isLive)
        #expect(workload.treePIDs == pidsBefore, "restored processes keep their PIDs")
        #expect(workload.descriptorSignature == descriptorsBefore, "the same descriptors, of the same kinds")
        let verdict = workload.verify()
        #expect(verdict.hasPrefix("PASS"), "after restore: \(verdict)")
        return checkpoint
    }

    @Test func counterWithAnOpenFile() throws {
        let workload = try Workload("counter", ["--file", Harness.scratch("counter") + "/counter.txt", "--mem", "32"])
        defer { workload.stop() }
        let checkpoint = try roundTrip(workload)

        // The checkpoint is private and complete.
        var st = stat()
        #expect(stat(checkpoint, &st) == 0 && st.st_mode & 0o777 == 0o700)
        for file in try FileManager.default.contentsOfDirectory(atPath: checkpoint) {
            #expect(stat(checkpoint + "/" + file, &st) == 0 && st.st_mode & 0o777 == 0o600, "\(file) must be 0600")
        }
        let inspect = try Harness.stasis("inspect", checkpoint, "--json")
        let manifest = try Manifest.decode(Data(inspect.stdout.utf8), path: "inspect output")
        #expect(manifest.processTree.rootPID == workload.pid)
        #expect(manifest.memory.dumpedBytes >= 32 << 20)
        #expect(manifest.files.contains { $0.path.hasPrefix("pages-") })
        // CRIU's log arrives after the publish: kept beside the checkpoint's files, listed nowhere; its statistics
        // only reach the manifest's timings.
        #expect(FileSystem.exists(checkpoint + "/criu-dump.log"))
        #expect(!manifest.files.contains { $0.path == "criu-dump.log" || $0.path == "stats-dump" })
        #expect(!FileSystem.exists(checkpoint + "/stats-dump"))
        #expect(manifest.timings.freeze > 0)
        let verify = try Harness.stasis("verify", checkpoint)
        #expect(verify.succeeded, "\(verify.stderr)")
    }

    @Test func multiThreadedProcess() throws {
        let workload = try Workload("threads", ["--count", "6", "--mem", "24"])
        defer { workload.stop() }
        _ = try roundTrip(workload)
        #expect(ProcFS.status(workload.pid)["Threads"] == "7")
    }

    @Test func treeOfProcessesWithPipes() throws {
        let workload = try Workload("tree", ["--count", "3"])
        defer { workload.stop() }
        #expect(workload.treePIDs.count == 4)
        let checkpoint = try roundTrip(workload, restoreByArgument: true)
        let manifest = try Manifest.decode(try Data(contentsOf: URL(fileURLWithPath: checkpoint + "/manifest.json")), path: "m")
        #expect(manifest.processTree.processes.map(\.pid) == workload.treePIDs)
    }

    @Test func unixSocketPair() throws {
        let workload = try Workload("unix")
        defer { workload.stop() }
        _ = try roundTrip(workload)
    }

    @Test func establishedTCPConnection() throws {
        let workload = try Workload("tcp")
        defer { workload.stop() }
        // The workload's first connection, closed by the listener's side, left a TIME_WAIT socket on the
        // listening port: the restore, a moment after the dump, must clear it for CRIU to bind the port.
        let checkpoint = try roundTrip(workload, dumpArguments: ["--tcp-established"])
        let inspect = try Harness.stasis("inspect", checkpoint)
        #expect(inspect.stdout.contains("tcp-established true"))
        let manifest = try String(contentsOfFile: checkpoint + "/manifest.json", encoding: .utf8)
        #expect(manifest.contains("\"listeners\"") && manifest.contains("127.0.0.1:"), "the listener is recorded")
    }

    @Test func leaveRunningThenRestoreOnceTheOriginalIsGone() throws {
        let workload = try Workload("counter", ["--mem", "8"])
        defer { workload.stop() }
        let checkpoint = Harness.scratch("ckpt") + "/image"
        let dump = try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint, "--leave-running", "--json")
        #expect(dump.succeeded, "\(dump.stderr)")
        #expect(dump.stdout.contains("\"leaveRunning\" : true"))
        // The stall is reported apart: the checkpoint is made durable and published after the job runs again.
        let report = try #require(try JSONSerialization.jsonObject(with: Data(dump.stdout.utf8)) as? [String: Any])
        let timings = try #require(report["timings"] as? [String: Any])
        let stalled = try #require(timings["stalled"] as? Double), total = try #require(timings["total"] as? Double)
        #expect(stalled > 0 && stalled <= total)
        #expect(workload.isLive)
        #expect(workload.verify().hasPrefix("PASS"), "the original keeps running")

        // While the original runs, its PID is taken: the restore is refused, and the original is untouched.
        let refused = try Harness.stasis("restore", "-D", checkpoint)
        #expect(!refused.succeeded)
        #expect(refused.stderr.contains("PID \(workload.pid)") && refused.stderr.contains("in use"))
        #expect(workload.verify().hasPrefix("PASS"))

        kill(workload.pid, SIGKILL)
        #expect(Harness.waitGone(workload.pid))
        let restore = try Harness.stasis("restore", "-D", checkpoint)
        #expect(restore.succeeded, "\(restore.stderr)")
        #expect(workload.verify().hasPrefix("PASS"))
    }

    @Test func restoredTreeOutlivesStasisAndIsNotItsChild() throws {
        let workload = try Workload("counter")
        defer { workload.stop() }
        let checkpoint = Harness.scratch("ckpt") + "/image"
        #expect(try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint).succeeded)
        #expect(Harness.waitGone(workload.pid))
        #expect(try Harness.stasis("restore", "-D", checkpoint).succeeded)
        // stasis has exited; the tree runs on, parented by init (or a subreaper), not by a stasis process.
        let parent = ProcFS.stat(workload.pid)?.ppid ?? 0
        let parentCommand = ProcFS.stat(parent)?.command ?? ""
        #expect(parentCommand != "stasis" && parentCommand != "criu")
        usleep(300_000)
        #expect(workload.verify().hasPrefix("PASS"))
    }

    /// A restore that worked leaves nothing under the work root unless asked to keep its log; --keep-log and
    /// --work-dir keep it.
    @Test func aRestoreThatWorkedRemovesItsWorkDirectory() throws {
        let root = "/var/lib/stasis/restore"
        func entries() -> Set<String> { Set((try? FileSystem.names(in: root)) ?? []) }
        for keep in [false, true] {
            let workload = try Workload("counter")
            defer { workload.stop() }
            let checkpoint = Harness.scratch("ckpt") + "/image"
            #expect(try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint).succeeded)
            #expect(Harness.waitGone(workload.pid))
            let before = entries()
            let restore = try Harness.stasis(["restore", checkpoint, "--json"] + (keep ? ["--keep-log"] : []))
            #expect(restore.succeeded, "\(restore.stderr)")
            let report = try JSONSerialization.jsonObject(with: Data(restore.stdout.utf8)) as? [String: Any]
            let logFile = report?["logFile"] as? String
            let added = entries().subtracting(before)
            if keep {
                #expect(added.count == 1 && logFile.map(FileSystem.exists) == true, "kept: \(added) \(logFile ?? "no log")")
                if let name = added.first { FileSystem.removeTree(root + "/" + name) }
            } else {
                #expect(added.isEmpty && logFile == nil, "left behind: \(added) \(logFile ?? "")")
            }
            #expect(workload.verify().hasPrefix("PASS"))
        }
    }
}
}

extension Integration {
    /// The CRIU plugin with plain criu: it loads, registers its device hooks, and stays out of the way of a
    /// process that uses no GPU (on a machine without a driver it switches itself off).
    @Suite struct CRIUPlugin {
        @Test func loadsIntoPlainCRIUAndStandsAsideForCPUProcesses() throws {
            let plugins = Harness.scratch("plugins")
            // Built by scripts/build-criu-plugin.sh (scripts/test.sh runs it) into .build/criu-plugins.
            let built = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
                .deletingLastPathComponent().path + "/.build/criu-plugins/libstasis_cuda_plugin.so"
            try FileManager.default.copyItem(atPath: built,
                                             toPath: plugins + "/libstasis_cuda_plugin.so")
            let workload = try Workload("counter")
            defer { workload.stop() }
            let images = Harness.scratch("plugin-images")
            let criu = try #require(Spawn.which("criu"))
            let dump = try Harness.run(criu, ["dump", "-t", "\(workload.pid)", "-D", images, "-L", plugins, "-v4", "-o", "dump.log"])
            #expect(dump.succeeded, "\(dump.stderr)")
            let log = try String(contentsOfFile: images + "/dump.log", encoding: .utf8)
            #expect(log.contains("Plugin \"stasis_cuda\""))
            #expect(Harness.waitGone(workload.pid))
            let restore = try Harness.run(criu, ["restore", "-D", images, "-L", plugins, "-d", "-v4", "-o", "restore.log"])
            #expect(restore.succeeded, "\(restore.stderr)")
            #expect(workload.verify().hasPrefix("PASS"))
        }
    }
}
