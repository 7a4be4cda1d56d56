import Foundation
import Glibc
import StasisOS
import StasisTestSupport
import Testing

/// Real containerd (Debian's 1.6) with runc: a container started by `ctr run` with the stasis CRIU plugin in
/// its CRIU configuration file (the `org.criu.config` annotation) is checkpointed by `ctr containers
/// checkpoint` and restored by `ctr containers restore`, the plugin loaded both times, and its shell counts on
/// from where it was; the checkpoint image containerd made, exported, is described by `stasis inspect`.
/// containerd runs as a daemon of the test's own (its socket, root and state in the scratch directory).
extension Integration {
@Suite(.serialized) struct Containerd {
    final class Daemon {
        let root: String
        let socket: String
        let pid: pid_t

        init() throws {
            root = Harness.scratch("containerd")
            socket = root + "/containerd.sock"
            let out = try FileDescriptor.open(root + "/containerd.log", .writeOnly, options: [.create, .append], permissions: .ownerReadWrite)
            let err = try FileDescriptor.open(root + "/containerd.log", .writeOnly, options: [.create, .append], permissions: .ownerReadWrite)
            let null = try FileDescriptor.open("/dev/null", .readOnly)
            defer { [out, err, null].forEach { $0.closeQuietly() } }
            pid = try Spawn.start("/usr/bin/containerd", ["--address", socket, "--root", root + "/root", "--state", root + "/state"],
                                  descriptors: [null: 0, out: 1, err: 2])
            let deadline = Date().addingTimeInterval(20)
            while try !FileSystem.exists(socket) || !ctr(["version"]).succeeded {
                guard Date() < deadline else { throw Workload.WorkloadError(text: "containerd did not start: \(logText)") }
                usleep(100_000)
            }
        }

        var logText: String { (try? String(contentsOfFile: root + "/containerd.log", encoding: .utf8)) ?? "" }

        func ctr(_ arguments: [String]) throws -> Harness.Result {
            try Harness.runLeavingDaemons("/usr/bin/ctr", ["--address", socket] + arguments)
        }

        /// The root filesystem of a running container (its task's bundle).
        func rootfs(_ id: String) -> String { root + "/state/io.containerd.runtime.v2.task/default/\(id)/rootfs" }

        func removeContainer(_ id: String) {
            _ = try? ctr(["task", "kill", "-s", "KILL", id])
            for _ in 0..<50 where (try? ctr(["task", "rm", id]))?.succeeded != true { usleep(100_000) }
            _ = try? ctr(["containers", "rm", id])
        }

        deinit {
            kill(pid, SIGTERM)
            Spawn.reap([pid], within: 10)
            kill(pid, SIGKILL)
            Spawn.reap([pid], within: 2)
        }
    }

