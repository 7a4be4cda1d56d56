import Foundation
import StasisCore
import StasisOS
import StasisStore

/// The device step for CUDA processes, through the driver's process checkpoint API and, for processes
/// started by `stasis run`, their agents.
///
/// Dump: find the tree's processes that hold NVIDIA device files, refuse what the driver cannot checkpoint
/// (MPS clients, MIG, managed memory, processes the driver does not know). Processes with an agent move
/// their device memory out themselves first, into the store (`AgentEvacuation`). Then lock them all and
/// checkpoint them all in parallel; the driver moves the rest of their device memory into their host memory,
/// which CRIU then dumps. Any failure puts every touched process back to running, memory refilled. Restore:
/// after CRIU, restore (remapping GPUs) and unlock every CUDA process in parallel, then the agents re-create
/// and refill their memory and let their calls go on.
// @unchecked Sendable: one operation drives it at a time; its parallel steps share only Locked state.
public final class CUDADeviceStep: DeviceStep, @unchecked Sendable {
    public var name: String { "cuda" }
    let lockTimeoutMilliseconds: UInt32
    /// --gpu-map: checkpoint GPU (UUID or index) to this machine's GPU (UUID or index).
    let gpuMap: [String: String]
    private let remapping = Locked<[(old: [UInt8], new: [UInt8])]>([])
    private let agents = AgentEvacuation()

    public init(lockTimeoutMilliseconds: UInt32 = 10_000, gpuMap: [String: String] = [:]) {
        self.lockTimeoutMilliseconds = lockTimeoutMilliseconds
        self.gpuMap = gpuMap
    }

    /// The /dev/nvidia* files the process holds open.
    static func nvidiaDescriptors(_ pid: Int32) -> [String] { ProcFS.descriptorTargets(pid).filter { $0.hasPrefix("/dev/nvidia") } }

    /// True when the process holds a /dev/nvidia* descriptor.
    public static func usesNvidiaDevice(_ pid: Int32) -> Bool { !nvidiaDescriptors(pid).isEmpty }

    public func usesDevice(_ pid: Int32) -> Bool { Self.usesNvidiaDevice(pid) }

    /// A process on a MIG instance holds the capability files of its GPU and compute instance
    /// (/dev/nvidia-caps/nvidia-capN, N listed as `gpu0/gi1/access`, `gpu0/gi1/ci0/access` in the driver's
    /// /proc/driver/nvidia-caps/mig-minors). Any process that asks NVML about MIG (PyTorch does) also holds
    /// `config` (1) and `monitor` (2) on a GPU without MIG partitions, so those two do not count. stasis does
    /// not carry MIG instances yet (which instance to restore onto is not decided): such a process is refused.
    static func migProblem(pid: Int32, descriptors: [String], capabilityNames: [Int: String] = migCapabilityNames()) -> String? {
        let instanceCaps = Set(descriptors.filter { path in
            guard path.hasPrefix("/dev/nvidia-caps/nvidia-cap"), let minor = Int(path.dropFirst("/dev/nvidia-caps/nvidia-cap".count)) else { return false }
            guard let name = capabilityNames[minor] else { return minor > 2 }  // without the table: the driver's fixed 1 and 2
            return name.contains("/gi")
        })
        guard !instanceCaps.isEmpty else { return nil }
        return "PID \(pid) runs on a MIG GPU instance (it holds \(instanceCaps.sorted().joined(separator: ", ")))"
    }

    /// The driver's table of MIG capability minors: "NAME MINOR" lines.
    static func migCapabilityNames(_ text: String? = try? String(contentsOfFile: "/proc/driver/nvidia-caps/mig-minors", encoding: .utf8)) -> [Int: String] {
        var names: [Int: String] = [:]
        for line in (text ?? "").split(separator: "\n") {
            let fields = line.split(separator: " ")
            if fields.count == 2, let minor = Int(fields[1]) { names[minor] = String(fields[0]) }
        }
        return names
    }

