import Foundation
import Glibc
import StasisContainer
import StasisCore
@testable import StasisEngine
import StasisOS
import StasisTestSupport
import Testing

/// Containers through runc (Debian's package; scripts/install-test-deps.sh installs it and busybox-static):
/// a container whose root filesystem the test builds from busybox is checkpointed and restored by runc, which
/// drives CRIU, with the stasis CRIU plugin loaded the way a runc or podman user loads it.
extension Integration {
    @Suite struct RuncContainers {
        /// A busybox container that counts in a shell variable. runc checkpoints it with the stasis plugin in
        /// CRIU's plugin directory (given per container by a CRIU configuration file, the `org.criu.config`
        /// annotation), then restores it: the count goes on from where it was, so the shell's memory came back.
        @Test func runcCheckpointAndRestoreWithTheStasisPlugin() throws {
            let container = try Container.running(name: "count")
            defer { container.remove() }
            let runc = container.runc

            let dump = try Harness.run(runc, ["checkpoint", "--image-path", container.images, "--work-path", container.work + "/dump", container.id])
            #expect(dump.succeeded, "runc checkpoint: \(dump.stderr)\n\(container.log("dump"))")
            #expect(container.log("dump").contains("Plugin \"stasis_cuda\""), "CRIU did not load the stasis plugin")
            // The shell rewrites its count file each tick: frozen between the truncate and the write, it is empty.
            let atCheckpoint = container.count ?? 0
            usleep(300_000)
            #expect(container.count == atCheckpoint, "the container still ran after its checkpoint")

            try container.restore()
            #expect(container.log("restore").contains("Plugin \"stasis_cuda\""))
            #expect(container.waitForCount(atLeast: atCheckpoint + 5), "the restored container does not count on")
            let after = try #require(container.count)
            // A container started afresh would count from 1 again.
            #expect(after > atCheckpoint, "the count restarted (\(after) after \(atCheckpoint)): the shell's memory was not restored")
        }

        /// `stasis dump --container`: runc checkpoints the container, stasis puts its images in the store; the
        /// checkpoint verifies, and `stasis restore` has runc bring the container back, still counting.
        @Test func stasisDumpsAndRestoresARuncContainer() throws {
            let container = try Container.running(name: "stasis")
            defer { container.remove() }
            let runc = container.runc
            let root = Harness.scratch("container-ckpt")
            let checkpoint = root + "/ckpt", store = root + "/store"
            // A process beside the init, as `runc exec` starts one: it is the container's too.
            #expect(try Harness.run("/bin/sh", ["-c", "'\(runc)' exec -d \(container.id) /bin/sleep 1000 </dev/null >/dev/null 2>&1"]).succeeded)
            let besides = try #require(try Runc.locate().processes(container.id).first { ProcFS.arguments($0).last == "1000" })

            let dump = try Harness.stasis("dump", "--container", container.id, "-D", checkpoint, "--store", store)
            #expect(dump.succeeded, "\(dump.stderr)")
            #expect(dump.stdout.contains("checkpointed container \(container.id)"))
            // The shell rewrites its count file each tick: frozen between the truncate and the write, it is empty.
            let atCheckpoint = container.count ?? 0
            #expect(!(try Harness.run(runc, ["state", container.id])).succeeded, "runc still lists the container after the dump")
            let manifest = try Manifest.decode(Data(contentsOf: URL(fileURLWithPath: checkpoint + "/manifest.json")), path: checkpoint)
            // At least the version a stasis that knows containers reads (its memory in content-defined chunks: 6).
            #expect(manifest.formatVersion >= Manifest.versionWithContainer)
            #expect(manifest.container?.id == container.id && manifest.container?.bundle == container.bundle)
            #expect(manifest.files.contains { $0.path.hasPrefix("pages-") && $0.chunks != nil }, "the memory images went to the store")
            #expect(manifest.files.contains { $0.path == "descriptors.json" }, "runc's descriptors.json is kept for its restore")
            #expect(manifest.processTree.processes.contains { $0.pid == besides }, "the process runc exec started is listed")
            #expect(try Harness.stasis("verify", checkpoint, "--store", store).succeeded)

            let restore = try Harness.stasis("restore", "-D", checkpoint, "--store", store)
            #expect(restore.succeeded, "\(restore.stderr)")
            #expect(restore.stdout.contains("as container \(container.id)"))
            #expect(container.waitForCount(atLeast: atCheckpoint + 5), "the restored container does not count on")
            #expect((container.count ?? 0) > atCheckpoint, "the count restarted: the shell's memory was not restored")

            // The restored processes have new PIDs here; matched by their PIDs inside the container, as the GPU
            // steps of a GPU container's restore are (ContainerPIDs).
            #expect(manifest.processTree.processes.first?.namespacePID == 1, "the container's init is PID 1 inside it")
            let restoredRoot = try Runc.locate().state(container.id).pid
            // (The shell's init only: its `sleep` children come and go.)
            let asIfGPU = Manifest.GPUSection(processes: manifest.processTree.processes.prefix(1).map { .init(pid: $0.pid, devices: [], deviceMemoryBytes: 0) })
            let mapped = try ContainerPIDs.remap(asIfGPU, processes: manifest.processTree.processes, restored: try Runc.locate().processes(container.id))
            #expect(mapped.processes.first?.pid == restoredRoot)
            for (old, new) in zip(manifest.processTree.processes, mapped.processes) {
                let inner = ProcFS.namespacePID(new.pid)
                #expect(inner == old.namespacePID, "PID \(old.pid) matched to \(new.pid)")
            }
        }