    static func count(_ rootfs: String) -> Int? {
        (try? String(contentsOfFile: rootfs + "/tmp/count", encoding: .utf8)).flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    @Test func containerdCheckpointsAndRestoresWithThePluginAndStasisReadsItsImage() throws {
        let daemon = try Daemon()
        // A busybox image, made by podman (`podman save --format oci-archive`) and imported into containerd.
        let podmanImage = try Integration.Podman.image()
        defer { _ = try? Integration.Podman.run(["rmi", "-f", podmanImage]) }
        let saved = try Integration.Podman.run(["save", "--format", "oci-archive", "-o", daemon.root + "/image.tar", podmanImage])
        try #require(saved.succeeded, "\(saved.stderr)")
        let imported = try daemon.ctr(["image", "import", daemon.root + "/image.tar"])
        try #require(imported.succeeded, "\(imported.stderr)")
        // Named by the archive's org.opencontainers.image.ref.name, the full name podman gave it.
        let image = podmanImage
        try #require(try daemon.ctr(["image", "ls", "-q"]).stdout.split(separator: "\n").contains { $0 == image }, "containerd lacks \(image)")

        // CRIU's configuration for this container: the stasis plugin's directory, and a log stasis can read.
        let plugins = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().path + "/.build/criu-plugins"
        let conf = daemon.root + "/criu.conf"
        func configure(log: String) throws {
            try "libdir \(plugins)\nnetwork-lock skip\nlog-file \(daemon.root)/\(log)\n".write(toFile: conf, atomically: true, encoding: .utf8)
        }
        try configure(log: "criu-dump.log")
        let id = "stasis-test-\(getpid())"
        defer { daemon.removeContainer(id) }
        let started = try daemon.ctr(["run", "-d", "--annotation", "org.criu.config=" + conf, image, id,
                                      "/bin/sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"])
        try #require(started.succeeded, "\(started.stderr)")
        let rootfs = daemon.rootfs(id)
        let deadline = Date().addingTimeInterval(10)
        while (Self.count(rootfs) ?? 0) < 20 && Date() < deadline { usleep(50_000) }

        let reference = "localhost/stasis-test-checkpoint:\(getpid())"
        let checkpoint = try daemon.ctr(["containers", "checkpoint", "--task", "--rw", id, reference])
        try #require(checkpoint.succeeded, "\(checkpoint.stderr)\n\(daemon.logText.suffix(2000))")
        let frozenAt = try #require(Self.count(rootfs))
        let dumpLog = (try? String(contentsOfFile: daemon.root + "/criu-dump.log", encoding: .utf8)) ?? ""
        #expect(dumpLog.contains("Plugin \"stasis_cuda\""), "CRIU did not load the stasis plugin for containerd's checkpoint")

        // stasis reads containerd's checkpoint image.
        let exported = daemon.root + "/checkpoint-image.tar"
        let export = try daemon.ctr(["image", "export", "--skip-manifest-json", exported, reference])
        try #require(export.succeeded, "\(export.stderr)")
        let inspect = try Harness.stasis(["inspect", exported, "--json"])
        try #require(inspect.succeeded, "\(inspect.stderr)")
        let summary = try #require(try JSONSerialization.jsonObject(with: Data(inspect.stdout.utf8)) as? [String: Any])
        #expect((summary["engine"] as? String ?? "").hasPrefix("containerd"), "\(summary)")
        #expect(summary["runtime"] as? String == "io.containerd.runc.v2", "\(summary)")
        #expect((summary["pagesBytes"] as? Int ?? 0) > 0 && (summary["checkpointBytes"] as? Int ?? 0) > (summary["pagesBytes"] as? Int ?? 0), "\(summary)")
        #expect((summary["files"] as? [String] ?? []).contains("checkpoint/inventory.img"), "\(summary)")
        #expect(summary["rootfsDiffBytes"] as? Int != nil, "the writable layer (--rw) is described: \(summary)")
        let importing = try Harness.stasis(["import", exported, "-D", daemon.root + "/imported"])
        #expect(!importing.succeeded && importing.stderr.contains("is an OCI image"), "\(importing.stderr)")
        #expect(!FileSystem.exists(daemon.root + "/imported"))

        // containerd restores it, the plugin loaded again; the shell counts on from the checkpoint.
        daemon.removeContainer(id)
        try configure(log: "criu-restore.log")
        let restored = try daemon.ctr(["containers", "restore", "--rw", "--live", id, reference])
        try #require(restored.succeeded, "\(restored.stderr)\n\(daemon.logText.suffix(2000))")
        let restoreLog = (try? String(contentsOfFile: daemon.root + "/criu-restore.log", encoding: .utf8)) ?? ""
        #expect(restoreLog.contains("Plugin \"stasis_cuda\""), "CRIU did not load the stasis plugin for containerd's restore")
        // The writable layer came back with the checkpoint's count; the first count written after it must go on.
        let restoredRootfs = daemon.rootfs(id)
        var next: Int?
        let until = Date().addingTimeInterval(10)
        while Date() < until {
            if let count = Self.count(restoredRootfs), count != frozenAt { next = count; break }
            usleep(20_000)
        }
        #expect((next ?? 0) > frozenAt, "after the restore the count is \(String(describing: next)), not past \(frozenAt)")
        _ = try? daemon.ctr(["image", "rm", reference])
    }
}
}
