import Foundation
import StasisCore
import StasisCRIU
@testable import StasisEngine
@testable import StasisGPU
import StasisImage
import StasisOS
import Testing

@Suite struct ManifestDecoding {
    func sample() -> Manifest {
        Manifest(id: "x", createdAt: Date(timeIntervalSince1970: 0), tool: .init(name: "stasis", version: "0"),
                 host: .init(hostname: "h", kernel: "k", machine: "x86_64", cpuModel: "c", cpuFlags: ["avx2"], pageSize: 4096),
                 criu: .init(version: "4.1.1", logFile: "criu-dump.log"),
                 options: .init(leaveRunning: false, tcpEstablished: false, shellJob: false),
                 processTree: .init(rootPID: 42, processes: [.init(pid: 42, ppid: 1, command: "job", arguments: [], threads: 1, residentBytes: 0)]),
                 memory: .init(residentBytes: 0, dumpedBytes: 0, imageBytes: 0),
                 timings: .init(), gpu: .init(), files: [.init(path: "a", size: 1, sha256: Self.digest("0"))])
    }

    static func digest(_ character: Character) -> String { String(repeating: character, count: 64) }

    /// The manifest's problem after `edit`, as decoding reports it (nil: it decodes).
    func problem(_ edit: (inout Manifest) -> Void) throws -> String? {
        var manifest = sample()
        edit(&manifest)
        do {
            _ = try Manifest.decode(try Manifest.encoder().encode(manifest), path: "m")
            return nil
        } catch let error as StasisError {
            #expect(error.code == .manifestInvalid)
            return error.message
        }
    }

    /// Everything a manifest says that could steer stasis outside its directories, at another process, or
    /// into a trap is refused when it is read, wherever that is.
    @Test func dangerousValuesAreRefusedWhenRead() throws {
        #expect(try problem { _ in } == nil)
        #expect(try problem { $0.files[0].path = "../../x" }?.contains("not a plain relative path") == true)
        #expect(try problem { $0.files[0].path = "/etc/passwd" }?.contains("not a plain relative path") == true)
        #expect(try problem { $0.files[0].path = "gpu/./x" }?.contains("not a plain relative path") == true)
        #expect(try problem { $0.files.append($0.files[0]) }?.contains("appears twice") == true)
        #expect(try problem { $0.processTree.processes[0].pid = -1; $0.processTree.rootPID = -1 }?.contains("is not a PID") == true)
        #expect(try problem { $0.processTree.processes[0].pid = 0; $0.processTree.rootPID = 0 }?.contains("is not a PID") == true)
        #expect(try problem { $0.processTree.rootPID = 7 }?.contains("root PID 7 is not one of") == true)
        #expect(try problem { $0.processTree.processes = [] }?.contains("process tree is empty") == true)
        #expect(try problem { $0.id = "../x" }?.contains("not a plain name") == true)
        #expect(try problem { $0.host.pageSize = 0 }?.contains("page size") == true)
        #expect(try problem { $0.files[0].size = UInt64.max }?.contains("claims") == true)
        #expect(try problem { $0.files[0].sha256 = "zz" }?.contains("64 hex digits") == true)
        for size in [0, -4096, 1000, 1 << 40] {
            #expect(try problem {
                $0.store = .init(path: "/s", chunkSize: size, codec: "lz4", plainBytes: 0, storedBytes: 0, newChunks: 0, reusedChunks: 0, zeroChunks: 0)
            }?.contains("chunk size") == true, "chunk size \(size)")
        }
        #expect(try problem { $0.files[0].chunks = [Self.digest("a")] }?.contains("names no store") == true)
        #expect(try problem { $0.gpu.processes = [.init(pid: 9, devices: [], deviceMemoryBytes: 0)] }?.contains("GPU process 9") == true)
    }

    @Test func roundTrips() throws {
        let data = try Manifest.encoder().encode(sample())
        #expect(try Manifest.decode(data, path: "m") == sample())
    }

    /// Device memory an agent moved: the agent section round-trips, and its files are chunked files that CRIU
    /// is never given.
    @Test func agentMemoryRoundTripsAndStaysAwayFromCRIU() throws {
        var manifest = sample()
        manifest.formatVersion = Manifest.currentVersion
        let allocation = Manifest.AgentAllocation(id: 0x5354415300000001, bytes: 4 << 20, device: 0, file: "gpu/42/5354415300000001")
        var memory = Manifest.AgentMemory(allocations: [allocation], evacuatedBytes: 4 << 20, driverPathBytes: 520 << 20, ringBytes: 64 << 20,
                                          quiesceSeconds: 0.001, evacuateSeconds: 0.5, releaseSeconds: 0.002)
        memory.storedBytes = 3 << 20
        manifest.gpu = .init(processes: [.init(pid: 42, devices: ["GPU-x"], deviceMemoryBytes: 524 << 20, agent: memory)])
        manifest.processTree = .init(rootPID: 42, processes: [.init(pid: 42, ppid: 1, command: "job", arguments: [], threads: 1, residentBytes: 0)])
        manifest.store = .init(path: "/s", chunkSize: 2 << 20, codec: "lz4", plainBytes: 0, storedBytes: 0, newChunks: 0, reusedChunks: 0, zeroChunks: 0)
        manifest.files = [.init(path: "pages-1.img", size: 2 << 20, sha256: Self.digest("c"), chunks: [String(repeating: "a", count: 64)]),
                          .init(path: allocation.file, size: 4 << 20, sha256: Self.digest("d"), chunks: [String(repeating: "b", count: 64), ""])]
        let decoded = try Manifest.decode(try Manifest.encoder().encode(manifest), path: "m")
        #expect(decoded == manifest)
        #expect(decoded.gpu.processes.first?.agent?.allocations.first?.id == 0x5354415300000001)
        #expect(Checkpoint.chunkedItems(decoded).map(\.path).sorted() == ["gpu/42/5354415300000001", "pages-1.img"])
        #expect(Checkpoint.criuItems(decoded).map(\.path) == ["pages-1.img"])
    }

    @Test func truncatedIsInvalid() throws {
        let data = try Manifest.encoder().encode(sample())
        let error = #expect(throws: StasisError.self) { try Manifest.decode(data.prefix(data.count / 2), path: "m") }
        #expect(error?.code == .manifestInvalid)
    }

    @Test func newerVersionIsRefusedByNumber() throws {
        var manifest = sample()
        manifest.formatVersion = Manifest.currentVersion + 1
        let error = #expect(throws: StasisError.self) { try Manifest.decode(try Manifest.encoder().encode(manifest), path: "m") }
        #expect(error?.code == .manifestVersion)
        #expect(error?.message.contains("format version \(Manifest.currentVersion + 1)") == true)
    }

    @Test func foreignJSONIsNotACheckpoint() {
        let error = #expect(throws: StasisError.self) { try Manifest.decode(Data(#"{"hello": 1}"#.utf8), path: "m") }
        #expect(error?.code == .notACheckpoint)
    }

    @Test func missingFieldIsNamed() throws {
        var object = try JSONSerialization.jsonObject(with: try Manifest.encoder().encode(sample())) as! [String: Any]
        object.removeValue(forKey: "processTree")
        let error = #expect(throws: StasisError.self) { try Manifest.decode(try JSONSerialization.data(withJSONObject: object), path: "m") }
        #expect(error?.message.contains("processTree") == true)
    }
}

