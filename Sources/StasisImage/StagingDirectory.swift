import Foundation
import Glibc
import StasisCore
import StasisOS

/// Where a checkpoint is written before it exists: a hidden 0700 sibling of the destination, renamed into
/// place only when complete, so a dump that crashes or is killed never leaves a directory that looks finished.
public final class StagingDirectory {
    public let destination: String
    public let path: String
    public private(set) var published = false
    /// The id of the manifest being written here, once known (a failed dump unlists it from the store).
    public var manifestID: String?

    /// Refuses a destination that exists and is not an empty directory, clears leftovers of dumps that died
    /// (their owner PID is in the name), and creates the staging directory.
    public init(destination: String) throws {
        self.destination = URL(fileURLWithPath: destination).standardizedFileURL.path
        guard try FileSystem.isMissingOrEmptyDirectory(self.destination) else {
            throw StasisError(.directoryNotEmpty, "\(self.destination) already exists and is not empty",
                              hint: "choose a new directory, or remove the old checkpoint first")
        }
        FileSystem.removeAbandonedPartials(of: self.destination)
        path = try FileSystem.makeStagingSibling(of: self.destination, owner: getpid())
    }

    /// Renames the staging directory to the destination (atomic on one filesystem).
    public func publish() throws {
        try FileSystem.makePrivate(tree: path)
        try FileSystem.publish(path, as: destination)
        published = true
    }

    /// Drops an unfinished checkpoint. A log worth keeping is first copied beside the destination
    /// (DEST.dump-failed.log), or to the temporary directory when that filesystem is full, and that path returned.
    @discardableResult
    public func discard(keeping logName: String? = nil) -> String? {
        guard !published else { return nil }
        var kept: String?
        if let logName, let data = FileManager.default.contents(atPath: path + "/" + logName) {
            for target in [destination + ".dump-failed.log", NSTemporaryDirectory() + "stasis-dump-failed-\(getpid()).log"] {
                if (try? FileSystem.writeAtomically(data, to: target)) != nil { kept = target; break }
            }
        }
        FileSystem.removeTree(path)
        return kept
    }
}
