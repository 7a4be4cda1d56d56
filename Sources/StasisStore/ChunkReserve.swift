import Foundation
import StasisCore
import StasisOS

/// A store in memory's reserve of pages ready to be written: blank chunk files in STORE/reserve/, each as large
/// as the largest chunk file. A chunk written into a blank costs one copy; written into a new file, the kernel
/// first allocates every page (and, where it clears pages on allocation, clears it). On the H100 (issue 29)
/// that made little difference: a 2 MiB chunk written into reused pages ran at 4.2 GB/s on one core against
/// 3.2 into fresh ones, and at 16 threads no faster (docs/BENCHMARKS.md); the copy itself is the cost there. `stasis reserve SIZE` fills it once; gc then gives it back the chunk files it removes, up to SIZE,
/// so a node that checkpoints again and again writes into the same pages. Only for stores in memory (tmpfs):
/// on a disk the page cache reuses its pages anyway. The reserve holds its bytes of memory: that is the deal.
///
///     STORE/reserve/target         the bytes asked for (decimal)
///     STORE/reserve/blank-RANDOM   a blank (its bytes are whatever it held: it is always written whole or cut)
// Sendable: its names are reached only under their lock; the files are the filesystem's.
public final class ChunkReserve: Sendable {
    /// A blank's size: a chunk file of one whole chunk stored as it is (header and payload).
    public static let blankSize = ChunkFormat.headerSize + ChunkFormat.chunkSize
    static let prefix = "blank-"

    public let directory: String
    /// The blanks not yet taken by this process, and the directory's change time when they were listed: listed
    /// again only once they are used up and the directory has changed since (gc or `stasis reserve` added some).
    private let names = Locked<(list: [String], changed: timespec?)>(([], nil))

    init(storePath: String) { directory = storePath + "/reserve" }

    /// Sizes count chunks' worth (a blank holds one chunk; it takes a page more, for the header).
    public struct Status: Codable, Sendable, Equatable {
        public var targetBytes: UInt64
        public var blanks: Int
        public var bytes: UInt64
    }

    /// The bytes asked for, 0 when none.
    public var targetBytes: UInt64 {
        // No target file (or one that cannot be read): no reserve asked for.
        guard let data = try? FileSystem.readFileIfPresent(directory + "/target"),
              let text = String(data: data, encoding: .utf8) else { return 0 }
        return UInt64(text.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
    }

    public func status() throws -> Status {
        let blanks = try FileSystem.namesOrNone(in: directory).filter { $0.hasPrefix(Self.prefix) }
        return Status(targetBytes: targetBytes, blanks: blanks.count, bytes: UInt64(blanks.count) * UInt64(ChunkFormat.chunkSize))
    }

    /// Renames a blank to `destination` (in the same filesystem), ready to be written into; false
    /// when none is left. Another writer may take a listed blank first: its rename fails and the next is tried.
    func take(as destination: String) -> Bool {
        while let name = next() {
            // Taken by another writer (or gone): the next one.
            if (try? FileSystem.rename(directory + "/" + name, to: destination)) != nil { return true }
        }
        return false
    }

    private func next() -> String? {
        if let name = names.withLock({ $0.list.popLast() }) { return name }
        // Out of listed blanks: listed again only when the directory changed since. Without a reserve that is one
        // stat a chunk, outside the lock the writers share.
        guard let changed = FileSystem.changeTime(directory) else { return nil }
        return names.withLock { names in
            if names.list.isEmpty, names.changed.map({ $0.tv_sec != changed.tv_sec || $0.tv_nsec != changed.tv_nsec }) ?? true {
                // A reserve that cannot be listed has no blank to give: chunks go into new files, as without one.
                names = (((try? FileSystem.namesOrNone(in: directory)) ?? []).filter { $0.hasPrefix(Self.prefix) }, changed)
            }
            return names.list.popLast()
        }
    }

    /// Sets the reserve to `bytes` of chunks (rounded down to whole blanks): writes the blanks missing (on `threads`
    /// threads) or removes those over. Returns the status after.
    public func resize(to bytes: UInt64, threads: Int) throws -> Status {
        try FileSystem.makePrivateDirectory(directory)
        try FileSystem.writeAtomically(Data("\(bytes)\n".utf8), to: directory + "/target")
        let wanted = Int(bytes / UInt64(ChunkFormat.chunkSize))
        let present = try FileSystem.namesOrNone(in: directory).filter { $0.hasPrefix(Self.prefix) }
        if present.count > wanted {
            for name in present[wanted...] { FileSystem.remove(directory + "/" + name) }
        } else if present.count < wanted {
            let missing = wanted - present.count, next = Locked(0), directory = self.directory
            try WorkerGroup.run(max(1, min(threads, missing)), name: "stasis-reserve") { _, failure in
                let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.blankSize, alignment: 4096)
                zeros.initializeMemory(as: UInt8.self, repeating: 0)
                defer { zeros.deallocate() }
                while failure.error == nil, next.takeNext(below: missing) != nil {
                    try Self.writeBlank(UnsafeRawBufferPointer(zeros), into: directory)
                }
            }
        }
        return try status()
    }

