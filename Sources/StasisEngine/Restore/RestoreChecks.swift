import Foundation
import StasisCore
import StasisOS

/// What must hold on this host before CRIU restores a tree: its CPU, the checkpoint's PIDs free, its listeners'
/// ports bindable.
extension RestoreOperation {
    /// Refuses a CPU that lacks instruction-set extensions the checkpoint's host had.
    static func checkCPU(_ recorded: Manifest.Host) throws {
        let here = HostFacts.current()
        guard recorded.machine == here.machine else {
            throw StasisError(.hostMismatch, "the checkpoint was taken on \(recorded.machine); this machine is \(here.machine)")
        }
        let missing = Set(recorded.cpuFlags).subtracting(here.cpuFlags).sorted()
        guard missing.isEmpty else {
            throw StasisError(.hostMismatch, "this CPU lacks \(missing.joined(separator: ", ")), which the checkpoint's host (\(recorded.cpuModel)) had",
                              hint: "the program may use these instructions and crash after restore; pass --skip-cpu-check to restore anyway")
        }
    }

    /// The checkpoint's PIDs must be free. A PID whose process is exiting (a zombie, or one the init of a
    /// VM reaps slowly) is waited for up to `seconds`; a live one is refused with its command line.
    static func waitForFreePIDs(_ tree: Manifest.ProcessTree, seconds: Double) throws {
        for process in tree.processes where ProcFS.exists(process.pid) {
            let deadline = Stopwatch()
            while let stat = ProcFS.stat(process.pid), deadline.seconds < seconds {
                guard stat.state == "Z" || stat.state == "X" else { break }
                Thread.sleep(forTimeInterval: 0.02)
            }
            if let stat = ProcFS.stat(process.pid) {
                let state = stat.state == "Z" ? "a zombie not yet reaped" : "'\(ProcFS.arguments(process.pid).joined(separator: " ").prefix(120))'"
                throw StasisError(.pidInUse, "restore refused: PID \(process.pid) (\(process.command) in the checkpoint) is in use by \(state)",
                                  hint: "restored processes keep their PIDs: stop PID \(process.pid) first (if it is the original, still running after a --leave-running dump, restore once it exits), or restore in a PID namespace of its own (unshare --pid --fork --mount-proc stasis restore ...; a same-host migration's receiver: docs/MIGRATION.md)")
            }
        }
        try waitForFreeGroups(tree, seconds: seconds)
    }

    /// A PID also stays taken while another process has it as its process group or session: the original
    /// tree's children, killed with it and not yet reaped by init (zombies), keep the session and group its
    /// root led, and CRIU's fork of the root then fails with "File exists" though no process has that PID
    /// (seen on a VM whose init reaps orphans slowly). Waits for such zombies; refuses when one runs.
    static func waitForFreeGroups(_ tree: Manifest.ProcessTree, seconds: Double) throws {
        let pids = Set(tree.processes.map(\.pid))
        let deadline = Stopwatch()
        while true {
            let holders = ProcFS.allPIDs().filter { !pids.contains($0) }.compactMap(ProcFS.stat)
                .filter { pids.contains($0.pgrp) || pids.contains($0.session) }
            guard let holder = holders.first(where: { $0.state != "Z" && $0.state != "X" }) ?? holders.first else { return }
            let zombie = holder.state == "Z" || holder.state == "X"
            if zombie && deadline.seconds < seconds {
                Thread.sleep(forTimeInterval: 0.02)
                continue
            }
            let held = pids.contains(holder.session) ? holder.session : holder.pgrp
            let what = zombie ? "a zombie not yet reaped" : "'\(ProcFS.arguments(holder.pid).joined(separator: " ").prefix(120))', which runs"
            throw StasisError(.pidInUse, "restore refused: PID \(held) is still the \(held == holder.session ? "session" : "process group") of PID \(holder.pid), \(what)",
                              hint: "restored processes keep their PIDs, and a PID stays taken while it names a session or group: stop PID \(holder.pid) first, or restore in a PID namespace of its own (unshare --pid --fork --mount-proc stasis restore ...)")
        }
    }

    /// CRIU binds the checkpoint's listening sockets again; TIME_WAIT sockets on their addresses (connections
    /// their side closed first, within the last minute, often the original's own) would make that fail with
    /// "Address already in use". Those are destroyed first. Returns how many. A kernel that cannot destroy
    /// them (no CONFIG_INET_DIAG_DESTROY) is no reason to refuse: CRIU may still bind, and says so if not.
    static func clearListeningPorts(_ tree: Manifest.ProcessTree) -> Int {
        var cleared = 0
        for listener in Set(tree.processes.flatMap { $0.listeners ?? [] }) {
            guard let endpoint = TCPListeners.Endpoint(listener) else { continue }
            do {
                cleared += try TCPListeners.clearTimeWait(for: endpoint)
            } catch {
                FileHandle.standardError.write(Data("stasis: warning: cannot clear TIME_WAIT sockets off \(listener) (\(error)); if CRIU cannot bind it, retry within a minute\n".utf8))
            }
        }
        return cleared
    }
}
