import Foundation
import StasisCore
import StasisOS

/// Where a restore writes: CRIU's work directory (its log and statistics: kept after a failure, removed after
/// a restore that worked unless --keep-log) and the private directory its images are rebuilt in (removed at
/// the end).
extension RestoreOperation {
    /// How many restores' work directories (failed restores', kept logs) the default root keeps.
    public static let keptWorkDirectories = 16

    /// A new work directory under `defaultWorkRoot`, named by time and PID; the oldest ones beyond
    /// `keptWorkDirectories` whose restore is over (its PID gone) are removed, so the root does not grow by a
    /// directory per restore forever.
    static func makeWorkDirectory() throws -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        formatter.locale = Locale(identifier: "en_US_POSIX")
        let path = "\(defaultWorkRoot)/\(formatter.string(from: Date()))-\(ThisProcess.pid)"
        try FileSystem.makePrivateDirectory(path)
        pruneWorkDirectories(in: defaultWorkRoot, keeping: keptWorkDirectories)
        return path
    }

    static func pruneWorkDirectories(in root: String, keeping count: Int) {
        // Housekeeping only: a root that cannot be listed keeps its old directories, no reason to fail a restore.
        let names = ((try? FileSystem.names(in: root)) ?? []).filter { name in
            // yyyyMMdd-HHmmss-PID
            let parts = name.split(separator: "-")
            return parts.count == 3 && parts[0].count == 8 && parts.allSatisfy { $0.allSatisfy(\.isNumber) }
        }.sorted()
        for name in names.dropLast(count) {
            guard let owner = Int32(name.split(separator: "-")[2]), !ProcFS.isLive(owner) else { continue }
            FileSystem.removeTree(root + "/" + name)
        }
    }

    /// A private directory for CRIU's images under `root`, after checking that `bytes` fit there.
    static func makeRebuildDirectory(in root: String, bytes: UInt64) throws -> String {
        if let free = FileSystem.availableBytes(at: root) {
            guard free >= bytes else {
                throw StasisError(.noSpace, "\(root) has \(Format.bytes(free)) free; rebuilding the memory images for CRIU needs \(Format.bytes(bytes))",
                                  hint: "free memory or space there, or rebuild elsewhere with --rebuild-dir")
            }
        }
        return try FileSystem.makeTemporaryDirectory(in: root, prefix: "stasis-rebuild")
    }
}
