import Foundation
import StasisCRIU
import StasisCore
import StasisGPU
import StasisOS
import StasisStore

/// `stasis restore`: bring a checkpointed tree back, with the same PIDs, detached from stasis. `run` is the list
/// of steps; `RestoreRun` holds what they share and their one rollback. The sequence and what rolls back:
/// docs/ARCHITECTURE.md.
///
/// Everything that can refuse the restore runs before CRIU starts anything: the manifest, the integrity of
/// every whole file, that every chunk is in the store, the host's CPU, the device check and free PIDs.
/// The chunked memory images then reach CRIU in one of two ways:
/// - streamed (the default): CRIU restores with `--stream` and reads each image from a pipe that stasis
///   fills while decoding and checking chunks on all cores (`CRIUImageServer`). No copy of the images is
///   made, and decoding overlaps CRIU's work. A damaged chunk ends the pipe early: CRIU fails while it is
///   still restoring memory, before any restored process has run an instruction of its own, and removes the
///   tasks it created; stasis names the chunk.
/// - rebuilt (`rebuildRoot` set): rebuilt as files there first, every chunk checked, then CRIU reads them.
/// After CRIU, a failing device step kills the restored tree, so no half-restored process is left behind.
/// With `prepare`, CRIU leaves the tree stopped, GPU processes get their devices back with their calls held,
/// and the tree's record is written (`PreparedRestore`).
///
/// A container's checkpoint (`manifest.container`) is restored by its runtime, runc, from images rebuilt from
/// the store, as the container it was (or under `Options.containerID`, from `Options.bundle`).
public struct RestoreOperation {
    public struct Options: Sendable {
        public var directory: String
        /// Where CRIU's restore log and statistics go, kept (default: a new directory under
        /// /var/lib/stasis/restore, removed once the restore worked unless `keepLog`).
        public var workDirectory: String?
        /// Keep the default work directory (CRIU's restore log) after a restore that worked.
        public var keepLog = false
        /// The chunk store (default: the one the manifest names).
        public var store: String?
        /// A store to read from instead of opening one (a pull from a registry that is still arriving).
        public var chunkStore: (any ChunkStore)?
        /// How the report, errors and a prepared restore's record name the checkpoint, when not by `directory`
        /// (a pull's destination, while the checkpoint is still arriving in its staging directory).
        public var checkpointName: String?
        /// Where CRIU's images are rebuilt from the store (a private directory is made and removed inside
        /// it); nil streams them to CRIU instead.
        public var rebuildRoot: String?
        public var skipCPUCheck = false
        /// Read the chunks ahead into the page cache while CRIU and the driver work (`ChunkPrefetcher`).
        public var prefetch = true
        /// How long to wait for a checkpointed PID that is still exiting (a zombie, or reaped slowly by init).
        public var pidWaitSeconds = 5.0
        public var logLevel: Int32 = 4
        public var progress: ProgressHandler?
        /// A container checkpoint: the ID and OCI bundle to restore it as (default: the checkpoint's).
        public var containerID: String?
        public var bundle: String?
        /// Where the container runtime comes from (the CLI's; the default otherwise).
        public var backends = Backends()
        /// Leave the restored tree stopped, to be let go by `PreparedRestore.activate` (`stasis activate`).
        public var prepare = false
        public init(directory: String) { self.directory = directory }
    }

    public struct Report: Codable, Sendable {
        public var directory: String
        public var rootPID: Int32
        public var processes: Int
        /// CRIU's restore log; nil where it was removed with its work directory after the restore worked.
        public var logFile: String?
        public var images: Images
        public var timings: Timings
        /// The device step's phases in seconds: "driver" (its restore and unlock), "refill" (agents), and the
        /// CPU seconds stasis spent during the refill ("refill cpu").
        public var deviceSteps: [String: Double]
        /// The container restored, for a container's checkpoint.
        public var container: String?
        /// TIME_WAIT sockets destroyed so that the checkpoint's listeners could bind their ports again.
        public var clearedTimeWaitSockets = 0
        /// The tree was left stopped (--prepare): `stasis activate ROOT` lets it run.
        public var prepared = false
        /// `stasis restore REF`: the pull the restore overlapped, published once the tree ran.
        public var pulled: RegistryTransfer.PullReport?
    }

    /// How CRIU got the memory images.
    public enum Images: String, Codable, Sendable {
        /// Through the image server, decoded from the store while CRIU read them.
        case streamed
        /// Rebuilt as files in `--rebuild-dir` before CRIU started.
        case rebuilt
        /// Read by CRIU from the checkpoint directory (a checkpoint without a store, format 1).
        case files
    }

    public struct Timings: Codable, Sendable {
        /// Checking the whole files (and that every chunk is in the store); rebuilding (reading, decoding and
        /// checking every chunk of) the chunked ones, 0 when they are streamed: then that work is inside `criu`.
        public var verify: Double = 0
        public var rebuild: Double = 0
        public var criu: Double = 0
        public var forking: Double = 0
        public var restore: Double = 0
        public var devices: Double = 0
        public var total: Double = 0
    }

    public static let defaultWorkRoot = "/var/lib/stasis/restore"

    let options: Options
    let device: DeviceStep

    public init(_ options: Options, device: DeviceStep = NoDeviceStep()) {
        self.options = options
        self.device = device
    }

    public func run() throws -> Report {
        // Checks that hold nothing: the manifest, CRIU, the CPU, the GPUs, the store.
        let restore = try RestoreRun(self)
        do {
            restore.holdStore()
            try restore.prepareContainer()
            try restore.verifyImages()
            restore.readAhead()
            if let container = restore.container {
                try restore.restoreContainer(container)
            } else {
                try restore.freeTheTreesPIDs()
                try restore.restoreTree()
            }
            if options.prepare {
                try restore.restoreDevicesHeld()
                try restore.recordPrepared()
            } else {
                try restore.restoreDevices()
            }
        } catch {
            throw restore.fail(error)
        }
        return restore.finish()
    }

    /// Stops a tree CRIU restored: the root CRIU reported and its descendants, nothing else (never a PID
    /// taken from the manifest, which could name any process, or with -1, all of them).
    public static func stopRestoredTree(root: Int32) {
        guard root > 1 else { return }
        for process in ProcFS.tree(root: root).reversed() where process.pid > 1 { Signals.kill(process.pid) }
    }
}
