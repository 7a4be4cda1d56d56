import Foundation
import StasisCore
import StasisOS
import StasisStore

/// The repositories a store's checkpoints were pushed to, by registry (`registries.json` in the store, private):
/// a push to another repository of the same registry asks it to mount each blob it lacks from the last one
/// (cross-repository mount), so a checkpoint moved between repositories, or a job's checkpoints pushed under
/// several names, sends its bytes once. A registry that cannot mount answers with an upload instead.
enum PushHistory {
    static let fileName = "registries.json"
    /// Repositories remembered per registry, the latest first.
    static let kept = 8

    static func path(_ store: any ChunkStore) -> String { store.path + "/" + fileName }

    static func read(_ store: any ChunkStore) -> [String: [String]] {
        // Missing or unreadable: no history, and pushes send what the registry lacks, as without one.
        guard let data = try? FileSystem.readFileIfPresent(path(store)) else { return [:] }
        return (try? JSONDecoder().decode([String: [String]].self, from: data)) ?? [:]  // damaged: as missing (above)
    }

    /// The repository of `registry` to mount blobs from for a push to `repository`, if any.
    static func mountSource(_ store: (any ChunkStore)?, registry: String, repository: String) -> String? {
        guard let store else { return nil }
        return read(store)[registry]?.first { $0 != repository }
    }

    /// Remembers a push that completed. A failure to write it costs only later mounts: it is not an error.
    static func record(_ store: (any ChunkStore)?, registry: String, repository: String) {
        guard let store else { return }
        var history = read(store)
        history[registry] = Array(([repository] + (history[registry] ?? []).filter { $0 != repository }).prefix(kept))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        // Not written (a read-only store, a full disk): later pushes send instead of mounting (above).
        _ = try? FileSystem.writeAtomically(try encoder.encode(history), to: path(store))
    }
}
