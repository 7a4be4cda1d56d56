import Foundation

/// `manifest.json`: what a checkpoint directory holds. The schema is documented in docs/FORMAT.md; every
/// change that an older stasis could misread bumps `formatVersion`.
public struct Manifest: Codable, Sendable, Equatable {
    public static let formatName = "stasis.checkpoint"
    /// The newest format this build reads and the one it writes. Version 2 added chunked files (`files[].chunks`)
    /// in a chunk store (`store`); version 1 checkpoints (every file whole) are still read.
    /// 3: device memory moved by agents (`GPUProcess.agent`, files under gpu/); an older stasis would restore
    /// such a process without refilling it and leave its CUDA calls held. A checkpoint without agent memory is
    /// still written as version 2.
    /// 4: a container checkpointed through its runtime (`container`); an older stasis would restore its
    /// processes with plain CRIU, outside the container. Written only for containers.
    /// 5: device memory shared between processes (`AgentMemory.imports`); an older stasis would leave the
    /// importers without it and their CUDA calls held. Written only when a process imports memory.
    /// 6: content-defined chunks (`files[].chunkLengths`); an older stasis would refuse the chunk count, or
    /// place the chunks at fixed offsets. Written only when a file has them.
    public static let currentVersion = 6
    public static let versionWithContentDefinedChunks = 6
    public static let versionWithSharedMemory = 5
    public static let versionWithContainer = 4
    public static let versionWithAgents = 3
    public static let versionWithoutAgents = 2
    public static let fileName = "manifest.json"

    public var format: String = Manifest.formatName
    public var formatVersion: Int = Manifest.currentVersion
    public var id: String
    public var createdAt: Date
    public var tool: Tool
    public var host: Host
    public var criu: CRIUInfo
    public var options: DumpOptions
    public var processTree: ProcessTree
    public var memory: Memory
    public var timings: Timings
    public var gpu: GPUSection
    /// Every file of the checkpoint but the manifest itself, sorted by path: whole files in the checkpoint
    /// directory, and chunked ones (CRIU's memory images) whose chunks are in the store.
    public var files: [FileEntry]
    /// The chunk store holding the chunked files; nil when every file is whole.
    public var store: StoreInfo?
    /// The container, when the checkpoint is one of a container made by a runtime (runc) rather than of a
    /// process tree: its runtime restores it.
    public var container: Container?

    public struct Container: Codable, Sendable, Equatable {
        /// "runc".
        public var runtime: String
        public var id: String
        /// The OCI bundle it ran from (its config.json and root filesystem), where it is restored by default.
        public var bundle: String
        /// The bundle's config.json as it was, kept in the checkpoint (a whole file).
        public var spec: String
        /// What the engine that made the container (podman) knows of it, when stasis found it: what a
        /// checkpoint archive needs for that engine to restore it. Optional, ignored by an older stasis.
        public var engine: Engine?
        public init(runtime: String, id: String, bundle: String, spec: String, engine: Engine? = nil) {
            self.runtime = runtime
            self.id = id
            self.bundle = bundle
            self.spec = spec
            self.engine = engine
        }

        public struct Engine: Codable, Sendable, Equatable {
            /// As the spec's io.container.manager annotation says ("libpod" for podman).
            public var name: String
            /// The container's name there, and the image its root filesystem was made from.
            public var containerName: String
            public var imageID: String
            public var imageName: String
            public init(name: String, containerName: String, imageID: String, imageName: String) {
                (self.name, self.containerName, self.imageID, self.imageName) = (name, containerName, imageID, imageName)
            }
        }
    }

    public init(id: String, createdAt: Date, tool: Tool, host: Host, criu: CRIUInfo, options: DumpOptions,
                processTree: ProcessTree, memory: Memory, timings: Timings, gpu: GPUSection, files: [FileEntry]) {
        self.id = id
        self.createdAt = createdAt
        self.tool = tool
        self.host = host
        self.criu = criu
        self.options = options
        self.processTree = processTree
        self.memory = memory
        self.timings = timings
        self.gpu = gpu
        self.files = files
    }

