import Foundation
import Glibc
import StasisCore
@testable import StasisGPU
import StasisOS
import StasisTestSupport
import Testing

/// How a checkpoint's GPUs are matched to a machine's, without a GPU: the rules --gpu-map and restore follow.
@Suite struct GPUMatching {
    let a = "GPU-f11ae0fe-3cf1-c82a-81c8-c19640ddf9e0", b = "GPU-c8369dfc-8558-4fdf-0349-cad29f425bcb"
    func section(_ uuid: String, index: Int = 0, name: String = "NVIDIA H200", needs: UInt64 = 10 << 30) -> Manifest.GPUSection {
        .init(driverVersion: "13.0", devices: [.init(index: index, uuid: uuid, name: name, memoryBytes: 140 << 30)],
              processes: [.init(pid: 42, devices: [uuid], deviceMemoryBytes: needs)])
    }
    func gpu(_ uuid: String, index: Int = 0, name: String = "NVIDIA H200", free: UInt64 = 100 << 30) -> GPUInventory.GPU {
        .init(index: index, uuid: uuid, name: name, memoryTotalBytes: 140 << 30, memoryFreeBytes: free)
    }

    @Test func sameUUIDNeedsNoRemapping() throws {
        #expect(try CUDADeviceStep.remapping(for: section(a), on: [gpu(b, index: 1), gpu(a, index: 0)], map: [:]).isEmpty)
    }

    @Test func otherUUIDAtTheSameIndexIsRemapped() throws {
        let pairs = try CUDADeviceStep.remapping(for: section(a), on: [gpu(b)], map: [:])
        #expect(pairs.count == 1)
        #expect(pairs[0].old == GPUInventory.uuidBytes(a) && pairs[0].new == GPUInventory.uuidBytes(b))
    }

    @Test func explicitMapOntoTheSameGPUIsStillHandedToTheDriver() throws {
        #expect(try CUDADeviceStep.remapping(for: section(a), on: [gpu(a)], map: [a: a]).count == 1)
        #expect(try CUDADeviceStep.remapping(for: section(a), on: [gpu(a), gpu(b, index: 1)], map: ["0": "1"]).first?.new == GPUInventory.uuidBytes(b))
    }

    @Test func refusals() {
        let cases: [(Manifest.GPUSection, [GPUInventory.GPU], [String: String], String)] = [
            (section(a), [gpu(a)], ["GPU-00000000-0000-0000-0000-000000000000": a], "did not use"),
            (section(a), [gpu(a)], [a: "GPU-00000000-0000-0000-0000-000000000000"], "does not have"),
            (section(a), [gpu(a, name: "NVIDIA H100 80GB HBM3")], [:], "was a NVIDIA H200"),
            (section(a, needs: 120 << 30), [gpu(a)], [:], "free; the checkpoint needs"),
            (section(a, index: 3), [gpu(b)], [:], "no GPU here matches"),
            (section(a), [], [:], "lists no GPU"),
        ]
        for (checkpoint, here, map, message) in cases {
            let error = #expect(throws: StasisError.self) { try CUDADeviceStep.remapping(for: checkpoint, on: here, map: map) }
            #expect(error?.message.contains(message) == true, "\(message): \(error?.message ?? "no error")")
        }
    }
}

@Suite struct MIGDetection {
    @Test func processOnAMIGInstanceIsNamed() throws {
        let table = CUDADeviceStep.migCapabilityNames("config 1\nmonitor 2\ngpu0/gi0/access 3\ngpu0/gi0/ci0/access 4\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\n")
        #expect(table[1] == "config" && table[13] == "gpu0/gi1/ci0/access")
        let held = ["/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm", "/dev/nvidia-caps/nvidia-cap12", "/dev/nvidia-caps/nvidia-cap13"]
        let problem = try #require(CUDADeviceStep.migProblem(pid: 9, descriptors: held, capabilityNames: table))
        #expect(problem.contains("PID 9 runs on a MIG GPU instance") && problem.contains("nvidia-cap13"))
        #expect(CUDADeviceStep.migProblem(pid: 9, descriptors: ["/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm"], capabilityNames: table) == nil)
    }