    /// NCCL between CUDA processes of the tree with its peer-to-peer transport on: each rank maps buffers
    /// the others exported (cuMemExportToShareableHandle). Driver 580 checkpoints those processes but its
    /// restore answers CUDA_ERROR_NOT_SUPPORTED (two H200s, data-parallel BERT), so the job would be lost.
    /// A process with the agent is left to it: the agent sees the exports themselves and refuses precisely.
    /// Without the agent the sign is NCCL (its library, or its /dev/shm/nccl-* segments) mapped in two CUDA
    /// processes or more, NCCL_P2P_DISABLE unset.
    static func ncclPeerToPeerProblem(_ processes: [(pid: Int32, mappings: [ProcFS.Mapping], environment: [String])]) -> String? {
        let disabled = Set(["1", "true", "yes", "on"])
        let ranks = processes.filter { process in
            process.mappings.contains { $0.path.contains("/libnccl") || $0.path.hasPrefix("/dev/shm/nccl-") }
                && !process.mappings.contains { $0.path.hasSuffix("/libstasis-agent.so") }
                && !process.environment.contains { $0.hasPrefix("NCCL_P2P_DISABLE=") && disabled.contains($0.dropFirst("NCCL_P2P_DISABLE=".count).lowercased()) }
        }
        guard ranks.count >= 2 else { return nil }
        return "PIDs \(ranks.map { String($0.pid) }.joined(separator: ", ")) run NCCL with its peer-to-peer transport, whose shared device memory the driver checkpoints but cannot restore (CUDA_ERROR_NOT_SUPPORTED)"
    }

    /// JAX (XLA's GPU runtime) on the driver path alone: on driver 580 (H100, 2026-12-07) a JAX job's
    /// `--leave-running` dump ended with the driver's restore answering CUDA_ERROR_NOT_INITIALIZED and the job
    /// dying of a segmentation fault, and a plain dump once lost the job before CRIU could seize it (issue 32).
    /// Its threads run on while the driver holds the process checkpointed, which is the window the driver path
    /// cannot close from outside. Under `stasis run` the agent holds every thread's calls itself. The sign is
    /// XLA's GPU plugin or jaxlib mapped without the agent; STASIS_ALLOW_XLA_DRIVER_PATH=1 lets it through
    /// (the GPU suite uses it to keep measuring).
    static func xlaDriverPathProblem(pid: Int32, mappings: [ProcFS.Mapping]) -> String? {
        guard !mappings.contains(where: { $0.path.hasSuffix("/libstasis-agent.so") }),
              let library = mappings.first(where: { $0.path.contains("/xla_cuda_plugin") || $0.path.contains("/jaxlib/") })?.path,
              ProcessInfo.processInfo.environment["STASIS_ALLOW_XLA_DRIVER_PATH"] != "1" else { return nil }
        return "PID \(pid) runs XLA's GPU runtime (it maps \(library)), which the driver's checkpoint alone has lost (its restore answered CUDA_ERROR_NOT_INITIALIZED and the job crashed)"
    }

    /// MPS clients talk to a daemon whose state the driver's checkpoint cannot carry.
    static func mpsProblem(_ pid: Int32) -> String? {
        let environment = ProcFS.environment(pid)
        if environment.contains(where: { $0.hasPrefix("CUDA_MPS_PIPE_DIRECTORY=") }) {
            return "PID \(pid) is an MPS client (CUDA_MPS_PIPE_DIRECTORY is set)"
        }
        if ProcFS.allPIDs().contains(where: { ProcFS.stat($0)?.command.hasPrefix("nvidia-cuda-mps") == true }) {
            return "an MPS control daemon runs on this machine, and PID \(pid) may be its client"
        }
        return nil
    }

    /// Managed (unified) memory, which the driver cannot checkpoint (it answers CUDA_ERROR_NOT_SUPPORTED
    /// after the process is locked). cudaMallocManaged maps each allocation from /dev/nvidia-uvm into the
    /// process. The driver maps that file too, 2 MiB for each GPU the process uses (seen on driver 580: one
    /// range in plain CUDA programs and PyTorch on one GPU, two in a process on two GPUs); the GPUs used are
    /// the /dev/nvidiaN files it maps (not those it holds open: CUDA opens every visible GPU). The smallest
    /// ranges, up to 2 MiB each, one per GPU, are the driver's; any further one is managed memory.
    static func managedMemoryProblem(pid: Int32, mappings: [ProcFS.Mapping]) -> String? {
        let uvm = mappings.filter { $0.path == "/dev/nvidia-uvm" }
        let gpus = Set(mappings.map(\.path).filter(isGPUDeviceFile)).count
        let driversOwn: UInt64 = 2 << 20
        var allowance = max(gpus, 1)
        var managed: [ProcFS.Mapping] = []
        for mapping in uvm.sorted(by: { $0.bytes < $1.bytes }) {
            if mapping.bytes <= driversOwn && allowance > 0 { allowance -= 1 } else { managed.append(mapping) }
        }
        guard !managed.isEmpty else { return nil }
        let bytes = managed.map(\.bytes).reduce(0, +)
        return "PID \(pid) uses managed (unified) memory: \(Format.bytes(bytes)) in \(managed.count) range(s) mapped from /dev/nvidia-uvm"
    }