    /// Where the chunks are and how this checkpoint wrote them.
    /// The kinds of chunk store a manifest may name (`StoreInfo.kind`).
    public enum StoreKind: String, Codable, Sendable, CaseIterable {
        /// A directory of chunk files on this machine, at `StoreInfo.path`.
        case directory
    }

    public struct StoreInfo: Codable, Sendable, Equatable {
        /// What kind of store holds the chunks (a `StoreKind`'s name), written by every new dump. Absent from
        /// manifests written before stasis recorded it: those stores are all directories. Kept as text so that
        /// a kind this build does not know is refused by name (`storeKind()`), not as an undecodable manifest.
        /// No format bump: an older stasis ignores the key and reads `path`, which is all a directory store is.
        /// A store of another kind will need one (an older stasis would take its `path` for a directory).
        public var kind: String?
        /// The store the checkpoint was written to (restore looks there unless told otherwise): for a
        /// directory store, its directory. Still written beside `kind`, so older stasis builds read new manifests.
        public var path: String
        public var chunkSize: Int
        /// The codec new chunks were compressed with ("lz4", "zstd:3", "none").
        public var codec: String
        /// Bytes of the chunked files, and what this checkpoint added to the store (compressed).
        public var plainBytes: UInt64
        public var storedBytes: UInt64
        public var newChunks: Int
        public var reusedChunks: Int
        public var zeroChunks: Int
        public init(kind: StoreKind = .directory, path: String, chunkSize: Int, codec: String, plainBytes: UInt64, storedBytes: UInt64,
                    newChunks: Int, reusedChunks: Int, zeroChunks: Int) {
            self.kind = kind.rawValue
            self.path = path
            self.chunkSize = chunkSize
            self.codec = codec
            self.plainBytes = plainBytes
            self.storedBytes = storedBytes
            self.newChunks = newChunks
            self.reusedChunks = reusedChunks
            self.zeroChunks = zeroChunks
        }

        /// The kind of store this names: a directory when the manifest names none (written before kinds were).
        public func storeKind() throws -> StoreKind {
            guard let kind else { return .directory }
            guard let known = StoreKind(rawValue: kind) else {
                throw StasisError(.manifestVersion, "the checkpoint's chunks are in a store of kind \"\(kind)\", which this stasis does not know",
                                  hint: "use the stasis that wrote the checkpoint, or a newer one")
            }
            return known
        }
    }

    public struct Tool: Codable, Sendable, Equatable {
        public var name: String
        public var version: String
        public init(name: String, version: String) { self.name = name; self.version = version }
    }

    /// Facts about the machine that matter when restoring somewhere else.
    public struct Host: Codable, Sendable, Equatable {
        public var hostname: String
        public var kernel: String
        public var machine: String
        public var cpuModel: String
        /// Instruction-set flags from /proc/cpuinfo (only those user code can depend on; see HostFacts).
        public var cpuFlags: [String]
        public var pageSize: Int
        public init(hostname: String, kernel: String, machine: String, cpuModel: String, cpuFlags: [String], pageSize: Int) {
            self.hostname = hostname
            self.kernel = kernel
            self.machine = machine
            self.cpuModel = cpuModel
            self.cpuFlags = cpuFlags
            self.pageSize = pageSize
        }
    }

    public struct CRIUInfo: Codable, Sendable, Equatable {
        public var version: String
        public var logFile: String
        public init(version: String, logFile: String) { self.version = version; self.logFile = logFile }
    }

    /// Options the dump was taken with. Those CRIU needs again at restore (tcp, shell job) are replayed.
    public struct DumpOptions: Codable, Sendable, Equatable {
        public var leaveRunning: Bool
        public var tcpEstablished: Bool
        public var shellJob: Bool
        public init(leaveRunning: Bool, tcpEstablished: Bool, shellJob: Bool) {
            self.leaveRunning = leaveRunning
            self.tcpEstablished = tcpEstablished
            self.shellJob = shellJob
        }
    }