    /// Seen on the H200 without MIG partitions: PyTorch processes hold config (1) and monitor (2).
    @Test func migConfigAndMonitorAloneAreNotAnInstance() {
        let held = ["/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap1", "/dev/nvidia-caps/nvidia-cap2"]
        #expect(CUDADeviceStep.migProblem(pid: 9, descriptors: held, capabilityNames: CUDADeviceStep.migCapabilityNames("config 1\nmonitor 2\n")) == nil)
        #expect(CUDADeviceStep.migProblem(pid: 9, descriptors: held, capabilityNames: [:]) == nil)
        #expect(CUDADeviceStep.migProblem(pid: 9, descriptors: held + ["/dev/nvidia-caps/nvidia-cap21"], capabilityNames: [:]) != nil)
    }
}

@Suite struct ManagedMemoryDetection {
    // Lines as /proc/PID/maps shows them on the GPU machine (driver 580): a plain CUDA process maps
    // /dev/nvidia-uvm once, 2 MiB; cudaMallocManaged of 64 MiB adds a 64 MiB range of it.
    let plain = """
        200000000-200200000 rw-s 00000000 00:05 10 /dev/nvidiactl
        7f0000000000-7f0000200000 rw-s 00000000 00:05 12 /dev/nvidia-uvm
        7f1000000000-7f1000010000 r-xp 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libcuda.so.580.159.04
        7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
        """
    let managed = "7f2000000000-7f2004000000 rw-s 7f2000000000 00:05 12 /dev/nvidia-uvm\n"

    @Test func plainCUDAProcessIsAccepted() {
        #expect(CUDADeviceStep.managedMemoryProblem(pid: 7, mappings: ProcFS.parseMappings(plain)) == nil)
    }

    @Test func managedAllocationIsNamedWithItsSize() throws {
        let problem = try #require(CUDADeviceStep.managedMemoryProblem(pid: 7, mappings: ProcFS.parseMappings(plain + "\n" + managed)))
        #expect(problem.contains("PID 7 uses managed"))
        #expect(problem.contains("64.00 MiB"))
    }

    // A process on two GPUs (driver 580, H200 x2): the driver's 2 MiB range once per GPU.
    @Test func theDriversRangePerGPUIsNotManagedMemory() throws {
        let second = "7f0000400000-7f0000600000 rw-s 00000000 00:05 12 /dev/nvidia-uvm\n"
        let twoGPUs = plain + "\n" + second
        // Which GPUs it uses: the device files it maps (not those it holds open: CUDA opens every GPU).
        let mappedGPUs = "7e0000000000-7e0000001000 rw-s 00000000 00:05 20 /dev/nvidia0\n7e0000002000-7e0000003000 rw-s 00000000 00:05 21 /dev/nvidia1\n"
        #expect(CUDADeviceStep.managedMemoryProblem(pid: 7, mappings: ProcFS.parseMappings(twoGPUs + mappedGPUs)) == nil)
        // On one GPU the second range is managed memory.
        let oneGPU = "7e0000000000-7e0000001000 rw-s 00000000 00:05 20 /dev/nvidia0\n"
        let problem = try #require(CUDADeviceStep.managedMemoryProblem(pid: 7, mappings: ProcFS.parseMappings(twoGPUs + oneGPU)))
        #expect(problem.contains("2.00 MiB in 1 range(s)"))
        // Two GPUs do not excuse a managed allocation of another size.
        #expect(CUDADeviceStep.managedMemoryProblem(pid: 7, mappings: ProcFS.parseMappings(plain + "\n" + managed + mappedGPUs)) != nil)
    }

    @Test func pathsWithSpacesAndAnonymousRangesParse() {
        let mappings = ProcFS.parseMappings("1000-3000 r--p 00000000 08:01 5 /tmp/a file (deleted)\n4000-5000 rw-p 00000000 00:00 0\n")
        #expect(mappings == [.init(start: 0x1000, end: 0x3000, path: "/tmp/a file (deleted)"), .init(start: 0x4000, end: 0x5000, path: "")])
    }
}

@Suite struct NCCLPeerToPeerDetection {
    let nccl = ProcFS.parseMappings("7f0000000000-7f0000100000 r-xp 00000000 08:01 9 /usr/lib/python3/site-packages/nvidia/nccl/lib/libnccl.so.2\n")
    let agent = ProcFS.parseMappings("7f1000000000-7f1000100000 r-xp 00000000 08:01 9 /opt/stasis/bin/libstasis-agent.so\n")

