import Foundation
import StasisCore
import StasisEngine
import StasisGPU
import StasisOS
import StasisStore
import StasisTestSupport
import Testing

/// The backends as the command line gets them from `Backends`, each through its protocol; the device seam's
/// refusals need no GPU.
@Suite struct BackendsSeam {
    /// A checkpoint's GPU section naming one process on a GPU this machine does not have.
    func gpuSection() -> Manifest.GPUSection {
        var section = Manifest.GPUSection()
        section.processes = [.init(pid: 4242, devices: ["GPU-00000000-0000-0000-0000-000000000000"], deviceMemoryBytes: 1 << 20)]
        return section
    }

    @Test func aCheckpointWithGPUStateIsRefusedByEveryDeviceStepThatCannotTakeIt() throws {
        let steps: [any DeviceStep] = [NoDeviceStep(), Backends().deviceStep()]
        for step in steps {
            // No GPU section: nothing to refuse.
            try step.checkRestorable(section: Manifest.GPUSection())
            if step.name == "cuda", (try? GPUInventory.read().gpus.isEmpty) == false { continue }  // a GPU here: not a refusal path
            let error = try #require(throws: StasisError.self, "\(step.name)") { try step.checkRestorable(section: gpuSection()) }
            #expect(error.code == .gpu, "\(step.name)")
        }
    }

    @Test func aTreeWithoutDevicesPassesTheDeviceStepUntouched() throws {
        let root = Harness.scratch("backends-device")
        defer { FileSystem.removeTree(root) }
        let store = try Backends().openStore(root + "/store", create: true)
        let frozen = try Backends().deviceStep().beforeFreeze(pids: [ThisProcess.pid], store: DeviceStore(store: store, checkpoint: root))
        #expect(frozen.section.processes.isEmpty && frozen.files.isEmpty)
        #expect(!Backends().deviceStep().usesDevice(ThisProcess.pid) && !NoDeviceStep().usesDevice(ThisProcess.pid))
        #expect(try NoDeviceStep().settle(files: [], into: store) == nil)
    }

    @Test func theBackendsOpenADirectoryStoreAndFindTheRuntime() throws {
        let root = Harness.scratch("backends-store")
        defer { FileSystem.removeTree(root) }
        let store = try Backends().openStore(root + "/store", create: true)
        #expect(store.kind == .directory)
        #expect(store.path == root + "/store")
        let error = try #require(throws: StasisError.self) { try Backends().openStore(root + "/missing", create: false) }
        #expect(error.code == .notACheckpoint)
        #expect(try Backends().containerRuntime().name == "runc")
    }
}