    public struct ProcessTree: Codable, Sendable, Equatable {
        public var rootPID: Int32
        public var processes: [Process]
        public init(rootPID: Int32, processes: [Process]) { self.rootPID = rootPID; self.processes = processes }
    }

    public struct Process: Codable, Sendable, Equatable {
        public var pid: Int32
        public var ppid: Int32
        public var command: String
        public var arguments: [String]
        public var threads: Int
        public var residentBytes: UInt64
        /// Its PID inside its own PID namespace (a container's), where that differs from `pid`: how the
        /// processes of a container restored by its runtime, which get new PIDs here, are matched to these.
        public var namespacePID: Int32?
        /// The TCP addresses it listens on ("127.0.0.1:8080", "[::]:80"): a restore in the same network
        /// namespace clears TIME_WAIT sockets off them first, so that CRIU can bind them again.
        public var listeners: [String]?
        public init(pid: Int32, ppid: Int32, command: String, arguments: [String], threads: Int, residentBytes: UInt64) {
            self.pid = pid
            self.ppid = ppid
            self.command = command
            self.arguments = arguments
            self.threads = threads
            self.residentBytes = residentBytes
        }
    }

    public struct Memory: Codable, Sendable, Equatable {
        /// Sum of VmRSS over the tree just before the dump.
        public var residentBytes: UInt64
        /// Pages CRIU wrote (from its dump statistics) times the page size.
        public var dumpedBytes: UInt64
        /// Total size of the checkpoint's files.
        public var imageBytes: UInt64
        public init(residentBytes: UInt64, dumpedBytes: UInt64, imageBytes: UInt64) {
            self.residentBytes = residentBytes
            self.dumpedBytes = dumpedBytes
            self.imageBytes = imageBytes
        }
    }

    /// Seconds per phase. freeze/memoryDump/memoryWrite come from CRIU's own statistics.
    public struct Timings: Codable, Sendable, Equatable {
        public var freeze: Double
        public var frozen: Double
        public var memoryDump: Double
        public var memoryWrite: Double
        public var criu: Double
        public var devices: Double
        /// Finishing the chunking of the memory images after CRIU wrote them (most is done while it writes),
        /// and hashing the small images.
        public var hash: Double
        /// fsync of every image before the checkpoint counts as taken (with --leave-running into a disk store,
        /// also copying the device memory staged in memory into the store).
        public var sync: Double
        public var total: Double
        /// With --leave-running: how long the job was held (its CUDA calls from the agents' hold or the
        /// driver's lock, then CRIU's freeze) until it ran again. The checkpoint is made durable and published
        /// after that, within `total`.
        public var stalled: Double?
        public init(freeze: Double = 0, frozen: Double = 0, memoryDump: Double = 0, memoryWrite: Double = 0,
                    criu: Double = 0, devices: Double = 0, hash: Double = 0, sync: Double = 0, total: Double = 0) {
            self.freeze = freeze
            self.frozen = frozen
            self.memoryDump = memoryDump
            self.memoryWrite = memoryWrite
            self.criu = criu
            self.devices = devices
            self.hash = hash
            self.sync = sync
            self.total = total
        }
    }

    /// Device state: the GPUs the tree used and, per CUDA process, which of them and how much memory.
    /// Empty (no devices, no processes) for a tree that uses no GPU.
    public struct GPUSection: Codable, Sendable, Equatable {
        /// The driver API version, "13.0".
        public var driverVersion: String?
        public var devices: [GPUDevice]
        public var processes: [GPUProcess]
        /// Seconds the driver took to lock every CUDA process (their work drained) and then to checkpoint
        /// them (device memory into host memory); together they are `Timings.devices` of the dump.
        public var lockSeconds: Double?
        public var checkpointSeconds: Double?
        public init(driverVersion: String? = nil, devices: [GPUDevice] = [], processes: [GPUProcess] = [],
                    lockSeconds: Double? = nil, checkpointSeconds: Double? = nil) {
            self.driverVersion = driverVersion
            self.devices = devices
            self.processes = processes
            self.lockSeconds = lockSeconds
            self.checkpointSeconds = checkpointSeconds
        }
    }

