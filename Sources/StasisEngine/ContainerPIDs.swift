import StasisCore
import StasisOS

/// A container restored by its runtime keeps its processes' PIDs inside its PID namespace, but they get new
/// PIDs here; the GPU steps (the driver, the agents) address processes by the PIDs here. This matches the
/// restored processes to the checkpoint's by their PIDs inside the namespace.
enum ContainerPIDs {
    /// `section` with each process's PID replaced by its PID here after the restore; `processes` are the
    /// checkpoint's (with their namespace PIDs), `restored` the restored container's processes as runc lists them.
    static func remap(_ section: Manifest.GPUSection, processes: [Manifest.Process], restored: [Int32]) throws -> Manifest.GPUSection {
        var here: [Int32: Int32] = [:]  // namespace PID -> PID here
        for pid in restored { here[ProcFS.namespacePID(pid) ?? pid] = pid }
        let inner = Dictionary(processes.map { ($0.pid, $0.namespacePID ?? $0.pid) }, uniquingKeysWith: { first, _ in first })
        var mapped = section
        for index in mapped.processes.indices {
            let old = mapped.processes[index].pid
            guard let namespacePID = inner[old], let new = here[namespacePID] else {
                throw StasisError(.gpu, "the restored container has no process for PID \(old) of the checkpoint (PID \(inner[old].map(String.init) ?? "?") in its namespace)")
            }
            mapped.processes[index].pid = new
        }
        return mapped
    }
}