        /// A container dump that fails after runc has checkpointed the paused container (a fault injected where
        /// a process dump's post-dump step would be) resumes it: it runs on, and no checkpoint appears.
        @Test func aFailingContainerDumpPutsTheContainerBack() throws {
            let container = try Container.running(name: "fault")
            defer { container.remove() }
            let root = Harness.scratch("container-fault")
            let dump = try Harness.stasis(["dump", "--container", container.id, "-D", root + "/ckpt", "--store", root + "/store"],
                                          environment: ["STASIS_FAULT": "post-dump"])
            #expect(!dump.succeeded)
            #expect(dump.stderr.contains("is still running, as it was before the dump"), "\(dump.stderr)")
            #expect(try Runc.locate().state(container.id).status == "running")
            #expect(!FileManager.default.fileExists(atPath: root + "/ckpt"))
            let before = try #require(container.count)
            #expect(container.waitForCount(atLeast: before + 5), "the container does not run on after the failed dump")
        }

        /// A container's checkpoint written as a container checkpoint archive (podman/CRI-O layout), described
        /// by `stasis inspect`, imported into another store, and restored from it under a new ID; a truncated
        /// archive is refused whole.
        @Test func aContainerCheckpointRoundTripsThroughACheckpointArchive() throws {
            let container = try Container.running(name: "archive")
            defer { container.remove() }
            let copy = container.copy()
            defer { copy.remove() }
            let root = Harness.scratch("container-archive")
            #expect(try Harness.stasis("dump", "--container", container.id, "-D", root + "/ckpt", "--store", root + "/store").succeeded)
            // The shell rewrites its count file each tick: frozen between the truncate and the write, it is empty.
            let atCheckpoint = container.count ?? 0
            let export = try Harness.stasis("export", root + "/ckpt", "-o", root + "/ckpt.tar", "--archive")
            #expect(export.succeeded, "\(export.stderr)")
            let listing = try Harness.run("/bin/tar", ["-tf", root + "/ckpt.tar"]).stdout.split(separator: "\n").map(String.init)
            for name in ["config.dump", "spec.dump", "checkpoint/inventory.img", "checkpoint/descriptors.json"] {
                #expect(listing.contains(name), "the archive lacks \(name): \(listing)")
            }
            let inspect = try Harness.stasis("inspect", root + "/ckpt.tar")
            #expect(inspect.succeeded && inspect.stdout.contains("container: \(container.id)"), "\(inspect.stdout)\(inspect.stderr)")

            let imported = try Harness.stasis("import", root + "/ckpt.tar", "-D", root + "/imported", "--store", root + "/other-store")
            #expect(imported.succeeded && imported.stdout.contains("imported container \(container.id)"), "\(imported.stderr)")
            #expect(try Harness.stasis("verify", root + "/imported", "--store", root + "/other-store").succeeded)
            let noBundle = try Harness.stasis("restore", "-D", root + "/imported", "--store", root + "/other-store")
            #expect(!noBundle.succeeded && noBundle.stderr.contains("--bundle"))
            let restore = try Harness.stasis("restore", "-D", root + "/imported", "--store", root + "/other-store",
                                             "--bundle", container.bundle, "--container", copy.id)
            #expect(restore.succeeded, "\(restore.stderr)")
            #expect(copy.waitForCount(atLeast: atCheckpoint + 5), "the container restored from the archive does not count on")

            // Cut short: refused, and no checkpoint directory appears.
            let size = try #require(FileSystem.size(root + "/ckpt.tar"))
            #expect(truncate(root + "/ckpt.tar", off_t(size / 2)) == 0)
            let truncated = try Harness.stasis("import", root + "/ckpt.tar", "-D", root + "/half", "--store", root + "/other-store")
            #expect(!truncated.succeeded && truncated.stderr.contains("truncated"), "\(truncated.stderr)")
            #expect(!FileManager.default.fileExists(atPath: root + "/half"))
        }

