import Foundation
import StasisCore
import StasisOS
import StasisStore

/// Where a checkpoint is written before it exists: a hidden 0700 sibling of the destination, renamed into
/// place only when complete, so a dump that crashes or is killed never leaves a directory that looks finished.
///
/// Beside it, a second hidden sibling is the work directory of whatever writes the checkpoint (CRIU's log and
/// statistics): CRIU goes on writing those after the checkpoint is published, and must never write into the
/// published directory, where a file the manifest does not list would make the checkpoint look damaged.
public final class StagingDirectory {
    public let destination: String
    public let path: String
    /// The writer's work directory (CRIU's `work_dir`); removed with `finishWork` or `discard`.
    public let workPath: String
    public private(set) var published = false
    /// The id of the manifest being written here, once known (a failed dump unlists it from the store).
    public var manifestID: String?
    /// The store's record of the two directories (written before they are made), so `stasis gc` finds them
    /// should this process die.
    private let writer: StoreWriter?

    /// Refuses a destination that exists and is not an empty directory, or whose parent does not exist (as
    /// mkdir without -p: a mistyped path is not created); clears leftovers of dumps that died (their owner PID
    /// is in the name), and creates the staging and work directories, recorded in `store`.
    public init(destination: String, store: ChunkStore? = nil) throws {
        let destination = try Self.check(destination: destination)
        self.destination = destination
        FileSystem.removeAbandonedPartials(of: destination)
        // Recorded before they exist: a writer killed at any instant leaves nothing gc cannot find.
        writer = try store.map { try StoreWriter(store: $0, partialsOf: destination) }
        var staging: String?, work: String?
        do {
            staging = try FileSystem.makeStagingSibling(of: destination, owner: ProcessInfo.processInfo.processIdentifier)
            work = try FileSystem.makeStagingSibling(of: destination, owner: ProcessInfo.processInfo.processIdentifier)
        } catch {
            for made in [staging, work].compactMap({ $0 }) { FileSystem.removeTree(made) }
            writer?.release()
            throw error
        }
        (path, workPath) = (staging!, work!)
    }

    /// The destination, made absolute, once it is known to be a place a checkpoint can go: missing or an
    /// empty directory, in a directory that exists. Callers that create something first (a store) ask here
    /// before they do.
    @discardableResult
    public static func check(destination: String) throws -> String {
        let absolute = URL(fileURLWithPath: destination).standardizedFileURL.path
        let parent = URL(fileURLWithPath: absolute).deletingLastPathComponent().path
        guard FileSystem.isDirectory(parent) else {
            throw StasisError(.invalidArgument, "\(parent), where the checkpoint \(absolute) would go, is not a directory",
                              hint: "create it first (mkdir -p \(parent)), or check the path")
        }
        guard try FileSystem.isMissingOrEmptyDirectory(absolute) else {
            throw StasisError(.directoryNotEmpty, "\(absolute) already exists and is not empty",
                              hint: "choose a new directory, or remove the old checkpoint first")
        }
        return absolute
    }

    deinit {
        // What an error path did not publish or discard goes too.
        discard()
    }

    /// Renames the staging directory to the destination (atomic on one filesystem).
    public func publish() throws {
        try FileSystem.makePrivate(tree: path)
        try FileSystem.publish(path, as: destination)
        published = true
    }

    /// After the writer (CRIU) has exited: moves its log into the published checkpoint by a rename (the log is
    /// complete or absent there, never half-written) and removes the work directory. The log is not part of
    /// the checkpoint's verified content (see `Checkpoint.unlistedLogs`).
    public func finishWork(keeping logName: String?) {
        if let logName, FileSystem.exists(workPath + "/" + logName) {
            // The checkpoint is published already: a log that cannot be moved in goes with the work directory, which costs only its diagnosis.
            try? FileSystem.setMode(workPath + "/" + logName, 0o600)
            try? FileSystem.rename(workPath + "/" + logName, to: destination + "/" + logName)  // best effort, as above
        }
        FileSystem.removeTree(workPath)
        writer?.release()
    }

    /// Drops an unfinished checkpoint. A log worth keeping (in the work directory, else the staging one) is
    /// first copied beside the destination (DEST.dump-failed.log), or to the temporary directory when that
    /// filesystem is full, and that path returned. A published checkpoint stays, and gets the log as
    /// `finishWork` gives it.
    @discardableResult
    public func discard(keeping logName: String? = nil) -> String? {
        if published {
            finishWork(keeping: logName)
            return logName.map { destination + "/" + $0 }.flatMap { FileSystem.exists($0) ? $0 : nil }
        }
        var kept: String?
        // The log is kept on a best-effort basis: discarding runs after a failure, which is what gets reported;
        // a log that cannot be read or copied is only not kept (nil says so).
        if let logName,
           let data = (try? FileSystem.readFileIfPresent(workPath + "/" + logName)) ?? (try? FileSystem.readFileIfPresent(path + "/" + logName)) {  // unreadable: not kept (above)
            for target in [destination + ".dump-failed.log", NSTemporaryDirectory() + "stasis-dump-failed-\(ProcessInfo.processInfo.processIdentifier).log"] {
                // A full or read-only filesystem here: the next target is tried.
                if (try? FileSystem.writeAtomically(data, to: target)) != nil { kept = target; break }
            }
        }
        FileSystem.removeTree(path)
        FileSystem.removeTree(workPath)
        writer?.release()
        return kept
    }
}
