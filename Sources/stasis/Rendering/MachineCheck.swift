import StasisCore
import StasisEngine

// How `stasis check` reads on a terminal: a subject per line ("criu:", "gpu:", ...), details indented below.

extension CheckOperation.Report {
    var textLines: [String] {
        let indent = "         "
        var lines = ["kernel:  \(kernel)\(root ? "" : " (not root: checkpointing needs root)")"]
        if criu.found {
            lines.append("criu:    \(criu.version ?? "?") at \(criu.path ?? "?")")
            lines.append(indent + "kernel check: \(criu.kernelCheck == true ? "ok" : "FAILED")")
            if let detail = criu.kernelCheckDetail { lines += detail.split(separator: "\n").map { indent + "  " + $0 } }
            let features = ["memory tracking \(yesNo(criu.memoryTracking))", "lazy pages \(yesNo(criu.lazyPages))",
                            "pidfd store \(yesNo(criu.pidfdStore))"]
            lines.append(indent + "features: " + features.joined(separator: ", "))
        } else {
            lines.append("criu:    missing")
        }
        lines += criu.warnings.map { indent + "warning: \($0)" }
        if let problem = criu.problem { lines.append(indent + "problem: \(problem)") }
        if let hint = criu.hint { lines.append(indent + "fix: \(hint)") }
        if gpu.driverLoaded {
            let api = gpu.checkpointAPI ? "present" : "absent"
            lines.append("gpu:     driver \(gpu.driverVersion ?? "?") (\(gpu.library ?? "?")), checkpoint API \(api)")
            lines += gpu.devices.map { indent + "[\($0.index)] \($0.name) \($0.uuid) \(Format.bytes($0.memoryBytes))" }
            if let problem = gpu.problem { lines.append(indent + "problem: \(problem)") }
        } else {
            lines.append("gpu:     no GPU driver")
        }
        if let hint = gpu.hint { lines.append(indent + "fix: \(hint)") }
        let free = store.freeBytes.map { ", \(Format.bytes($0)) free there" } ?? ""
        if store.exists {
            let checkpoints = store.checkpoints.map { plural($0, "checkpoint", "checkpoints") } ?? "unreadable catalog"
            lines.append("store:   \(store.path): \(checkpoints), \(store.chunks ?? 0) chunks, \(Format.bytes(store.chunkBytes ?? 0))\(free)")
        } else {
            lines.append("store:   \(store.path) (created by the first dump)\(free)")
        }
        let runcLine = runc.map { "\($0) (stasis dump --container)" } ?? "not found (needed only for containers: docs/CONTAINERS.md)"
        lines.append("runc:    \(runcLine)")
        lines.append("ready:   \(ready ? "yes" : "no")")
        return lines
    }

    private func yesNo(_ value: Bool?) -> String { value.map { $0 ? "yes" : "no" } ?? "?" }
}
