import Foundation
import StasisCore
import StasisGPU
import StasisOS

/// A prepared restore (`stasis restore --prepare`): CRIU restored the tree ahead of demand and left it
/// stopped (SIGSTOP), its memory in place; `activate` lets it run, which is all the time it takes to serve.
/// The record of what was prepared (`directory/ROOT.json`, private) names each process by PID and start
/// time, so that activation never signals a process that only reuses a PID, and says where the checkpoint
/// and CRIU's log are.
///
/// GPU processes come back during the prepare too, so that activation costs no device work: the driver
/// restores them and their agents refill and check their device memory while the rest of the tree stays
/// stopped; their CUDA calls stay held at the agents' gates, and they are stopped again (`stopAgain`).
/// Activation lets them run, then tells each agent to let its calls go (`DeviceStep.letGo`). That needs an
/// agent in every GPU process (`stasis run`): a process restored by the driver alone would run on its GPU at
/// once. Such a checkpoint, or a container's, is refused before anything starts.
public enum PreparedRestore {
    public static let directory = "/var/lib/stasis/prepared"

    public struct Record: Codable, Sendable {
        public struct Process: Codable, Sendable {
            public var pid: Int32
            public var startTime: UInt64
        }
        public var checkpoint: String
        public var manifestID: String
        public var rootPID: Int32
        public var processes: [Process]
        public var logFile: String
        /// The log's directory is stasis's own (under `RestoreOperation.defaultWorkRoot`, no --keep-log):
        /// removed once the tree is activated, as a plain restore's is when it worked.
        public var removeLogAtActivation: Bool?
        public var preparedAt: Date
        /// GPU processes whose device calls are held until the activation lets them go.
        public var heldDevices: [Int32]?
    }

    public struct ActivationReport: Codable, Sendable {
        public var rootPID: Int32
        public var processes: Int
        public var checkpoint: String
        /// From the command's start until every process was let go.
        public var seconds: Double
        /// How long the tree waited, prepared.
        public var preparedSeconds: Double
        /// GPU processes whose device calls were let go.
        public var devices: Int
    }

    static func path(_ root: Int32) -> String { "\(directory)/\(root).json" }

    /// Why a checkpoint cannot be prepared, or nil.
    static func refusal(_ manifest: Manifest, device: DeviceStep) -> String? {
        if manifest.container != nil { return "a container's checkpoint cannot be prepared: runc restores containers, and it cannot leave one stopped" }
        return device.refusesHolding(section: manifest.gpu)
    }

    /// Stops `pids` again (they ran while their devices came back) and waits until every thread of each is
    /// stopped, up to `seconds`.
    static func stopAgain(_ pids: [Int32], seconds: Double = 5) throws {
        for pid in pids { Signals.stop(pid) }
        let watch = Stopwatch()
        for pid in pids {
            while true {
                let states = ProcFS.threadStates(pid)
                guard !states.isEmpty else { throw StasisError(.processNotFound, "restored GPU process \(pid) ended while its devices came back") }
                if states.allSatisfy({ $0 == "T" || $0 == "t" }) { break }
                guard watch.seconds < seconds else {
                    throw StasisError(.busy, "restored GPU process \(pid) did not stop within \(Int(seconds)) s of SIGSTOP (thread states \(String(states)))")
                }
                usleep(1000)
            }
        }
    }

    /// Records the stopped tree of `root`; throws if it is not there, stopped, as CRIU left it.
    static func record(root: Int32, checkpoint: String, manifestID: String, logFile: String, removeLogAtActivation: Bool,
                       heldDevices: [Int32]) throws {
        let tree = ProcFS.tree(root: root)
        var processes: [Record.Process] = []
        for process in tree {
            guard process.state == "T", let startTime = process.startTime else {
                throw StasisError(.criuFailed, "CRIU was to leave PID \(process.pid) stopped, and it is in state \(process.state)")
            }
            processes.append(.init(pid: process.pid, startTime: startTime))
        }
        guard !processes.isEmpty else { throw StasisError(.processNotFound, "the prepared tree of PID \(root) is gone") }
        let record = Record(checkpoint: checkpoint, manifestID: manifestID, rootPID: root, processes: processes, logFile: logFile,
                            removeLogAtActivation: removeLogAtActivation, preparedAt: Date(), heldDevices: heldDevices.isEmpty ? nil : heldDevices)
        try FileSystem.makePrivateDirectory(directory)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        try FileSystem.writeAtomically(try encoder.encode(record), to: path(root))
    }

    /// Lets the prepared tree of `root` run: every process recorded must still be the same process (PID and
    /// start time) and stopped; then each gets SIGCONT, the record goes, and `device` lets the held device calls
    /// go on. Nothing is signalled otherwise. If the devices cannot be let go, the tree is killed (its CUDA
    /// calls would wait forever): the checkpoint is untouched, and a new prepare or restore starts from it.
    public static func activate(root: Int32, device: DeviceStep) throws -> ActivationReport {
        let watch = Stopwatch()
        // A record is trusted only in a directory no one else controls (it names processes to signal).
        if FileSystem.exists(directory) { try FileSystem.requireOwnedAndPrivate(directory, what: "the prepared restores' directory") }
        guard let data = try FileSystem.readFileIfPresent(path(root)) else {
            throw StasisError(.processNotFound, "PID \(root) is not a prepared restore (no record in \(directory))",
                              hint: "prepare one with `stasis restore --prepare -D CHECKPOINT`")
        }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        let record: Record
        do { record = try decoder.decode(Record.self, from: data) } catch {
            throw StasisError(.manifestInvalid, "the record \(path(root)) of a prepared restore cannot be read: \(error)")
        }
        for process in record.processes {
            // A zombie is gone too (killed while its stopped parent cannot reap it).
            guard let now = ProcFS.stat(process.pid), now.startTime == process.startTime, now.state != "Z", now.state != "X" else {
                FileSystem.remove(path(root))
                throw StasisError(.processNotFound, "PID \(process.pid) of the tree prepared from \(record.checkpoint) is gone; nothing was activated",
                                  hint: "stop what is left of it (`kill -KILL \(record.processes.map { String($0.pid) }.joined(separator: " "))`) and prepare again")
            }
            guard now.state == "T" else {
                FileSystem.remove(path(root))
                throw StasisError(.busy, "PID \(process.pid) of the tree prepared from \(record.checkpoint) is not stopped (state \(now.state)): something let it run already")
            }
        }
        // Children first: the root, once running, finds its tree running.
        for process in record.processes.reversed() { Signals.resume(process.pid) }
        FileSystem.remove(path(root))
        let held = record.heldDevices ?? []
        do {
            try device.letGo(pids: held)
        } catch {
            for process in record.processes.reversed() { Signals.kill(process.pid) }
            throw StasisError.wrapping(error, as: .gpu).prefixed("activation of the tree prepared from \(record.checkpoint) failed")
                .appending("; the tree was killed, and the checkpoint is intact: prepare or restore it again")
        }
        let workDirectory = (record.logFile as NSString).deletingLastPathComponent
        if record.removeLogAtActivation == true, (workDirectory as NSString).deletingLastPathComponent == RestoreOperation.defaultWorkRoot {
            FileSystem.removeTree(workDirectory)
        }
        return ActivationReport(rootPID: root, processes: record.processes.count, checkpoint: record.checkpoint, seconds: watch.seconds,
                                preparedSeconds: Date().timeIntervalSince(record.preparedAt), devices: held.count)
    }
}
