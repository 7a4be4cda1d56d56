import Foundation
import StasisContainer
import StasisCore
import StasisImage
import StasisOS

/// What a dump checkpoints, and so how it is frozen: a process tree, which CRIU freezes and dumps (stasis's
/// steps run inside CRIU's post-dump notification), or a runc container, which stasis pauses and runc
/// checkpoints.
enum DumpTarget {
    case process(pid: Int32)
    case container(runtime: any ContainerRuntime, state: ContainerState, pids: [Int32])

    /// The target of `options`, once it is known to be one stasis can dump (refused otherwise, nothing touched).
    init(_ options: DumpOperation.Options) throws {
        if let id = options.container {
            let runtime = try options.backends.containerRuntime()
            let state = try runtime.state(id)
            guard state.status == "running" else {
                throw StasisError(.processNotFound, "container \(state.id) is \(state.status), not running")
            }
            try Self.refuseTerminal(state)
            self = .container(runtime: runtime, state: state, pids: try runtime.processes(state.id))
        } else {
            self = .process(pid: options.pid)
        }
        try Self.refuseUndumpable(rootPID)
    }

    var rootPID: Int32 {
        switch self {
        case .process(let pid): pid
        case .container(_, let state, _): state.pid
        }
    }

    /// The processes that will be checkpointed, root first: the root's tree, and for a container any process
    /// that `runc exec` started beside its init.
    func processes() -> [Manifest.Process] {
        var tree = ProcFS.tree(root: rootPID)
        if case .container(_, _, let pids) = self {
            for other in pids where !tree.contains(where: { $0.pid == other }) {
                tree += ProcFS.tree(root: other).filter { entry in !tree.contains { $0.pid == entry.pid } }
            }
        }
        return tree.map { entry -> Manifest.Process in
            let status = ProcFS.status(entry.pid)
            var process = Manifest.Process(pid: entry.pid, ppid: entry.ppid, command: entry.command, arguments: ProcFS.arguments(entry.pid),
                                           threads: Int(status["Threads"] ?? "") ?? 1, residentBytes: ProcFS.kilobytes(status["VmRSS"]))
            if let inner = ProcFS.namespacePID(entry.pid), inner != entry.pid { process.namespacePID = inner }
            let listeners = TCPListeners.endpoints(of: entry.pid)
            if !listeners.isEmpty { process.listeners = listeners.map(\.description) }
            return process
        }
    }

    /// Refuses, saying what it is, a PID that CRIU cannot dump: one that does not run, the system's init, or
    /// a kernel thread (kthreadd is PID 2).
    static func refuseUndumpable(_ pid: Int32) throws {
        guard pid > 0, ProcFS.isLive(pid), let stat = ProcFS.stat(pid) else {
            throw StasisError(.processNotFound, "no running process with PID \(pid)", hint: "check the PID with `ps -p \(pid)`")
        }
        if stat.isKernelThread || pid == 2 {
            throw StasisError(.invalidArgument, "PID \(pid) (\(stat.command)) is a kernel thread: it has no user memory and cannot be checkpointed",
                              hint: "give the PID of a user process (`ps -o pid,comm --ppid 1`)")
        }
        if pid == 1 {
            throw StasisError(.invalidArgument, "PID 1 (\(stat.command)) is this system's init: CRIU checkpoints process trees below it, not init itself",
                              hint: "give the PID of the job's own root process")
        }
    }

    /// A container with a terminal cannot be restored detached by runc without a console socket: refused
    /// before anything is touched.
    static func refuseTerminal(_ state: ContainerState) throws {
        // A config.json that cannot be read is not refused here: the runtime's own checkpoint reports it.
        let spec = try? JSONSerialization.jsonObject(with: FileSystem.readFile(state.bundle + "/config.json")) as? [String: Any]
        if (spec?["process"] as? [String: Any])?["terminal"] as? Bool == true {
            throw StasisError(.invalidArgument, "container \(state.id) has a terminal (process.terminal in its config.json); stasis restores containers detached, without one",
                              hint: "run it with pipes or /dev/null as its stdio (podman and CRI-O give containers pipes)")
        }
    }

    /// Copies the container's config.json into the checkpoint and says what the container is (and, for one
    /// podman made, what podman knows of it: `stasis export --archive` writes it for podman).
    static func keepSpec(of state: ContainerState, runtime: any ContainerRuntime, in directory: String) throws -> Manifest.Container {
        let spec = try FileSystem.readFile(state.bundle + "/config.json")
        try FileSystem.writeAtomically(spec, to: directory + "/" + CheckpointWriter.containerSpecName)
        return Manifest.Container(runtime: runtime.name, id: state.id, bundle: state.bundle, spec: CheckpointWriter.containerSpecName,
                                  engine: Podman.engine(of: state.id, bundle: state.bundle, spec: spec))
    }
}
