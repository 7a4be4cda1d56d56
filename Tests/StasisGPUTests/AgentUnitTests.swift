import Foundation
import Glibc
import StasisGPU
import StasisTestSupport
import Testing

/// The agent without a GPU: its gate, `stasis run`, and a CPU job that carries it through a checkpoint. The
/// GPU half (evacuation, refill) runs on the GPU machine: scripts/device-test.sh agent.
@Suite struct AgentUnitTests {
    @Test func gateTrampolinesPassEveryArgumentAndHoldCallsWhileClosed() throws {
        let handle = try #require(dlopen(Harness.agent, RTLD_NOW | RTLD_LOCAL), "dlopen \(Harness.agent): \(String(cString: dlerror()))")
        defer { dlclose(handle) }
        typealias SelfTest = @convention(c) (UnsafeMutablePointer<CChar>, UInt) -> Int32
        let symbol = try #require(dlsym(handle, "stasis_agent_selftest"))
        var report = [CChar](repeating: 0, count: 256)
        let failed = unsafeBitCast(symbol, to: SelfTest.self)(&report, UInt(report.count))
        #expect(failed == 0, "\(String(cString: report))")
    }

    @Test func aProcessWithoutAnAgentHasNoSession() throws {
        // Not this process: AgentProtocolTests listens under its PID.
        #expect(try AgentSession.open(pid: 1) == nil)
    }
}
