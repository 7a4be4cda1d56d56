import Foundation
import Glibc
import StasisGPU
import StasisOS
import StasisTestSupport
import Testing

extension Integration {
    @Suite struct AgentRunTests {
        /// `stasis run` execs the program with the agent preloaded; a job without CUDA runs, checkpoints and
        /// restores as it would without it, and is still preloaded after the restore.
        @Test func aJobStartedByRunCarriesTheAgentThroughDumpAndRestore() throws {
            let workload = try Workload("threads", ["--count", "2"], underAgent: true)
            defer { workload.stop() }
            let maps = { (try? String(contentsOfFile: "/proc/\(workload.pid)/maps", encoding: .utf8)) ?? "" }
            #expect(maps().contains("libstasis-agent.so"))
            #expect(workload.verify().hasPrefix("PASS"))
            let checkpoint = Harness.scratch("agent-run") + "/ckpt"
            let dump = try Harness.stasis("dump", String(workload.pid), "-D", checkpoint)
            #expect(dump.succeeded, "\(dump.stderr)")
            #expect(Harness.waitGone(workload.pid))
            let restore = try Harness.stasis("restore", "-D", checkpoint)
            #expect(restore.succeeded, "\(restore.stderr)")
            #expect(workload.verify().hasPrefix("PASS"))
            #expect(maps().contains("libstasis-agent.so"))
        }

        /// The agent knows which stasis to run should the one checkpointing its process die (orphan.c).
        @Test func runTellsTheAgentWhereStasisIs() throws {
            let workload = try Workload("threads", ["--count", "1"], underAgent: true)
            defer { workload.stop() }
            let environment = ProcFS.environment(workload.pid)
            let stasis = URL(fileURLWithPath: Harness.stasis).resolvingSymlinksInPath().path
            #expect(environment.contains("STASIS_AGENT_STASIS=\(stasis)"), "\(environment.filter { $0.hasPrefix("STASIS") })")
        }

        @Test func runRefusesAMissingAgentAndAMissingProgram() throws {
            let noAgent = try Harness.run(Harness.stasis, ["run", "--agent", "/nonexistent/libstasis-agent.so", "--", "true"])
            #expect(!noAgent.succeeded)
            #expect(noAgent.stderr.contains("does not exist"))
            let noProgram = try Harness.run(Harness.stasis, ["run", "--agent", Harness.agent, "--", "/nonexistent/program"])
            #expect(noProgram.status == 127)
            #expect(noProgram.stderr.contains("cannot run /nonexistent/program"))
            let plainFile = Harness.scratch("not-runnable") + "/data"
            FileManager.default.createFile(atPath: plainFile, contents: Data("data".utf8), attributes: [.posixPermissions: 0o644])
            let notRunnable = try Harness.run(Harness.stasis, ["run", "--agent", Harness.agent, "--", plainFile])
            #expect(notRunnable.status == 126)
            let nothing = try Harness.run(Harness.stasis, ["run"])
            #expect(!nothing.succeeded)
        }
    }
}
