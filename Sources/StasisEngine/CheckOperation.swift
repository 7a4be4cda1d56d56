import Foundation
import Glibc
import StasisCRIU
import StasisCore
import StasisGPU
import StasisOS

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
        }
        public var kernel: String
        public var root: Bool
        public var criu: CRIU
        public var gpu: GPUReport
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
            let service = CRIUService(binary: binary)
            let scratch = try FileSystem.makeStagingSibling(of: NSTemporaryDirectory() + "stasis-check", owner: getpid())
            defer { FileSystem.removeTree(scratch) }
            let fd = try FileSystem.openDirectory(scratch)
            defer { close(fd) }
            let response = try service.check(workDirectory: fd)
            criu.kernelCheck = response.success
            if !response.success {
                let excerpt = CRIULog.excerpt(path: scratch + "/criu-check.log", limit: 5)
                criu.kernelCheckDetail = ([CRIUService.describe(response)] + excerpt).joined(separator: "\n")
                criu.problem = "CRIU's kernel check failed"
                criu.hint = "run `criu check --all` for details; the kernel needs CONFIG_CHECKPOINT_RESTORE"
            }
            let features = try service.features()
            criu.memoryTracking = features.memTrack
            criu.lazyPages = features.lazyPages
            criu.pidfdStore = features.pidfdStore
        } catch let error as StasisError {
            criu.problem = error.message
            criu.hint = error.hint
        } catch {
            criu.problem = "\(error)"
        }
        let root = geteuid() == 0
        if root == false, criu.problem == nil {
            criu.hint = "run stasis as root: CRIU needs CAP_SYS_ADMIN"
        }
        return Report(kernel: host.kernel, root: root, criu: criu, gpu: GPUReport.probe(),
                      ready: criu.found && criu.kernelCheck == true && root)
    }
}
