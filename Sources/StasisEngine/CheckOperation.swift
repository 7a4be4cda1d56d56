import Foundation
import StasisCRIU
import StasisContainer
import StasisCore
import StasisGPU
import StasisOS
import StasisStore

/// `stasis check`: what this machine can do, and how to fix what it cannot.
public struct CheckOperation {
    public struct Report: Codable, Sendable {
        public struct CRIU: Codable, Sendable {
            public var found: Bool
            public var path: String?
            public var version: String?
            /// CRIU's own `criu check` through RPC.
            public var kernelCheck: Bool?
            public var kernelCheckDetail: String?
            public var memoryTracking: Bool?
            public var lazyPages: Bool?
            public var pidfdStore: Bool?
            public var problem: String?
            public var hint: String?
            public var warnings: [String] = []
        }
        /// The chunk store new checkpoints go to, and room on its filesystem.
        public struct Store: Codable, Sendable {
            public var path: String
            public var exists: Bool
            public var checkpoints: Int?
            public var chunks: Int?
            public var chunkBytes: UInt64?
            public var freeBytes: UInt64?
        }
        public var kernel: String
        public var root: Bool
        public var criu: CRIU
        public var gpu: GPUReport
        public var store: Store
        /// runc, for `stasis dump --container` (nil when it is not on the PATH).
        public var runc: String?
        /// True when CPU checkpoint/restore works here.
        public var ready: Bool
    }

    public init() {}

    public func run() -> Report {
        let host = HostFacts.current()
        var criu = Report.CRIU(found: false)
        do {
            let binary = try CRIUBinary.locate()
            criu.found = true
            criu.path = binary.path
            criu.version = binary.version
            criu.warnings += Self.knownIncompatibilities(criu: binary.version, kernel: host.kernel)
            let service = CRIUService(binary: binary)
            let scratch = try FileSystem.makeStagingSibling(of: NSTemporaryDirectory() + "stasis-check", owner: ThisProcess.pid)
            defer { FileSystem.removeTree(scratch) }
            let fd = try FileSystem.openDirectory(scratch)
            defer { fd.closeQuietly() }
            let response = try service.check(workDirectory: fd)
            criu.kernelCheck = response.succeeded
            if !response.succeeded {
                let excerpt = CRIULog.excerpt(path: scratch + "/criu-check.log", limit: 5)
                criu.kernelCheckDetail = ([response.problem] + excerpt).joined(separator: "\n")
                criu.problem = "CRIU's kernel check failed"
                criu.hint = "run `criu check --all` for details; the kernel needs CONFIG_CHECKPOINT_RESTORE"
            }
            let features = try service.features()
            criu.memoryTracking = features.memoryTracking
            criu.lazyPages = features.lazyPages
            criu.pidfdStore = features.pidfdStore
        } catch let error as StasisError {
            criu.problem = error.message
            criu.hint = error.hint
        } catch {
            criu.problem = "\(error)"
        }
        let root = ThisProcess.isRoot
        if root == false, criu.problem == nil {
            criu.hint = "run stasis as root: CRIU needs CAP_SYS_ADMIN"
        }
        // No runtime is a report line ("not found"), not a failure: only containers need one.
        let runtime = try? Backends().containerRuntime()
        return Report(kernel: host.kernel, root: root, criu: criu, gpu: GPUReport.probe(), store: Self.storeReport(),
                      runc: runtime.map(\.path), ready: criu.found && criu.kernelCheck == true && root)
    }

    static func storeReport() -> Report.Store {
        let path = StoreLocation.resolve(nil, recorded: nil)
        var report = Report.Store(path: path, exists: false)
        // A store that cannot be opened is reported as not there yet: the first dump creates it.
        if let store = try? Backends().openStore(path, create: false) {
            let catalog = StoreCatalog(store: store)
            let usage = catalog.usage()
            report.exists = true
            // An unreadable catalog leaves the count out of the report; the rest of it still stands.
            report.checkpoints = (try? catalog.entries())?.count
            (report.chunks, report.chunkBytes) = (usage.chunks, usage.bytes)
        }
        // Free space where the store is, or would be created.
        var probe = path
        while !FileSystem.exists(probe), probe != "/" { probe = URL(fileURLWithPath: probe).deletingLastPathComponent().path }
        report.freeBytes = FileSystem.availableBytes(at: probe)
        return report
    }

    /// Combinations of CRIU and kernel known to fail on some processes, from what we saw.
    static func knownIncompatibilities(criu: String, kernel: String) -> [String] {
        func numbers(_ text: String) -> [Int] {
            text.split(whereSeparator: { !$0.isNumber }).prefix(2).compactMap { Int($0) }
        }
        let c = numbers(criu), k = numbers(kernel)
        guard c.count == 2, k.count == 2 else { return [] }
        if (c[0], c[1]) < (4, 2), (k[0], k[1]) >= (6, 16) {
            return ["CRIU \(criu) cannot dump INET (TCP/UDP) sockets on kernel \(kernel) (\"Can't get 1:16 opt\": SO_PASSCRED is refused on non-UNIX sockets since 6.16); CRIU 4.2 fixes it (scripts/install-criu.sh installs it)"]
        }
        return []
    }
}