        /// An archive laid out as podman writes one (made here with runc and GNU tar: config.dump with podman's
        /// extra keys and fractional-second time, spec.dump marked libpod, a rootfs-diff.tar), compressed with
        /// zstd as podman 4 compresses by default, imports and restores; the same archive gzip-compressed
        /// imports too; a damaged zstd stream is refused with nothing imported. (A real `podman container
        /// checkpoint --export` of this machine is zstd: that is how stasis was found to refuse it.)
        @Test func aPodmanStyleArchiveImportsAndRestores() throws {
            let container = try Container.running(name: "podman")
            defer { container.remove() }
            let copy = container.copy()
            defer { copy.remove() }
            let root = Harness.scratch("podman-archive")
            let layout = root + "/layout"
            try FileManager.default.createDirectory(atPath: layout, withIntermediateDirectories: true)
            let dump = try Harness.run(container.runc, ["checkpoint", "--image-path", layout + "/checkpoint", "--work-path", root + "/work", container.id])
            #expect(dump.succeeded, "\(dump.stderr)")
            // The shell rewrites its count file each tick: frozen between the truncate and the write, it is empty.
            let atCheckpoint = container.count ?? 0
            var spec = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: container.bundle + "/config.json"))) as? [String: Any])
            var annotations = spec["annotations"] as? [String: String] ?? [:]
            annotations["io.container.manager"] = "libpod"
            spec["annotations"] = annotations
            try JSONSerialization.data(withJSONObject: spec).write(to: URL(fileURLWithPath: layout + "/spec.dump"))
            try Data(#"{"id":"0123456789abcdef","name":"magical_test","rootfsImageName":"quay.io/example/counter:latest","runtime":"runc","createdTime":"2026-11-29T09:43:52.123456789Z","checkpointed":true}"#.utf8)
                .write(to: URL(fileURLWithPath: layout + "/config.dump"))
            try Data("[]".utf8).write(to: URL(fileURLWithPath: layout + "/deleted.files"))
            #expect(try Harness.run("/bin/tar", ["-cf", layout + "/rootfs-diff.tar", "-T", "/dev/null"]).succeeded)
            #expect(try Harness.run("/bin/tar", ["--zstd", "-cf", root + "/podman.tar", "-C", layout, "."]).succeeded)
            #expect(try Harness.run("/bin/tar", ["-czf", root + "/podman.tar.gz", "-C", layout, "."]).succeeded)

            let inspect = try Harness.stasis("inspect", root + "/podman.tar")
            #expect(inspect.stdout.contains("written by libpod") && inspect.stdout.contains("magical_test"), "\(inspect.stdout)\(inspect.stderr)")
            let imported = try Harness.stasis("import", root + "/podman.tar", "-D", root + "/imported", "--store", root + "/store")
            #expect(imported.succeeded && imported.stdout.contains("written by libpod"), "\(imported.stdout)\(imported.stderr)")
            #expect(FileManager.default.fileExists(atPath: root + "/imported/archive/rootfs-diff.tar"), "the engine's own files are kept")
            let restore = try Harness.stasis("restore", "-D", root + "/imported", "--store", root + "/store", "--bundle", container.bundle, "--container", copy.id)
            #expect(restore.succeeded, "\(restore.stderr)")
            #expect(copy.waitForCount(atLeast: atCheckpoint + 5), "the container restored from the podman-style archive does not count on")

            let gzipped = try Harness.stasis("import", root + "/podman.tar.gz", "-D", root + "/gzipped", "--store", root + "/store-gz")
            #expect(gzipped.succeeded && gzipped.stdout.contains("written by libpod"), "\(gzipped.stdout)\(gzipped.stderr)")
            // One byte flipped at a time, anywhere past zstd's frame header (the quarters, and places drawn
            // from a seed printed on failure): zstd's checksum covers every byte, and import reads the stream
            // to its end, so each must be refused.
            let original = try Data(contentsOf: URL(fileURLWithPath: root + "/podman.tar"))
            let seed = UInt64.random(in: 1...UInt64.max)
            var state = seed
            var places = [original.count / 4, original.count / 2, original.count * 3 / 4, original.count - 1]
            for _ in 0..<4 {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17
                places.append(16 + Int(state % UInt64(original.count - 16)))
            }
            for (number, place) in places.enumerated() {
                var damaged = original
                damaged[place] ^= 0xFF
                try damaged.write(to: URL(fileURLWithPath: root + "/damaged.tar"))
                let target = root + "/damaged-\(number)"
                let refused = try Harness.stasis("import", root + "/damaged.tar", "-D", target, "--store", root + "/store-damaged")
                #expect(!refused.succeeded && refused.stderr.contains("import of"),
                        "byte \(place) of \(original.count) flipped (seed \(seed)) was imported: \(refused.stdout)\(refused.stderr)")
                #expect(!FileManager.default.fileExists(atPath: target))
            }
        }

        @Test func aContainerRuncDoesNotKnowIsAClearError() throws {
            let missing = try Harness.stasis("dump", "--container", "no-such-container-\(getpid())", "-D", Harness.scratch("no-container") + "/ckpt")
            #expect(missing.status != 0 && missing.stderr.contains("runc knows no container"), "\(missing.stderr)")
            let both = try Harness.stasis("dump", "1", "--container", "x", "-D", Harness.scratch("no-container") + "/ckpt")
            #expect(both.status != 0 && both.stderr.contains("not both"), "\(both.stderr)")
        }
    }
}