    /// /dev/nvidia0, /dev/nvidia1, ...: a GPU's own device file (not nvidiactl, nvidia-uvm or nvidia-caps).
    static func isGPUDeviceFile(_ path: String) -> Bool {
        guard path.hasPrefix("/dev/nvidia") else { return false }
        let number = path.dropFirst("/dev/nvidia".count)
        return !number.isEmpty && number.allSatisfy(\.isNumber)
    }

    /// Runs `body` for every PID at once; returns the errors, by PID.
    static func parallel(_ pids: [Int32], _ body: @Sendable (Int32) throws -> Void) -> [Int32: Error] {
        let errors = Locked<[Int32: Error]>([:])
        DispatchQueue.concurrentPerform(iterations: pids.count) { index in
            do { try body(pids[index]) } catch { errors.withLock { $0[pids[index]] = error } }
        }
        return errors.current
    }

    static func describe(_ errors: [Int32: Error]) -> String {
        errors.sorted { $0.key < $1.key }.map { "\($0.value)" }.joined(separator: "; ")
    }

    public func beforeFreeze(pids: [Int32], store: DeviceStore) throws -> FrozenDevices {
        let users = pids.filter(Self.usesNvidiaDevice)
        guard !users.isEmpty else { return FrozenDevices() }
        try CheckpointDriver.load()
        // Refusals first: nothing has been touched yet.
        for pid in users {
            if let problem = Self.mpsProblem(pid) {
                throw StasisError(.gpu, "cannot checkpoint: \(problem); the driver cannot checkpoint MPS clients", hint: "run the job without MPS")
            }
            if let problem = Self.migProblem(pid: pid, descriptors: Self.nvidiaDescriptors(pid)) {
                throw StasisError(.gpu, "cannot checkpoint: \(problem); MIG is not supported yet; nothing was touched",
                                  hint: "run the job on a GPU without MIG partitions")
            }
            let mappings = ProcFS.mappings(pid)
            if let problem = Self.managedMemoryProblem(pid: pid, mappings: mappings) {
                throw StasisError(.gpu, "cannot checkpoint: \(problem); the driver cannot checkpoint managed memory; nothing was touched",
                                  hint: "allocate with cudaMalloc instead of cudaMallocManaged")
            }
            if let problem = Self.xlaDriverPathProblem(pid: pid, mappings: mappings) {
                throw StasisError(.gpu, "cannot checkpoint: \(problem); nothing was touched",
                                  hint: "start the job under `stasis run` (its agent moves the device memory and the job stays held until it is back)")
            }
            guard let state = CheckpointDriver.state(pid) else {
                throw StasisError(.gpu, "PID \(pid) (\(ProcFS.stat(pid)?.command ?? "?")) holds NVIDIA device files but the CUDA driver does not know it as a CUDA process",
                                  hint: "only CUDA processes can be checkpointed (not OpenGL/Vulkan users or MPS servers)")
            }
            guard state == .running else {
                throw StasisError(.gpu, "PID \(pid) is \(state) in the CUDA driver, not running; another checkpoint may be in progress")
            }
        }
        if let problem = Self.ncclPeerToPeerProblem(users.map { ($0, ProcFS.mappings($0), ProcFS.environment($0)) }) {
            throw StasisError(.gpu, "cannot checkpoint: \(problem); nothing was touched",
                              hint: "start the job with NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0 (NCCL then passes data through plain host memory, which checkpoints)")
        }
        let inventory = GPUInventory.read()
        let timeout = lockTimeoutMilliseconds
        try agents.evacuate(users, into: store, timeoutMilliseconds: timeout, tree: Set(pids))
        let lockWatch = Stopwatch()
        var errors = Self.parallel(users) { try CheckpointDriver.lock($0, timeoutMilliseconds: timeout) }
        let lockSeconds = lockWatch.seconds
        let checkpointWatch = Stopwatch()
        if errors.isEmpty {
            errors = Self.parallel(users) { try CheckpointDriver.checkpoint($0) }
        }
        let checkpointSeconds = checkpointWatch.seconds
        guard errors.isEmpty else {
            let problems = putBackEverything(users)
            var message = "GPU checkpoint failed: \(Self.describe(errors)); every CUDA process was put back to running"
            if !problems.isEmpty { message = "GPU checkpoint failed: \(Self.describe(errors)); putting processes back also failed: \(problems.joined(separator: "; "))" }
            throw StasisError(.gpu, message, hint: errors.values.contains { "\($0)".contains("NOT_SUPPORTED") }
                              ? "the driver cannot checkpoint something these processes use (managed memory, CUDA IPC, ...)" : nil)
        }
        let used = Set(inventory.processes.filter { users.contains($0.pid) }.map(\.gpuUUID))
        let evacuated = agents.processes
        let section = Manifest.GPUSection(
            driverVersion: CheckpointDriver.versionString,
            devices: inventory.gpus.filter { used.isEmpty || used.contains($0.uuid) }.map {
                Manifest.GPUDevice(index: $0.index, uuid: $0.uuid, name: $0.name, memoryBytes: $0.memoryTotalBytes)
            },
            processes: users.map { pid in
                let uses = inventory.processes.filter { $0.pid == pid }
                let memory = uses.reduce(0) { $0 + $1.memoryBytes }
                var agent = evacuated[pid]?.memory
                if let moved = agent?.evacuatedBytes { agent?.driverPathBytes = memory > moved ? memory - moved : 0 }
                return Manifest.GPUProcess(pid: pid, devices: uses.map(\.gpuUUID), deviceMemoryBytes: memory, agent: agent)
            },
            lockSeconds: lockSeconds, checkpointSeconds: checkpointSeconds)
        return FrozenDevices(section: section, files: agents.files, statistics: agents.statistics)
    }

