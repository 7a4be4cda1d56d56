import Foundation
import Glibc
import StasisCore
import StasisEngine
import StasisImage
import StasisOS
import StasisStore
import StasisTestSupport
import Testing

/// The whole move with a real process: dump, export, lose the original and its store, import into a fresh
/// store, restore, and the workload checks its own state.
extension Integration {
@Suite struct BundleMove {
    @Test func dumpExportImportRestore() throws {
        let workload = try Workload("counter", ["--mem", "32"])
        defer { workload.stop() }
        let root = Harness.scratch("move")
        let first = ["STASIS_STORE": root + "/store-a"]
        #expect(workload.verify().hasPrefix("PASS"))
        let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/ckpt"], environment: first)
        #expect(dump.succeeded, "\(dump.stderr)")
        #expect(Harness.waitGone(workload.pid))
        let manifest = try Checkpoint.readManifest(root + "/ckpt")
        #expect(manifest.store != nil, "dump writes chunked checkpoints")

        let export = try Harness.stasis(["export", root + "/ckpt", "-o", root + "/job.stasis"], environment: first)
        #expect(export.succeeded, "\(export.stderr)")
        let rm = try Harness.stasis(["rm", root + "/ckpt"], environment: first)
        #expect(rm.succeeded, "\(rm.stderr)")
        try FileManager.default.removeItem(atPath: root + "/store-a")

        let second = ["STASIS_STORE": root + "/store-b"]
        let imported = try Harness.stasis(["import", root + "/job.stasis", "-D", root + "/moved"], environment: second)
        #expect(imported.succeeded, "\(imported.stderr)")
        #expect(try Checkpoint.readManifest(root + "/moved").store?.path == root + "/store-b")
        let restore = try Harness.stasis(["restore", "-D", root + "/moved"], environment: second)
        #expect(restore.succeeded, "\(restore.stderr)")
        #expect(restore.stdout.contains("root PID \(workload.pid)"))
        let verdict = workload.verify()
        #expect(verdict.hasPrefix("PASS"), "after the move: \(verdict)")
    }
}
}