    /// Written (not fallocated): a fallocated tmpfs page is cleared when it is first used, which is the cost a
    /// blank is there to spare.
    private static func writeBlank(_ zeros: UnsafeRawBufferPointer, into directory: String) throws {
        let path = directory + "/" + prefix + UUID().uuidString.lowercased()
        let temporary = path + ".part"
        do {
            let fd = try FileDescriptor.open(temporary, .writeOnly, options: [.create, .exclusiveCreate], permissions: .ownerReadWrite)
            defer { fd.closeQuietly() }
            try fd.write(all: zeros)
        } catch {
            FileSystem.remove(temporary)
            throw DirectoryChunkStore.writeError("cannot write", temporary, error)
        }
        try FileSystem.rename(temporary, to: path)
    }

    /// Gives a chunk file gc removes to the reserve when it is below its target: true when it took it (the
    /// caller then must not remove it). Its size is made a blank's (a compressed chunk is extended: written,
    /// so that its pages are there when it is used).
    func recycle(_ file: String, target: UInt64, held: inout UInt64) -> Bool {
        guard held + UInt64(ChunkFormat.chunkSize) <= target else { return false }
        let path = directory + "/" + Self.prefix + UUID().uuidString.lowercased()
        // A file that cannot be moved is removed by the caller instead, as without a reserve.
        guard (try? FileSystem.rename(file, to: path)) != nil else { return false }
        do {
            let fd = try FileDescriptor.open(path, .writeOnly, options: .noFollow)
            defer { fd.closeQuietly() }
            // A chunk gc takes may be marked checked (read-only): a blank is written again.
            try fd.setPermissions(.ownerReadWrite)
            let size = try fd.status().size
            if size < UInt64(Self.blankSize) {
                let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.blankSize - Int(size), alignment: 16)
                defer { zeros.deallocate() }
                zeros.initializeMemory(as: UInt8.self, repeating: 0)
                try fd.write(all: UnsafeRawBufferPointer(zeros), at: Int64(size))
            } else if size > UInt64(Self.blankSize) {
                try fd.setSize(UInt64(Self.blankSize))
            }
        } catch {
            FileSystem.remove(path)
            return false
        }
        held += UInt64(ChunkFormat.chunkSize)
        return true
    }
}

extension DirectoryChunkStore {
    /// Writes `parts` into a blank of the reserve renamed to `temporary` (pwrite into its pages) and cuts it to
    /// their length; false when the reserve has no blank, or the one taken cannot be used (it is removed, and
    /// the caller writes a new file, which reports its own errors). Not through a mapping: on the H100 the
    /// mmap and munmap of every chunk serialised 16 writers on the process's address space (7 GB/s on 2 cores
    /// against 22-28 GB/s with pwrite, docs/BENCHMARKS.md, issue 29).
    func writeIntoBlank(_ parts: [UnsafeRawBufferPointer], total: Int, at temporary: String) -> Bool {
        guard total <= ChunkReserve.blankSize, reserve.take(as: temporary) else { return false }
        do throws(Errno) {
            // Never through a link: a blank is a file of the store's own.
            let fd = try FileDescriptor.open(temporary, .writeOnly, options: .noFollow)
            defer { fd.closeQuietly() }
            var offset: Int64 = 0
            for part in parts where part.count > 0 {
                try fd.write(all: part, at: offset)
                offset += Int64(part.count)
            }
            if try fd.status().size > UInt64(total) { try fd.setSize(UInt64(total)) }
            fd.startWriteback(offset: 0, length: UInt64(total))
            return true
        } catch {
            FileSystem.remove(temporary)
            return false
        }
    }
}