    public func afterDump(section: Manifest.GPUSection, leaveRunning: Bool) throws {
        guard leaveRunning, !section.processes.isEmpty else {
            // The processes are gone; the checkpoint holds their device memory.
            agents.forgetRescues()
            return
        }
        let errors = Self.parallel(section.processes.map(\.pid)) { pid in
            try CheckpointDriver.restore(pid)
            try CheckpointDriver.unlock(pid)
        }
        let held = agents.heldPIDs(Set(errors.keys))
        let problems = Self.describeEach(errors) + agents.putBackAll(except: Set(errors.keys))
        guard problems.isEmpty else {
            var hint = "the checkpoint is intact: stop the tree and restore it from there"
            if !held.isEmpty { hint += "; or, once the driver lets PID \(held.map(String.init).joined(separator: ", ")) go, `stasis resume PID` puts its agent's memory back" }
            throw StasisError(.gpu, "the checkpoint is complete, but resuming the GPU of the running tree failed: \(problems.joined(separator: "; "))",
                              hint: hint)
        }
    }

    public func rollback(section: Manifest.GPUSection) -> [String] {
        putBackEverything(section.processes.map(\.pid))
    }

    public func settle(files: [Manifest.FileEntry], into store: ChunkStore) throws -> ChunkIngester.Statistics? {
        try agents.settle(files: files, into: store)
    }

    /// The driver first (an agent needs a running CUDA to put its memory back), then the agents of the
    /// processes the driver let go: an agent whose process is still locked would wait on the driver.
    /// Returns what could not be put back. A stage in memory goes with it (unless it holds a rescue entry).
    func putBackEverything(_ pids: [Int32]) -> [String] {
        let errors = Self.parallel(pids) { try CheckpointDriver.resume($0) }
        defer { agents.dropStage() }
        return Self.describeEach(errors) + agents.putBackAll(except: Set(errors.keys))
    }

    static func describeEach(_ errors: [Int32: Error]) -> [String] {
        errors.sorted { $0.key < $1.key }.map { "\($0.value)" }
    }

    /// Matches the checkpoint's GPUs to this machine's before anything is restored; see `remapping(for:on:map:)`.
    public func checkRestorable(section: Manifest.GPUSection) throws {
        guard !section.processes.isEmpty else { return }
        try CheckpointDriver.load()
        let pairs = try Self.remapping(for: section, on: GPUInventory.read().gpus, map: gpuMap)
        remapping.withLock { $0 = pairs }
    }