/// A runc container built for a test: a bundle with a busybox root filesystem, the shell loop as its process,
/// and a CRIU configuration that loads the plugins stasis builds.
struct Container {
    let runc: String
    let id: String
    let bundle: String
    let images: String
    let work: String

    /// A container made and started, counting already.
    static func running(name: String) throws -> Container {
        let runc = try #require(Spawn.which("runc"), "runc is missing: scripts/install-test-deps.sh installs it")
        let container = try make(runc: runc, name: name)
        do {
            try container.start()
            guard container.waitForCount(atLeast: 20) else { throw Workload.WorkloadError(text: "container \(name) did not start counting") }
        } catch {
            container.remove()
            throw error
        }
        return container
    }

    /// The same bundle under another ID: where a restore under a new name lands.
    func copy() -> Container { Container(runc: runc, id: id + "-copy", bundle: bundle, images: images, work: work) }

    static func make(runc: String, name: String) throws -> Container {
        let root = Harness.scratch("runc-\(name)")
        let bundle = root + "/bundle", rootfs = bundle + "/rootfs"
        let busybox = try #require(["/bin/busybox", "/usr/bin/busybox"].first { FileManager.default.isExecutableFile(atPath: $0) },
                                   "busybox is missing: scripts/install-test-deps.sh installs busybox-static")
        for directory in ["bin", "proc", "sys", "dev", "tmp"] {
            try FileManager.default.createDirectory(atPath: rootfs + "/" + directory, withIntermediateDirectories: true)
        }
        try FileManager.default.copyItem(atPath: busybox, toPath: rootfs + "/bin/busybox")
        for applet in ["sh", "sleep", "echo"] { try FileManager.default.createSymbolicLink(atPath: rootfs + "/bin/" + applet, withDestinationPath: "busybox") }
        let spec = try Harness.run(runc, ["spec", "--bundle", bundle])
        guard spec.succeeded else { throw Workload.WorkloadError(text: "runc spec: \(spec.stderr)") }
        // CRIU reads this for every runc checkpoint and restore of the container: the stasis plugin's directory,
        // and no iptables for locking the container's network (it has only a loopback).
        let plugins = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().path + "/.build/criu-plugins"
        try "libdir \(plugins)\nnetwork-lock skip\n".write(toFile: root + "/criu.conf", atomically: true, encoding: .utf8)
        let configPath = bundle + "/config.json"
        var config = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: configPath))) as? [String: Any])
        var process = config["process"] as? [String: Any] ?? [:]
        process["terminal"] = false
        process["args"] = ["/bin/sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"]
        config["process"] = process
        var rootEntry = config["root"] as? [String: Any] ?? [:]
        rootEntry["readonly"] = false
        config["root"] = rootEntry
        config["annotations"] = ["org.criu.config": root + "/criu.conf"]
        try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted]).write(to: URL(fileURLWithPath: configPath))
        let container = Container(runc: runc, id: "stasis-test-\(name)-\(getpid())", bundle: bundle, images: root + "/images", work: root + "/work")
        try FileManager.default.createDirectory(atPath: container.images, withIntermediateDirectories: true)
        return container
    }

    /// The container's stdio is /dev/null: CRIU cannot carry a descriptor of a file outside the container,
    /// and pipes to the test would keep it waiting for their end. runc's own errors go to its --log.
    private func detached(_ arguments: [String]) throws {
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        let errors = "\(work)/\(arguments[0]).runc.log"
        let command = ([runc, "--log", errors] + arguments).map { "'\($0)'" }.joined(separator: " ") + " </dev/null >/dev/null 2>&1"
        let result = try Harness.run("/bin/sh", ["-c", command])
        guard result.succeeded else {
            throw Workload.WorkloadError(text: "runc \(arguments[0]) failed: \((try? String(contentsOfFile: errors, encoding: .utf8)) ?? "")")
        }
    }

    func start() throws { try detached(["run", "-d", "--bundle", bundle, id]) }

    func restore() throws {
        try detached(["restore", "-d", "--image-path", images, "--work-path", work + "/restore", "--bundle", bundle, id])
    }

    /// CRIU's log of runc's dump or restore.
    func log(_ step: String) -> String { (try? String(contentsOfFile: "\(work)/\(step)/\(step).log", encoding: .utf8)) ?? "" }

    var count: Int? {
        (try? String(contentsOfFile: bundle + "/rootfs/tmp/count", encoding: .utf8)).flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    func waitForCount(atLeast value: Int, timeout: Double = 10) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let count, count >= value { return true }
            usleep(20_000)
        }
        return false
    }

    func remove() {
        _ = try? Harness.run(runc, ["kill", id, "KILL"])
        _ = try? Harness.run(runc, ["delete", "--force", id])
    }
}

