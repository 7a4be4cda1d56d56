import Foundation
import ArgumentParser
import StasisRegistry
import StasisCore
import StasisEngine

struct RestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Restore a checkpoint; returns once the tree runs again and prints its root PID.",
        discussion: """
        Every whole file is verified against the manifest and every chunk's presence in the store is checked \
        before CRIU starts. The memory images are then streamed to CRIU (criu restore --stream), each chunk \
        checked on the way; a bad chunk stops CRIU while it restores memory, before any restored process runs. \
        With --rebuild-dir they are rebuilt as files first, every chunk checked before CRIU starts. Restored \
        processes keep their PIDs, so the original tree must be gone. The restored tree does not depend on stasis. \
        A container's checkpoint (stasis dump --container) is restored by runc from images rebuilt from the \
        store, as the container it was, or as --container from --bundle. \
        With --prepare the tree is restored ahead of demand and left stopped, its memory in place; \
        `stasis activate ROOT_PID` lets it run. GPU processes (under `stasis run`) get their device memory back \
        during the prepare, their CUDA calls held until the activation; not for containers, nor for GPU \
        processes checkpointed through the driver alone.
        """)

    @Argument(help: "The checkpoint directory (or give it with -D, as dump and import take theirs), or a registry reference HOST[:PORT]/REPOSITORY[:TAG], restored while it is pulled (docs/REGISTRY.md).")
    var checkpoint: String?

    @Option(name: [.customShort("D"), .customLong("images-dir")], help: "The checkpoint directory, when not given as the argument.")
    var imagesDir: String?

    var directory: String { checkpoint ?? imagesDir ?? "" }

    @Option(name: [.customShort("W"), .customLong("work-dir")], help: "Where CRIU's restore log goes, kept (default: a new directory under \(RestoreOperation.defaultWorkRoot), removed after a restore that worked).")
    var workDirectory: String?

    @Flag(name: .long, help: "Keep CRIU's restore log (under \(RestoreOperation.defaultWorkRoot)) after a restore that worked; failed restores always keep theirs.")
    var keepLog = false

    @Option(name: .long, help: "Rebuild CRIU's memory images from the chunk store as files in this directory (for example /dev/shm) before CRIU starts, instead of streaming them to CRIU; removed afterwards.")
    var rebuildDir: String?

    @OptionGroup var store: StoreOptions

    @Flag(name: .long, help: "Restore even when this CPU lacks instruction-set extensions the checkpoint's host had.")
    var skipCPUCheck = false

    @Flag(name: .long, help: "Do not read the store's chunks ahead into the page cache while CRIU restores (they are by default: it keeps a cold disk busy).")
    var noPrefetch = false

    @Option(name: .long, help: "CRIU log level, 0-4.")
    var logLevel: Int32 = 4

    @Option(name: .long, help: "Restore GPUs onto other GPUs: OLD=NEW[,OLD=NEW...], each a UUID (GPU-...) or an index. Default: the same UUID, else the same index.")
    var gpuMap: String?

    @Option(name: .long, help: "A container's checkpoint: restore it under this container ID (default: the one it had).")
    var container: String?

    @Option(name: .long, help: "A container's checkpoint: the OCI bundle to restore it from (default: the one it ran from).")
    var bundle: String?

    @Flag(name: .long, help: "Restore the tree and leave it stopped; `stasis activate ROOT_PID` lets it run.")
    var prepare = false

    @OptionGroup var registry: RegistryOptions

    @OptionGroup var output: OutputOptions

    func validate() throws {
        switch (checkpoint, imagesDir) {
        case (nil, nil): throw ValidationError("name the checkpoint directory: stasis restore DIR (or -D DIR)")
        case (let argument?, let option?) where argument != option:
            throw ValidationError("two checkpoint directories given (\(argument) and -D \(option)): name one")
        default: break
        }
        guard (0...4).contains(logLevel) else { throw ValidationError("--log-level must be between 0 and 4") }
        _ = try parsedGPUMap()
    }

    func parsedGPUMap() throws -> [String: String] {
        guard let gpuMap else { return [:] }
        var map: [String: String] = [:]
        for pair in gpuMap.split(separator: ",") {
            let sides = pair.split(separator: "=", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
            guard sides.count == 2, !sides[0].isEmpty, !sides[1].isEmpty else {
                throw ValidationError("--gpu-map takes OLD=NEW pairs separated by commas; got '\(pair)'")
            }
            guard map[sides[0]] == nil else { throw ValidationError("--gpu-map maps \(sides[0]) twice") }
            map[sides[0]] = sides[1]
        }
        return map
    }

    func run() throws {
        try Output.run(json: output.json) {
            var options = RestoreOperation.Options(directory: directory)
            // From a registry: the copy the store lists already, else a pull that goes on while the restore
            // reads what has arrived.
            var arriving: RegistryPull?
            if let checkpoint, RegistryReference.looksLikeReference(checkpoint) {
                switch try RegistryTransfer.forRestore(try registry.options(checkpoint, store: store.store)) {
                case .local(let local): options.directory = local
                case .arriving(let pull):
                    arriving = pull
                    options.directory = pull.directory
                    options.chunkStore = pull.arrivingStore
                    options.checkpointName = pull.destination
                }
            }
            options.workDirectory = workDirectory
            options.keepLog = keepLog
            options.store = store.store
            options.rebuildRoot = rebuildDir
            options.skipCPUCheck = skipCPUCheck
            options.prefetch = !noPrefetch
            options.containerID = container
            options.bundle = bundle
            options.logLevel = logLevel
            options.prepare = prepare
            options.progress = Output.progressHandler(json: output.json)
            let backends = Backends(gpuMap: try parsedGPUMap())
            options.backends = backends
            var report: RestoreOperation.Report
            do {
                report = try RestoreOperation(options, device: backends.deviceStep()).run()
            } catch {
                // Nothing of the pull is published (its rounds stay in the store for the next one); the error
                // names what failed, a blob that did not come included.
                _ = arriving?.discard(error)
                throw error
            }
            if let arriving {
                // The tree runs (every chunk it read had arrived); what is left of the pull is its publish, for
                // the next restore. Its failure leaves the tree running: a warning, not an error.
                do {
                    report.pulled = try arriving.finish()
                } catch {
                    FileHandle.standardError.write(Data("stasis: warning: the restored tree runs, but the pulled checkpoint was not kept: \(error)\n".utf8))
                }
            }
            Output.clearProgress()
            if output.json { return Output.json(report) }
            for line in report.textLines { print(line) }
        }
    }
}