@Suite struct SmallPieces {
    @Test func formatsBytes() {
        #expect(Format.bytes(512) == "512 B")
        #expect(Format.bytes(3 << 30) == "3.00 GiB")
    }

    @Test func logExcerptSkipsHarmlessLinesAndKeepsErrors() throws {
        let path = "/tmp/stasis-unit-\(getpid()).log"
        defer { unlink(path) }
        try """
        (00.01) starting
        (00.02) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
        (00.03) about to fail
        (00.04) Error (criu/pstree.c:300): The root process 1 is not a session leader.
        (00.05) Error (criu/cr-dump.c:2111): Dumping FAILED.
        """.write(toFile: path, atomically: true, encoding: .utf8)
        let lines = CRIULog.excerpt(path: path)
        #expect(lines.count == 3)
        #expect(lines[0].contains("about to fail"))
        #expect(lines[1].contains("session leader"))
    }

    @Test func procStatParsesCommandsWithParentheses() {
        let me = ProcFS.stat(getpid())
        #expect(me?.pid == getpid())
        #expect(me?.ppid == getppid())
    }

    @Test func hostFactsKeepOnlyInstructionSetFlags() {
        let host = HostFacts.current()
        #expect(!host.cpuFlags.isEmpty)
        #expect(host.cpuFlags.allSatisfy(HostFacts.instructionSetFlags.contains))
    }
}

@Suite struct CheckAdvice {
    @Test func warnsAboutCRIUBefore42OnKernel616AndLater() {
        #expect(CheckOperation.knownIncompatibilities(criu: "4.1.1", kernel: "6.18.44-fc-v669").count == 1)
        #expect(CheckOperation.knownIncompatibilities(criu: "4.2.1", kernel: "6.18.44").isEmpty)
        #expect(CheckOperation.knownIncompatibilities(criu: "4.1", kernel: "6.1.0-18-amd64").isEmpty)
    }
}

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

@Suite struct ListeningSockets {
    // Rows as /proc/net/tcp and tcp6 show them: 127.0.0.1:8080 and [::1]:8080 listening (state 0A), and an
    // established connection that is not a listener.
    let tcp = """
          sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
           0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
           1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
        """
    let tcp6 = """
          sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
           0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
        """

    @Test func listenersOfTheProcessAreFoundInBothTables() {
        let v4 = TCPListeners.parseListening(tcp, family: AF_INET, inodes: ["4242", "4343"])
        #expect(v4.map(\.description) == ["127.0.0.1:8080"], "only the listening row")
        let v6 = TCPListeners.parseListening(tcp6, family: AF_INET6, inodes: ["4444"])
        #expect(v6.map(\.description) == ["[::1]:8080"])
        #expect(TCPListeners.parseListening(tcp, family: AF_INET, inodes: ["9999"]).isEmpty, "not this process's socket")
    }

    @Test func endpointsRoundTripThroughTheManifestsText() {
        for text in ["127.0.0.1:8080", "0.0.0.0:22", "[::]:80", "[fe80::1]:7070"] {
            #expect(TCPListeners.Endpoint(text)?.description == text)
        }
        #expect(TCPListeners.Endpoint("nonsense") == nil)
        #expect(TCPListeners.Endpoint("1.2.3.4:99999") == nil)
    }
}
