import Foundation
import Glibc
import StasisCore
import StasisEngine
import StasisOS
import StasisTestSupport
import Testing

/// `stasis restore --prepare` restores a tree ahead of demand and leaves it stopped; `stasis activate` lets it
/// run, and refuses (signalling nothing) a PID that is not a prepared tree, or no longer the one prepared.
extension Integration {
    @Suite(.serialized) struct PreparedRestores {
        /// A checkpoint of a 3-process tree, dumped (the tree gone), in a scratch store.
        static func checkpointedTree(_ label: String) throws -> (workload: Workload, checkpoint: String, env: [String: String]) {
            let workload = try Workload("tree", ["--count", "2"])
            let root = Harness.scratch(label)
            let env = ["STASIS_STORE": root + "/store"]
            let pids = workload.treePIDs
            let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/image"], environment: env)
            try #require(dump.succeeded, "\(dump.stderr)")
            for pid in pids { #expect(Harness.waitGone(pid)) }
            return (workload, root + "/image", env)
        }

        static func states(_ pids: [Int32]) -> [Character] { pids.map { ProcFS.stat($0)?.state ?? "-" } }

        @Test func aPreparedTreeRunsOnlyOnceActivated() throws {
            let (workload, checkpoint, env) = try Self.checkpointedTree("prepared")
            defer { workload.stop() }
            let prepared = try Harness.stasis(["restore", "--prepare", "-D", checkpoint], environment: env)
            try #require(prepared.succeeded, "\(prepared.stderr)")
            // CRIU's log stays while the tree waits (the record names it), and goes with the activation.
            let log = try #require(prepared.stdout.components(separatedBy: "log:  ").last?.split(separator: "\n").first.map(String.init))
            #expect(FileSystem.exists(log), "\(prepared.stdout)")
            #expect(prepared.stdout.contains("stasis activate \(workload.pid)"), "\(prepared.stdout)")
            let pids = workload.treePIDs
            #expect(pids.count == 3)
            usleep(300_000)
            #expect(Self.states(pids).allSatisfy { $0 == "T" }, "prepared, every process waits stopped: \(Self.states(pids))")

            let activated = try Harness.stasis(["activate", "\(workload.pid)", "--json"])
            try #require(activated.succeeded, "\(activated.stderr)")
            let report = try #require(try JSONSerialization.jsonObject(with: Data(activated.stdout.utf8)) as? [String: Any])
            #expect(report["processes"] as? Int == 3)
            #expect(Self.states(pids).allSatisfy { $0 != "T" }, "\(Self.states(pids))")
            #expect(workload.verify().hasPrefix("PASS"))
            #expect(!FileSystem.exists(log), "the prepared restore's log goes once it is activated")
            // Activated once: the record is gone.
            let again = try Harness.stasis("activate", "\(workload.pid)")
            #expect(again.status == 1 && again.stderr.contains("is not a prepared restore"), "\(again.stderr)")
        }

        /// A prepared GPU tree whose agent no longer answers at activation (here: a record naming a held
        /// process that has no agent) cannot be let go: its CUDA calls would wait forever, so the tree is
        /// killed, the error says so, and the checkpoint is untouched (a plain restore of it then verifies).
        @Test func anActivationWhoseAgentsCannotBeLetGoKillsTheTree() throws {
            let (workload, checkpoint, env) = try Self.checkpointedTree("prepared-agentless")
            defer { workload.stop() }
            let prepared = try Harness.stasis(["restore", "--prepare", "-D", checkpoint], environment: env)
            try #require(prepared.succeeded, "\(prepared.stderr)")
            let pids = workload.treePIDs
            let record = PreparedRestore.directory + "/\(workload.pid).json"
            var fields = try #require(try JSONSerialization.jsonObject(with: try FileSystem.readFile(record)) as? [String: Any])
            fields["heldDevices"] = [Int(workload.pid)]
            try FileSystem.writeAtomically(try JSONSerialization.data(withJSONObject: fields), to: record)
            let activated = try Harness.stasis("activate", "\(workload.pid)")
            #expect(activated.status == 1 && activated.stderr.contains("does not answer") && activated.stderr.contains("the tree was killed"),
                    "\(activated.stderr)")
            for pid in pids { #expect(Harness.waitGone(pid), "PID \(pid) of the tree was killed") }
            #expect(!FileSystem.exists(record))
            let restored = try Harness.stasis(["restore", "-D", checkpoint], environment: env)
            #expect(restored.succeeded, "\(restored.stderr)")
            #expect(workload.verify().hasPrefix("PASS"))
        }

        /// Nothing prepared, a prepared tree that something else let run, one that was killed: refused, and no
        /// process is signalled (the running workload runs on).
        @Test func activationRefusesWhatIsNotAPreparedTree() throws {
            let running = try Workload("counter", ["--mem", "4"])
            defer { running.stop() }
            let notPrepared = try Harness.stasis("activate", "\(running.pid)")
            #expect(notPrepared.status == 1 && notPrepared.stderr.contains("is not a prepared restore"), "\(notPrepared.stderr)")
            #expect(running.verify().hasPrefix("PASS"))

            let (workload, checkpoint, env) = try Self.checkpointedTree("prepared-refused")
            defer { workload.stop() }
            let prepared = try Harness.stasis(["restore", "--prepare", "-D", checkpoint], environment: env)
            try #require(prepared.succeeded, "\(prepared.stderr)")
            for pid in workload.treePIDs { kill(pid, SIGCONT) }
            let letGo = try Harness.stasis("activate", "\(workload.pid)")
            #expect(letGo.status == 1 && letGo.stderr.contains("something let it run"), "\(letGo.stderr)")
            #expect(workload.verify().hasPrefix("PASS"))

            // Killed, its files kept (`stop` would remove the log the tree writes, which the restore reopens).
            let before = workload.treePIDs
            for pid in before.reversed() { kill(pid, SIGKILL) }
            for pid in before { #expect(Harness.waitGone(pid)) }
            let preparedAgain = try Harness.stasis(["restore", "--prepare", "-D", checkpoint], environment: env)
            try #require(preparedAgain.succeeded, "\(preparedAgain.stderr)")
            let pids = workload.treePIDs
            // Killed while its parent waits stopped: a zombie until the parent reaps it.
            kill(pids.last!, SIGKILL)
            let deadline = Date().addingTimeInterval(5)
            while ProcFS.stat(pids.last!)?.state == "T", Date() < deadline { usleep(10_000) }
            let gone = try Harness.stasis("activate", "\(workload.pid)")
            #expect(gone.status == 1 && gone.stderr.contains("is gone; nothing was activated"), "\(gone.stderr)")
            #expect(Self.states(Array(pids.dropLast())).allSatisfy { $0 == "T" }, "nothing was signalled")
            #expect(!FileSystem.exists(PreparedRestore.directory + "/\(workload.pid).json"), "the stale record went")
        }
    }
}