    public struct GPUDevice: Codable, Sendable, Equatable {
        public var index: Int
        public var uuid: String
        public var name: String
        public var memoryBytes: UInt64
        public init(index: Int, uuid: String, name: String, memoryBytes: UInt64) {
            self.index = index
            self.uuid = uuid
            self.name = name
            self.memoryBytes = memoryBytes
        }
    }

    public struct GPUProcess: Codable, Sendable, Equatable {
        public var pid: Int32
        /// UUIDs of the GPUs the process had memory on.
        public var devices: [String]
        public var deviceMemoryBytes: UInt64
        /// Set when the process ran under `stasis run`: what its agent moved itself.
        public var agent: AgentMemory?
        public init(pid: Int32, devices: [String], deviceMemoryBytes: UInt64, agent: AgentMemory? = nil) {
            self.pid = pid
            self.devices = devices
            self.deviceMemoryBytes = deviceMemoryBytes
            self.agent = agent
        }
    }

    /// Device memory a process's agent copied out through its staging ring before the driver checkpoint; its
    /// contents are chunked files of the checkpoint (`file`, under gpu/), which the agent refills after restore.
    public struct AgentMemory: Codable, Sendable, Equatable {
        public var allocations: [AgentAllocation]
        public var evacuatedBytes: UInt64
        /// Device memory the driver carried (the process's device memory less the evacuated bytes): contexts,
        /// modules, small allocations and pools.
        public var driverPathBytes: UInt64
        public var ringBytes: UInt64
        /// Holding CUDA calls and synchronising; copying out (and chunking); giving back the physical memory.
        public var quiesceSeconds: Double
        public var evacuateSeconds: Double
        public var releaseSeconds: Double
        /// Bytes of new chunk files the evacuation wrote (compressed), and the evacuated bytes that were zero.
        public var storedBytes: UInt64?
        public var zeroBytes: UInt64?
        /// CPU seconds stasis spent on the evacuation (reading the ring, hashing, compressing, writing).
        public var evacuateCPUSeconds: Double?
        /// The GPU hashed the chunks (the agent's digest kernel); nil or false: stasis hashed them on its CPUs.
        public var hashedOnGPU: Bool?
        /// stasis mapped the agent's ring and stored each chunk from its slot (one CPU copy); nil or false:
        /// it copied each slot out first (process_vm_readv).
        public var ringMapped: Bool?
        /// Chunks stasis took from the agent's arena pieces (`stasis run --arena`): copied by DMA, never by a CPU.
        public var arenaChunks: Int?
        /// Device memory this process maps but another process of the tree owns (moved once, by its owner):
        /// at restore the owner exports it again and this process imports it where it was.
        public var imports: [AgentImport]?
        public init(allocations: [AgentAllocation], evacuatedBytes: UInt64, driverPathBytes: UInt64, ringBytes: UInt64,
                    quiesceSeconds: Double, evacuateSeconds: Double, releaseSeconds: Double) {
            self.allocations = allocations
            self.evacuatedBytes = evacuatedBytes
            self.driverPathBytes = driverPathBytes
            self.ringBytes = ringBytes
            self.quiesceSeconds = quiesceSeconds
            self.evacuateSeconds = evacuateSeconds
            self.releaseSeconds = releaseSeconds
        }
    }

    /// An allocation a process imported from another process of the tree (cuMemImportFromShareableHandle).
    public struct AgentImport: Codable, Sendable, Equatable {
        /// The importer's agent handle for it.
        public var id: UInt64
        /// The process that owns it, and that process's handle for it (one of its `allocations`).
        public var ownerPID: Int32
        public var ownerID: UInt64
        public init(id: UInt64, ownerPID: Int32, ownerID: UInt64) {
            self.id = id
            self.ownerPID = ownerPID
            self.ownerID = ownerID
        }
    }

