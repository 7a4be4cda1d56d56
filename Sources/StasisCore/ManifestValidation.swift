/// The one check of a manifest's shape, run wherever a manifest is read (`Manifest.decode`): a checkpoint
/// directory, a bundle, a migration's offer, the store's catalog. A manifest can come from another machine or
/// be edited by hand, so nothing in it is trusted that could make stasis write outside its directories, signal
/// a process it did not restore, or trap on arithmetic: names are plain relative paths, PIDs are real PIDs,
/// and every number is in the range the code that uses it assumes.
///
/// What needs the chunk store or a hash (that a chunk list matches its file's SHA-256) is checked beside it,
/// by `ChunkedFiles.problem`, before any chunk is read.
extension Manifest {
    /// Chunk sizes a store may use: a multiple of 4 KiB from 4 KiB to 64 MiB.
    public static let chunkSizes = 4096...(64 << 20)
    /// The largest file a checkpoint may list (1 PiB): far beyond any process, small enough that no size
    /// arithmetic on it overflows.
    public static let maxFileBytes: UInt64 = 1 << 50
    /// Linux's PID_MAX_LIMIT: no PID is larger.
    public static let maxPID: Int32 = 1 << 22
    /// A checkpoint id: a plain file name (it names the catalog entry STORE/checkpoints/ID.json).
    static let idCharacters = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    /// Whole files are hashed in segments of this size (SegmentedDigest.segmentSize).
    static let segmentBytes: UInt64 = 64 << 20

    /// Throws `code` naming `name` and the first problem found.
    public func validate(name: String, code: StasisError.Code = .manifestInvalid) throws {
        if let problem = problem() {
            throw StasisError(code, "\(name): \(problem)", hint: "the manifest is damaged or was edited; restore from another copy")
        }
    }

    /// The first thing wrong with this manifest, or nil.
    public func problem() -> String? {
        guard (1...128).contains(id.count), !id.hasPrefix("."), id.allSatisfy(Self.idCharacters.contains) else {
            return "the checkpoint id '\(id.prefix(80))' is not a plain name"
        }
        guard host.pageSize >= 4096, host.pageSize <= 1 << 30, host.pageSize & (host.pageSize - 1) == 0 else {
            return "the page size \(host.pageSize) is not a power of two from 4 KiB to 1 GiB"
        }
        if let store {
            guard Self.chunkSizes.contains(store.chunkSize), store.chunkSize % 4096 == 0 else {
                return "chunk size \(store.chunkSize) is not a multiple of 4 KiB from 4 KiB to 64 MiB"
            }
        }
        if let problem = processTreeProblem() ?? filesProblem() ?? gpuProblem() { return problem }
        if let container {
            guard Self.isPlainRelativePath(container.spec), files.contains(where: { $0.path == container.spec && $0.chunks == nil }) else {
                return "the container's spec '\(container.spec.prefix(80))' is not one of the checkpoint's whole files"
            }
            guard !container.id.isEmpty, container.id.count <= 1024, !container.id.contains("/"), !container.id.contains("\0") else {
                return "the container id '\(container.id.prefix(80))' is not a plain name"
            }
        }
        return nil
    }

    /// PIDs are what a restore waits for, checks and, after a failure, may signal: each must be a real PID.
    private func processTreeProblem() -> String? {
        var seen = Set<Int32>()
        for process in processTree.processes {
            guard (1...Self.maxPID).contains(process.pid) else { return "process PID \(process.pid) is not a PID" }
            guard seen.insert(process.pid).inserted else { return "process PID \(process.pid) appears twice" }
            guard (0...Self.maxPID).contains(process.ppid) else { return "the parent PID \(process.ppid) of PID \(process.pid) is not a PID" }
            guard process.threads >= 0 else { return "PID \(process.pid) has \(process.threads) threads" }
            if let inner = process.namespacePID, !(1...Self.maxPID).contains(inner) {
                return "the namespace PID \(inner) of PID \(process.pid) is not a PID"
            }
        }
        if processTree.processes.isEmpty {
            // A container's checkpoint read from an engine's archive: its runtime knows the processes.
            guard processTree.rootPID == 0, container != nil else { return "the process tree is empty" }
        } else if !seen.contains(processTree.rootPID) {
            return "the root PID \(processTree.rootPID) is not one of the checkpoint's processes"
        }
        return nil
    }

