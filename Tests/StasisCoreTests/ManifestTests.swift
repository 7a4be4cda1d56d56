import Foundation
import StasisCore
import StasisImage
import Testing

@Suite struct ManifestDecoding {
    func sample() -> Manifest { Self.sample() }

    /// The manifest of a one-process checkpoint with one small file.
    static func sample() -> Manifest {
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

    /// Shared device memory: an import names its owner's allocation, which the checkpoint must hold.
    @Test func anImportMustNameAnAllocationTheCheckpointHolds() throws {
        func sharing(ownerID: UInt64) -> (inout Manifest) -> Void {
            { manifest in
                let owned = Manifest.AgentAllocation(id: 7, bytes: 2 << 20, device: 0, file: "gpu/42/7")
                let owner = Manifest.AgentMemory(allocations: [owned], evacuatedBytes: 2 << 20, driverPathBytes: 0, ringBytes: 0,
                                                 quiesceSeconds: 0, evacuateSeconds: 0, releaseSeconds: 0)
                var importer = Manifest.AgentMemory(allocations: [], evacuatedBytes: 0, driverPathBytes: 0, ringBytes: 0,
                                                    quiesceSeconds: 0, evacuateSeconds: 0, releaseSeconds: 0)
                importer.imports = [.init(id: 9, ownerPID: 42, ownerID: ownerID)]
                manifest.processTree = .init(rootPID: 42, processes: [.init(pid: 42, ppid: 1, command: "a", arguments: [], threads: 1, residentBytes: 0),
                                                                      .init(pid: 43, ppid: 42, command: "b", arguments: [], threads: 1, residentBytes: 0)])
                manifest.gpu = .init(processes: [.init(pid: 42, devices: [], deviceMemoryBytes: 0, agent: owner),
                                                 .init(pid: 43, devices: [], deviceMemoryBytes: 0, agent: importer)])
                manifest.store = .init(path: "/s", chunkSize: 2 << 20, codec: "lz4", plainBytes: 0, storedBytes: 0, newChunks: 0, reusedChunks: 0, zeroChunks: 0)
                manifest.files = [.init(path: "gpu/42/7", size: 2 << 20, sha256: Self.digest("d"), chunks: [""])]
            }
        }
        #expect(try problem(sharing(ownerID: 7)) == nil)
        #expect(try problem(sharing(ownerID: 8))?.contains("PID 43 imports allocation 8 of PID 42") == true)
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

@Suite struct Formatting {
    @Test func formatsBytes() {
        #expect(Format.bytes(512) == "512 B")
        #expect(Format.bytes(3 << 30) == "3.00 GiB")
    }
}