/// A container has its own network namespace, and with it its own abstract socket names (where an agent
/// listens): stasis reaches them with a socket made inside that namespace.
@Suite struct NetworkNamespaces {
    @Test func aSocketMadeInAProcessNetworkNamespaceReachesItsAbstractNames() throws {
        let name = "stasis-netns-test-\(getpid())"
        let ready = Harness.scratch("netns") + "/ready"
        let script = """
        import socket, sys
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("\\0\(name)")
        s.listen(1)
        open("\(ready)", "w").close()
        c, _ = s.accept()
        c.sendall(b"hello")
        """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
        process.arguments = ["--net", "python3", "-c", script]
        try process.run()
        defer { process.terminate() }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: ready), Date() < deadline { usleep(20_000) }
        // unshare execs python3: the listener is the same PID.
        let pid = process.processIdentifier
        #expect(try UnixSocket.connect(abstract: name, inNetworkNamespaceOf: getpid()) == nil,
                "the name must not be visible from this network namespace")
        let inside = try #require(try UnixSocket.connect(abstract: name, inNetworkNamespaceOf: pid))
        defer { inside.closeQuietly() }
        var reply = [UInt8](repeating: 0, count: 5)
        #expect(try reply.withUnsafeMutableBytes { try inside.read(filling: $0) } == 5 && reply == Array("hello".utf8))
        #expect(UnixSocket.peerPID(inside) == pid)
    }
}
