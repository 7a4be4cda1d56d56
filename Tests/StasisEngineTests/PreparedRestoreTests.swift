import Foundation
import StasisCore
import StasisOS
@testable import StasisEngine
import StasisTestSupport
import Testing

/// What a prepared restore refuses before anything starts: a container's checkpoint (runc cannot leave one
/// stopped) and one with GPU state (its devices would have to come back at activation).
@Suite struct PreparedRestoreRefusals {
    @Test func onlyPlainProcessTreesArePrepared() throws {
        let sample = try SampleCheckpoint.make()
        defer { FileSystem.removeTree(sample.root) }
        #expect(PreparedRestore.refusal(sample.manifest) == nil)
        var withGPU = sample.manifest
        withGPU.gpu = Manifest.GPUSection(processes: [.init(pid: 1234, devices: [], deviceMemoryBytes: 0)])
        #expect(PreparedRestore.refusal(withGPU)?.contains("GPU state") == true)
    }
}
