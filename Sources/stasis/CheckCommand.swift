import ArgumentParser
import StasisCore
import StasisEngine

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Report what this machine can do: CRIU, its kernel check, the GPU driver and GPUs.",
        discussion: "Exits non-zero when CPU checkpoint/restore cannot work here. \"no GPU driver\" is a normal answer.")

    @OptionGroup var output: OutputOptions

    func run() throws {
        let report = CheckOperation().run()
        if output.json {
            Output.json(report)
        } else {
            let criu = report.criu
            print("kernel:  \(report.kernel)\(report.root ? "" : " (not root: checkpointing needs root)")")
            if criu.found {
                print("criu:    \(criu.version ?? "?") at \(criu.path ?? "?")")
                print("         kernel check: \(criu.kernelCheck == true ? "ok" : "FAILED")")
                if let detail = criu.kernelCheckDetail { print(detail.split(separator: "\n").map { "           " + $0 }.joined(separator: "\n")) }
                print("         features: memory tracking \(yesNo(criu.memoryTracking)), lazy pages \(yesNo(criu.lazyPages)), pidfd store \(yesNo(criu.pidfdStore))")
            } else {
                print("criu:    missing")
            }
            for warning in criu.warnings { print("         warning: \(warning)") }
            if let problem = criu.problem { print("         problem: \(problem)") }
            if let hint = criu.hint { print("         fix: \(hint)") }
            let gpu = report.gpu
            if gpu.driverLoaded {
                print("gpu:     driver \(gpu.driverVersion ?? "?") (\(gpu.library ?? "?")), checkpoint API \(gpu.checkpointAPI ? "present" : "absent")")
                for device in gpu.devices {
                    print("         [\(device.index)] \(device.name) \(device.uuid) \(Format.bytes(device.memoryBytes))")
                }
            } else {
                print("gpu:     no GPU driver")
            }
            if let problem = gpu.problem, gpu.driverLoaded { print("         problem: \(problem)") }
            if let hint = gpu.hint { print("         fix: \(hint)") }
            let store = report.store
            let free = store.freeBytes.map { ", \(Format.bytes($0)) free there" } ?? ""
            if store.exists {
                print("store:   \(store.path): \(store.checkpoints.map { "\($0) checkpoint\($0 == 1 ? "" : "s")" } ?? "unreadable catalog"), \(store.chunks ?? 0) chunks, \(Format.bytes(store.chunkBytes ?? 0))\(free)")
            } else {
                print("store:   \(store.path) (created by the first dump)\(free)")
            }
            print("runc:    \(report.runc.map { "\($0) (stasis dump --container)" } ?? "not found (needed only for containers: docs/CONTAINERS.md)")")
            print("ready:   \(report.ready ? "yes" : "no")")
        }
        if !report.ready { throw ExitCode.failure }
    }

    private func yesNo(_ value: Bool?) -> String { value.map { $0 ? "yes" : "no" } ?? "?" }
}