    /// The (old UUID, new UUID) table for the driver's restore: --gpu-map first, then the same UUID, then the
    /// same index. Refuses a map naming a GPU the checkpoint did not use or this machine does not have, a GPU of
    /// another model, and one with less free memory than the checkpoint's processes had on it.
    static func remapping(for section: Manifest.GPUSection, on here: [GPUInventory.GPU],
                          map gpuMap: [String: String]) throws -> [(old: [UInt8], new: [UInt8])] {
        guard !here.isEmpty else { throw StasisError(.gpu, "the checkpoint holds GPU state but this machine lists no GPU (nvidia-smi)") }
        for key in gpuMap.keys.sorted() where !section.devices.contains(where: { $0.uuid == key || String($0.index) == key }) {
            throw StasisError(.gpu, "--gpu-map names GPU \(key), which the checkpoint did not use (it used \(section.devices.map { "\($0.index): \($0.uuid)" }.joined(separator: ", ")))")
        }
        func find(_ key: String) -> GPUInventory.GPU? {
            here.first { $0.uuid == key } ?? Int(key).flatMap { index in here.first { $0.index == index } }
        }
        var pairs: [(old: [UInt8], new: [UInt8])] = []
        for device in section.devices {
            let mapped = gpuMap[device.uuid] ?? gpuMap[String(device.index)]
            let target: GPUInventory.GPU
            if let mapped {
                guard let found = find(mapped) else {
                    throw StasisError(.gpu, "--gpu-map names GPU \(mapped), which this machine does not have (it has \(here.map { "\($0.index): \($0.uuid)" }.joined(separator: ", ")))")
                }
                target = found
            } else if let found = here.first(where: { $0.uuid == device.uuid }) ?? here.first(where: { $0.index == device.index }) {
                target = found
            } else {
                throw StasisError(.gpu, "no GPU here matches the checkpoint's GPU \(device.index) (\(device.uuid), \(device.name))", hint: "map it with --gpu-map \(device.uuid)=NEW")
            }
            guard target.name == device.name else {
                throw StasisError(.gpu, "GPU \(target.index) here is a \(target.name); the checkpoint's GPU \(device.uuid) was a \(device.name)",
                                  hint: "restore onto the same GPU model (map another one with --gpu-map)")
            }
            let needed = section.processes.filter { $0.devices.contains(device.uuid) }.reduce(0) { $0 + $1.deviceMemoryBytes }
            guard target.memoryFreeBytes >= needed else {
                throw StasisError(.gpu, "GPU \(target.index) (\(target.uuid)) has \(Format.bytes(target.memoryFreeBytes)) free; the checkpoint needs \(Format.bytes(needed)) on it")
            }
            // An explicit mapping is always handed to the driver, even onto the same GPU.
            if target.uuid != device.uuid || mapped != nil, let old = GPUInventory.uuidBytes(device.uuid), let new = GPUInventory.uuidBytes(target.uuid) {
                pairs.append((old, new))
            }
        }
        return pairs
    }

    public func afterRestore(section: Manifest.GPUSection, store: DeviceStore?, files: [Manifest.FileEntry], holdCalls: Bool) throws -> [String: Double] {
        guard !section.processes.isEmpty else { return [:] }
        let pairs = remapping.current
        let watch = Stopwatch()
        let errors = Self.parallel(section.processes.map(\.pid)) { pid in
            try CheckpointDriver.restore(pid, remapping: pairs)
            try CheckpointDriver.unlock(pid)
        }
        guard errors.isEmpty else { throw StasisError(.gpu, "GPU restore failed: \(Self.describe(errors))") }
        let driver = watch.seconds
        guard section.processes.contains(where: { $0.agent != nil }) else { return ["driver": driver] }
        guard let store else { throw StasisError(.gpu, "the checkpoint holds device memory moved by agents, but no store to read it from") }
        let cpu = ProcessCPU.seconds
        let refill = try AgentEvacuation.refill(section, store: store, files: files, resume: !holdCalls)
        // "gpu check" is part of "refill": hashing what landed in the device, where the GPU did it. "refill cpu":
        // the CPU seconds stasis spent meanwhile (divided by "refill": the cores the transfer kept busy).
        return ["driver": driver, "refill": refill.seconds, "refill cpu": ProcessCPU.seconds - cpu]
            .merging(refill.gpuCheck.map { ["gpu check": $0] } ?? [:]) { first, _ in first }
    }

    /// Only agents hold a program's CUDA calls: a process restored through the driver alone would run on its
    /// GPU as soon as the driver unlocks it.
    public func refusesHolding(section: Manifest.GPUSection) -> String? {
        guard let process = section.processes.first(where: { $0.agent == nil }) else { return nil }
        return "GPU process \(process.pid) was checkpointed through the driver, and nothing would hold its CUDA calls until the activation"
            + " (run the job under `stasis run` so that its agent does)"
    }

    public func letGo(pids: [Int32]) throws {
        let errors = Self.parallel(pids) { pid in
            guard let session = try AgentSession.open(pid: pid) else {
                throw StasisError(.gpu, "the agent of PID \(pid) does not answer")
            }
            defer { session.disconnect() }
            try session.resume()
        }
        guard errors.isEmpty else { throw StasisError(.gpu, "letting the CUDA calls go on failed: \(Self.describe(errors))") }
    }
}