    public struct AgentAllocation: Codable, Sendable, Equatable {
        /// The agent's handle for it (the value the program holds for a VMM allocation).
        public var id: UInt64
        public var bytes: UInt64
        /// The CUDA device ordinal, as the process saw it.
        public var device: Int32
        public var file: String
        public init(id: UInt64, bytes: UInt64, device: Int32, file: String) {
            self.id = id
            self.bytes = bytes
            self.device = device
            self.file = file
        }
    }

    /// One file of the checkpoint. `sha256` is the plain SHA-256 of a file up to 64 MiB; for a longer file
    /// it is the SHA-256 of its 64 MiB segments' digests, which `segments` lists (see docs/FORMAT.md).
    public struct FileEntry: Codable, Sendable, Equatable {
        public var path: String
        public var size: UInt64
        /// A whole file: its SHA-256 (see `segments`). A chunked file: the SHA-256 of its chunks' digests.
        public var sha256: String
        public var segments: [String]?
        /// A chunked file: the SHA-256 of each chunk in order, "" for a chunk of zeros (not stored). The file
        /// is not in the checkpoint directory.
        public var chunks: [String]?
        /// Content-defined chunks: each chunk's length in bytes, in order. Absent: every chunk but the last is
        /// `store.chunkSize` long.
        public var chunkLengths: [Int]?
        public init(path: String, size: UInt64, sha256: String, segments: [String]? = nil, chunks: [String]? = nil, chunkLengths: [Int]? = nil) {
            self.path = path
            self.size = size
            self.sha256 = sha256
            self.segments = segments
            self.chunks = chunks
            self.chunkLengths = chunkLengths
        }
    }
}

extension Manifest {
    public static func encoder() -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        return encoder
    }

    public static func decoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }

    /// Parses a manifest, telling apart "not JSON" (truncated, corrupt), "not ours", and "too new" before
    /// trying the full schema, so each gets its own clear error; then checks its shape (`validate`).
    public static func decode(_ data: Data, path: String) throws -> Manifest {
        struct Header: Decodable { var format: String?; var formatVersion: Int? }
        let header: Header
        do {
            header = try decoder().decode(Header.self, from: data)
        } catch {
            throw StasisError(.manifestInvalid, "\(path) is not valid JSON (truncated or corrupt)",
                              hint: "the checkpoint is damaged; take a new one or restore from a copy")
        }
        guard header.format == formatName, let version = header.formatVersion else {
            throw StasisError(.notACheckpoint, "\(path) is not a stasis checkpoint manifest (format \(header.format.map { "'\($0)'" } ?? "missing"))")
        }
        guard version <= currentVersion else {
            throw StasisError(.manifestVersion,
                              "\(path) has format version \(version); this stasis reads versions up to \(currentVersion)",
                              hint: "use a newer stasis to read this checkpoint")
        }
        guard version >= 1 else {
            throw StasisError(.manifestInvalid, "\(path) has an invalid format version \(version)")
        }
        let manifest: Manifest
        do {
            manifest = try decoder().decode(Manifest.self, from: data)
        } catch let DecodingError.keyNotFound(key, context) {
            throw StasisError(.manifestInvalid, "\(path) lacks the field '\((context.codingPath + [key]).map(\.stringValue).joined(separator: "."))'")
        } catch let DecodingError.typeMismatch(_, context) {
            throw StasisError(.manifestInvalid, "\(path) has a field of the wrong type at '\(context.codingPath.map(\.stringValue).joined(separator: "."))'")
        } catch {
            throw StasisError(.manifestInvalid, "\(path) does not match the manifest schema: \(error)")
        }
        try manifest.validate(name: path)
        return manifest
    }
}