    @Test func twoRanksWithPeerToPeerAreRefused() throws {
        let problem = try #require(CUDADeviceStep.ncclPeerToPeerProblem([(11, nccl, []), (12, nccl, ["PATH=/bin"])]))
        #expect(problem.contains("PIDs 11, 12") && problem.contains("peer-to-peer"))
    }

    @Test func oneRankP2PDisabledOrAgentsAreLeftAlone() {
        #expect(CUDADeviceStep.ncclPeerToPeerProblem([(11, nccl, [])]) == nil, "a single process has no peer")
        #expect(CUDADeviceStep.ncclPeerToPeerProblem([(11, nccl, ["NCCL_P2P_DISABLE=1"]), (12, nccl, ["NCCL_P2P_DISABLE=1"])]) == nil)
        #expect(CUDADeviceStep.ncclPeerToPeerProblem([(11, nccl + agent, []), (12, nccl + agent, [])]) == nil, "the agents judge for themselves")
    }
}

@Suite struct NCCLMappingsFromProc {
    /// Two real processes that map a file named like NCCL's library are seen as NCCL ranks through /proc.
    @Test func realProcessesMappingNCCLAreSeen() throws {
        let library = Harness.scratch("nccl") + "/libnccl.so.2"
        try Data(repeating: 1, count: 4096).write(to: URL(fileURLWithPath: library))
        // Thousands of other mappings first, as a PyTorch process has (/proc/PID/maps is then far longer than
        // a page), and a file whose name is not UTF-8, which made a rank's whole maps unreadable.
        let script = "import mmap,time\nkeep=[mmap.mmap(-1,4096,prot=mmap.PROT_READ if i%2 else mmap.PROT_READ|mmap.PROT_WRITE) for i in range(8000)]\nb=open(b'\(library)-\\xff\\xfe','wb+')\nb.write(b'x'*4096)\nb.flush()\nn=mmap.mmap(b.fileno(),4096)\nf=open('\(library)','rb')\nm=mmap.mmap(f.fileno(),4096,prot=mmap.PROT_READ)\nprint('ready',flush=True)\ntime.sleep(30)"
        var processes: [Process] = []
        for _ in 0..<2 {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
            process.arguments = ["-c", script]
            let out = Pipe()
            process.standardOutput = out
            try process.run()
            _ = out.fileHandleForReading.availableData
            processes.append(process)
        }
        defer { processes.forEach { $0.terminate() } }
        let seen = processes.map { ($0.processIdentifier, ProcFS.mappings($0.processIdentifier), ProcFS.environment($0.processIdentifier)) }
        #expect(CUDADeviceStep.ncclPeerToPeerProblem(seen) != nil, "\(seen.map { $0.1.filter { $0.path.contains("nccl") }.count })")
    }
}

/// JAX on the driver path alone is refused before anything is touched (issue 32); under the agent it is not.
@Suite struct XLADriverPathDetection {
    let cuda = "7f1000000000-7f1000010000 r-xp 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libcuda.so.580.159.04\n"
    let plugin = "7f3000000000-7f3100000000 r-xp 00000000 08:01 77 /opt/torch/.venv/lib/python3.12/site-packages/jax_plugins/xla_cuda13/xla_cuda_plugin.so\n"
    let agent = "7f4000000000-7f4000100000 r-xp 00000000 08:01 55 /opt/stasis/bin/libstasis-agent.so\n"

    @Test func aJAXProcessWithoutTheAgentIsNamed() throws {
        let problem = try #require(CUDADeviceStep.xlaDriverPathProblem(pid: 9, mappings: ProcFS.parseMappings(cuda + plugin)))
        #expect(problem.contains("PID 9 runs XLA") && problem.contains("xla_cuda_plugin.so"), "\(problem)")
    }

    @Test func underTheAgentOrWithoutXLAItPasses() {
        #expect(CUDADeviceStep.xlaDriverPathProblem(pid: 9, mappings: ProcFS.parseMappings(cuda + plugin + agent)) == nil)
        #expect(CUDADeviceStep.xlaDriverPathProblem(pid: 9, mappings: ProcFS.parseMappings(cuda)) == nil)
    }
}
