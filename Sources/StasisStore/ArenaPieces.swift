import Foundation
import StasisCore
import StasisOS

/// The pieces of an agent's arena (`stasis run --arena`, issue 29): chunk files that an agent maps, pins and
/// copies device memory into by DMA, in the reserve directory of a store in memory. Each piece holds a chunk's
/// plain bytes after room for its header. At an evacuation into that store, stasis takes each piece the store
/// needs as a chunk file (writes the header, cuts it to length, renames it into the batch): the bytes were
/// never copied by a CPU. The agent gives the pieces nobody took back to the reserve as blanks when it drops
/// the arena (before the driver's checkpoint and CRIU); gc gives back those of an arena whose program died.
///
///     STORE/reserve/arena-ID.lock   flocked by the agent while the arena is mapped
///     STORE/reserve/arena-ID-K      piece K
public enum ArenaPieces {
    /// Whether `name` can be a piece's file name as an agent sends it (no path, nothing else in the directory).
    public static func isPieceName(_ name: String) -> Bool {
        let parts = name.split(separator: "-", omittingEmptySubsequences: false)
        return parts.count == 3 && parts[0] == "arena" && parts[1].count == 16 && parts[1].allSatisfy(\.isHexDigit)
            && !parts[2].isEmpty && parts[2].count <= 9 && parts[2].allSatisfy(\.isASCII) && parts[2].allSatisfy(\.isNumber)
    }

    /// The arena a piece or lock file belongs to ("ID"), nil for any other name.
    static func arenaID(of name: String) -> Substring? {
        guard name.hasPrefix("arena-") else { return nil }
        let rest = name.dropFirst(6)
        let id = rest.prefix(16)
        guard id.count == 16, id.allSatisfy(\.isHexDigit) else { return nil }
        let after = rest.dropFirst(16)
        guard after == ".lock" || (after.first == "-" && isPieceName(name)) else { return nil }
        return id
    }
}

extension ChunkReserve {
    /// Pieces of arenas whose program is gone (nobody holds their lock, or it is missing): renamed to blanks.
    /// An arena whose lock is held is in use and left alone. Returns how many pieces were given back.
    func reclaimDeadArenas() -> Int {
        // A reserve that cannot be listed has no arena to reclaim now; a later gc tries again.
        guard let names = try? FileSystem.namesOrNone(in: directory) else { return 0 }
        var byArena: [Substring: [String]] = [:]
        for name in names { if let id = ArenaPieces.arenaID(of: name) { byArena[id, default: []].append(name) } }
        var reclaimed = 0
        for (id, files) in byArena {
            let lock = directory + "/arena-\(id).lock"
            guard !FileSystem.isFlockHeld(lock) else { continue }
            for name in files where name != "arena-\(id).lock" {
                // A piece that cannot be renamed is removed instead: gc leaves no piece of a dead arena.
                if (try? FileSystem.rename(directory + "/" + name, to: directory + "/" + Self.prefix + "\(id)-" + name.split(separator: "-").last!)) != nil {
                    reclaimed += 1
                } else {
                    FileSystem.remove(directory + "/" + name)
                }
            }
            FileSystem.remove(lock)
        }
        return reclaimed
    }
}

extension DirectoryChunkStore {
    /// The directory where agents' arenas for this store live (they must be on its filesystem).
    public var arenaDirectory: String { reserve.directory }

    /// Takes arena piece `name` as the file of chunk `digest` (`length` plain bytes, claimed by the caller):
    /// moves it into tmp/ under a writer's name, writes its header, cuts it to length. The bytes are the
    /// agent's DMA; their digest the GPU's (the same trust as any chunk hashed on the GPU).
    func adoptPiece(_ name: String, length: Int, digest: String, batch: Batch) throws -> ChunkPutResult {
        guard ArenaPieces.isPieceName(name), length > 0, length <= ChunkFormat.chunkSize else {
            throw StasisError(.gpu, "an agent named \"\(name)\" (\(length) bytes) as a piece of its arena, which no piece is called")
        }
        let temporary = "\(path)/tmp/\(digest).\(ThisProcess.pid).\(UInt32.random(in: 0...UInt32.max))"
        do {
            try FileSystem.rename(reserve.directory + "/" + name, to: temporary)
        } catch {
            throw StasisError(.gpu, "cannot take arena piece \(name) from \(reserve.directory) into the store: \(error)")
        }
        let total = ChunkFormat.headerSize + length
        do throws(Errno) {
            // Never through a link: a piece is a file the agent made in the store's own directory.
            let fd = try FileDescriptor.open(temporary, .writeOnly, options: .noFollow)
            defer { fd.closeQuietly() }
            let status = try fd.status()
            guard status.kind == .regular, status.size >= UInt64(total) else { throw Errno.invalidArgument }
            let header = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkFormat.headerSize, alignment: 8)
            defer { header.deallocate() }
            ChunkFormat.writeHeader(into: header, tag: 0, plainLength: length)
            try fd.write(all: UnsafeRawBufferPointer(header), at: 0)
            if status.size > UInt64(total) { try fd.setSize(UInt64(total)) }
        } catch {
            FileSystem.remove(temporary)
            throw StasisError(.gpu, "arena piece \(name) cannot be a chunk file (\(error)): it is not a regular file of \(total) bytes or more")
        }
        batch.written(digest, at: temporary)
        return ChunkPutResult(isNew: true, storedBytes: UInt64(total))
    }
}