    private func filesProblem() -> String? {
        var paths = Set<String>()
        for entry in files {
            guard Self.isPlainRelativePath(entry.path), entry.path != Manifest.fileName, paths.insert(entry.path).inserted else {
                return "the file name '\(entry.path.prefix(200))' is not a plain relative path, or appears twice"
            }
            guard entry.size <= Self.maxFileBytes else { return "\(entry.path) claims \(entry.size) bytes" }
            guard Self.isDigest(entry.sha256) else { return "the SHA-256 of \(entry.path) is not 64 hex digits" }
            if let segments = entry.segments {
                let expected = (entry.size + Self.segmentBytes - 1) / Self.segmentBytes
                guard UInt64(segments.count) == expected, segments.allSatisfy(Self.isDigest) else {
                    return "the segment digests of \(entry.path) do not fit its \(entry.size) bytes"
                }
            }
            if let chunks = entry.chunks {
                guard let store else { return "\(entry.path) has chunks but the manifest names no store" }
                if let lengths = entry.chunkLengths {
                    guard lengths.count == chunks.count, lengths.allSatisfy({ (1...store.chunkSize).contains($0) }),
                          lengths.reduce(UInt64(0), { $0 + UInt64($1) }) == entry.size else {
                        return "the chunk lengths of \(entry.path) do not fit its \(chunks.count) chunks and \(entry.size) bytes"
                    }
                } else {
                    let size = UInt64(store.chunkSize)
                    guard UInt64(chunks.count) == (entry.size + size - 1) / size else {
                        return "the manifest lists \(chunks.count) chunks for the \(entry.size) bytes of \(entry.path)"
                    }
                }
                guard chunks.allSatisfy({ $0.isEmpty || Self.isDigest($0) }) else { return "a chunk of \(entry.path) is not named by a SHA-256" }
            } else if entry.chunkLengths != nil {
                return "\(entry.path) has chunk lengths but no chunks"
            }
        }
        return nil
    }

    private func gpuProblem() -> String? {
        let pids = Set(processTree.processes.map(\.pid))
        var seen = Set<Int32>()
        for process in gpu.processes {
            guard pids.contains(process.pid), seen.insert(process.pid).inserted else {
                return "the GPU process \(process.pid) is not one of the checkpoint's processes, or appears twice"
            }
            guard let agent = process.agent else { continue }
            for allocation in agent.allocations {
                // The agents refill device memory in fixed chunks, the ones the GPU hashed.
                guard let file = files.first(where: { $0.path == allocation.file }), file.chunks != nil, file.chunkLengths == nil,
                      file.size == allocation.bytes else {
                    return "allocation \(allocation.id) of PID \(process.pid) names no file of \(allocation.bytes) bytes in fixed chunks"
                }
                guard allocation.device >= 0 else { return "allocation \(allocation.id) of PID \(process.pid) is on device \(allocation.device)" }
            }
            for shared in agent.imports ?? [] {
                let owner = gpu.processes.first { $0.pid == shared.ownerPID && $0.pid != process.pid }
                guard owner?.agent?.allocations.contains(where: { $0.id == shared.ownerID }) == true else {
                    return "PID \(process.pid) imports allocation \(shared.ownerID) of PID \(shared.ownerPID), which the checkpoint does not hold"
                }
            }
        }
        for device in gpu.devices where device.index < 0 || device.index > 4096 {
            return "GPU index \(device.index) is not a device index"
        }
        return nil
    }

    /// A relative path of plain components: no "/" at either end, no "." or "..", no empty part, no NUL.
    public static func isPlainRelativePath(_ path: String) -> Bool {
        guard !path.isEmpty, path.utf8.count <= 4096, !path.contains("\0") else { return false }
        return path.split(separator: "/", omittingEmptySubsequences: false).allSatisfy { !$0.isEmpty && $0 != "." && $0 != ".." }
    }

    /// 64 lowercase hex digits.
    public static func isDigest(_ text: String) -> Bool {
        text.utf8.count == 64 && text.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }
}
