import Foundation
import StasisCore
import StasisOS
import StasisStore

/// Where a --leave-running dump puts its agents' device memory first when the store is on a disk: a chunk
/// store of its own in memory (/dev/shm), so that the job waits for the copy into RAM and not for the disk.
/// Once the job runs again the chunks are copied into the real store and made durable there, and the stage
/// goes (`AgentEvacuation.settle`). A stage that holds a rescue entry (the memory could not be put back, or
/// stasis died in between) stays until `stasis resume` has used it; any other stage of a stasis that is gone
/// is removed by the next dump.
public enum MemoryStage {
    static let root = "/dev/shm"
    static let prefix = "stasis-stage-"
    /// Memory left to everything else once a stage is full: the refill, CRIU and the job itself need some.
    static let headroom: UInt64 = 4 << 30

    /// A fresh stage for `bytes` of device memory beside `store`, or nil when it would not help (`store` is
    /// in memory already) or memory cannot take it: then the device memory goes straight into `store`.
    static func make(bytes: UInt64, beside store: ChunkStore) -> ChunkStore? {
        guard bytes > 0, !FileSystem.isInMemory(store.path), FileSystem.isInMemory(root),
              let available = HostFacts.availableMemoryBytes(), let room = FileSystem.availableBytes(at: root),
              min(available, room) > bytes + bytes / 8 + headroom else { return nil }
        removeStale()
        let path = "\(root)/\(prefix)\(ThisProcess.pid)-\(UUID().uuidString.prefix(8).lowercased())"
        // A stage is only a speed-up: one that cannot be made sends the memory straight into `store`.
        return try? DirectoryChunkStore(path: path, create: true)
    }

    /// Every stage on this machine: directories of this user's (ChunkStore refuses others'), never a link
    /// someone else left in the world-writable /dev/shm to lead stasis elsewhere.
    public static func all() -> [ChunkStore] {
        // Best effort: a /dev/shm that cannot be read holds no stage this stasis could use.
        let names = (try? FileSystem.namesOrNone(in: root)) ?? []
        return names.filter { $0.hasPrefix(prefix) }.sorted().compactMap { name in
            let path = "\(root)/\(name)"
            // Not followed: a link is no stage, and neither is what cannot be examined.
            guard (try? FileSystem.status(path, followingLinks: false))??.kind == .directory else { return nil }
            // A directory the store refuses (another user's) is no stage of ours.
            return try? DirectoryChunkStore(path: path, create: false)
        }
    }

    /// Whether `store` is a stage (and not a store of the user's).
    public static func isStage(_ store: ChunkStore) -> Bool {
        (store.path as NSString).deletingLastPathComponent == root && (store.path as NSString).lastPathComponent.hasPrefix(prefix)
    }

    /// Removes `stage` unless it holds a rescue entry.
    public static func removeUnlessRescuing(_ stage: ChunkStore) {
        guard isStage(stage), !holdsRescue(stage) else { return }
        FileSystem.removeTree(stage.path)
    }

    static func holdsRescue(_ stage: ChunkStore) -> Bool {
        // A catalog that cannot be read holds no rescue entry `stasis resume` could use.
        ((try? StoreCatalog(store: stage).entries()) ?? []).contains { $0.manifest.id.hasPrefix(AgentEvacuation.rescuePrefix) }
    }

    /// Stages of a stasis no longer running that hold no rescue entry (a stasis killed after the job ran again).
    static func removeStale() {
        for stage in all() {
            let owner = (stage.path as NSString).lastPathComponent.dropFirst(prefix.count).split(separator: "-").first.flatMap { Int32($0) }
            if let owner, ProcFS.isLive(owner), ProcFS.stat(owner)?.command == "stasis" { continue }
            removeUnlessRescuing(stage)
        }
    }
}
