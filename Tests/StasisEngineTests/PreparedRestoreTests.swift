import Foundation
import StasisCore
import StasisGPU
import StasisOS
@testable import StasisEngine
import StasisTestSupport
import Testing

/// What a prepared restore refuses before anything starts: a container's checkpoint (runc cannot leave one
/// stopped) and a GPU process checkpointed through the driver alone (nothing would hold its CUDA calls until
/// the activation). GPU processes under an agent are prepared.
@Suite struct PreparedRestoreRefusals {
    @Test func plainTreesAndAgentsArePreparedDriverOnlyGPUProcessesAreNot() throws {
        let sample = try SampleCheckpoint.make()
        defer { FileSystem.removeTree(sample.root) }
        let cuda = Backends().deviceStep()
        #expect(PreparedRestore.refusal(sample.manifest, device: cuda) == nil)
        var driverOnly = sample.manifest
        driverOnly.gpu = Manifest.GPUSection(processes: [.init(pid: 1234, devices: [], deviceMemoryBytes: 0)])
        let refusal = try #require(PreparedRestore.refusal(driverOnly, device: cuda))
        #expect(refusal.contains("GPU process 1234") && refusal.contains("stasis run"), "\(refusal)")
        var underAgent = sample.manifest
        let memory = Manifest.AgentMemory(allocations: [], evacuatedBytes: 0, driverPathBytes: 0, ringBytes: 0,
                                          quiesceSeconds: 0, evacuateSeconds: 0, releaseSeconds: 0)
        underAgent.gpu = Manifest.GPUSection(processes: [.init(pid: 1234, devices: [], deviceMemoryBytes: 0, agent: memory)])
        #expect(PreparedRestore.refusal(underAgent, device: cuda) == nil)
        #expect(PreparedRestore.refusal(underAgent, device: NoDeviceStep()) != nil, "a build without a device backend prepares no GPU state")
        var container = sample.manifest
        container.container = Manifest.Container(runtime: "runc", id: "c1", bundle: "/b", spec: "{}")
        #expect(PreparedRestore.refusal(container, device: cuda)?.contains("container") == true)
    }
}
