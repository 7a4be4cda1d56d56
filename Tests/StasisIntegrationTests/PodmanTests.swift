import Foundation
import StasisCore
import StasisOS
import StasisTestSupport
import Testing

/// Real podman (Debian's 4.3) at both ends of stasis's checkpoint archives:
/// - a container podman checkpointed (`podman container checkpoint --export`, zstd by default, or gzip) is
///   imported by stasis and restored under runc, and its shell counts on from where it was;
/// - a container podman made and stasis checkpointed (`stasis dump --container`, `stasis export --archive`),
///   and an archive of podman's passed through stasis's store, are restored by `podman container restore
///   --import`;
/// - the same container checkpointed twice: the second import adds only what changed;
/// - archives that are cut short, damaged, hold a file no engine writes, or come from a newer CRIU: refused.
///
/// How podman runs here (and on CI, a machine like this one): `--cgroup-manager cgroupfs` and `--runtime runc`
/// (crun refuses this host's hybrid cgroups: "cgroups in hybrid mode not supported"), `--ulimit nofile/nproc`
/// below the sandbox's hard limits (podman's defaults are above them: "setrlimit RLIMIT_NOFILE: Operation not
/// permitted"), `--network none` (no netavark network to carry). podman's pre-checkpoint needs CRIU's dirty
/// memory tracking, which this kernel lacks ("Dirty tracking is OFF"), so the twice-checkpointed case uses two
/// full checkpoints.
extension Integration {
@Suite(.serialized) struct Podman {
    static let podman = "/usr/bin/podman"
    static let global = ["--cgroup-manager", "cgroupfs"]
    static let runOptions = ["--runtime", "runc", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

    static func run(_ arguments: [String]) throws -> Harness.Result {
        try Harness.runLeavingDaemons(podman, global + arguments)
    }

    /// An image of a static busybox, made without a registry (`podman import` of a root filesystem tar).
    static func image() throws -> String {
        let root = Harness.scratch("podman-image"), rootfs = root + "/rootfs"
        let busybox = try #require(["/bin/busybox", "/usr/bin/busybox"].first { FileManager.default.isExecutableFile(atPath: $0) })
        for directory in ["bin", "proc", "sys", "dev", "tmp"] {
            try FileManager.default.createDirectory(atPath: rootfs + "/" + directory, withIntermediateDirectories: true)
        }
        try FileManager.default.copyItem(atPath: busybox, toPath: rootfs + "/bin/busybox")
        for applet in ["sh", "sleep", "echo", "head", "base64"] {
            try FileManager.default.createSymbolicLink(atPath: rootfs + "/bin/" + applet, withDestinationPath: "busybox")
        }
        #expect(try Harness.run("/bin/tar", ["-C", rootfs, "-cf", root + "/rootfs.tar", "."]).succeeded)
        let name = "localhost/stasis-test-busybox:\(getpid())-\(UInt16.random(in: 0...UInt16.max))"
        let imported = try run(["import", root + "/rootfs.tar", name])
        try #require(imported.succeeded, "\(imported.stderr)")
        return name
    }

    /// A running container whose shell counts into /tmp/count, holding `memory` MiB of random text in a
    /// variable (memory that does not change between checkpoints); its root filesystem, mounted by podman.
    static func counting(_ image: String, name: String, memory: Int = 0) throws -> String {
        let hold = memory > 0 ? "s=$(head -c \(memory * 786_432) /dev/urandom | base64 -w0); " : ""
        let started = try run(["run", "-d"] + runOptions + ["--name", name, image,
                               "/bin/sh", "-c", hold + "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"])
        try #require(started.succeeded, "\(started.stderr)")
        let rootfs = try mountpoint(name)
        try #require(waitForCount(rootfs, atLeast: 20), "the container \(name) does not count")
        return rootfs
    }

    /// A counting container (`counting`) of a fresh image, and a scratch directory; `remove` takes the
    /// container and the image away.
    struct Fixture {
        let image: String
        let name: String
        let rootfs: String
        let root: String

        init(_ label: String, memory: Int = 0) throws {
            image = try Podman.image()
            name = "stasis-test-podman-\(label)-\(getpid())"
            root = Harness.scratch("podman-\(label)")
            do {
                rootfs = try Podman.counting(image, name: name, memory: memory)
            } catch {
                Podman.remove(name)
                _ = try? Podman.run(["rmi", "-f", image])
                throw error
            }
        }

        func remove() {
            Podman.remove(name)
            _ = try? Podman.run(["rmi", "-f", image])
        }
    }

    static func mountpoint(_ name: String) throws -> String {
        let mount = try run(["mount", name])
        try #require(mount.succeeded, "\(mount.stderr)")
        return mount.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The count the shell last wrote, or nil when the file is missing or empty: the shell's `echo $i >
    /// /tmp/count` truncates before it writes, and a checkpoint can freeze it between the two.
    static func count(_ rootfs: String) -> Int? {
        (try? String(contentsOfFile: rootfs + "/tmp/count", encoding: .utf8)).flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    static func waitForCount(_ rootfs: String, atLeast value: Int, seconds: Double = 10) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let count = count(rootfs), count >= value { return true }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return false
    }

    /// What the running shell has counted to (an empty file between its truncate and write is waited out).
    /// Tests read it just before a checkpoint, a lower bound of the count the checkpoint holds, never after:
    /// the checkpoint may have frozen the shell between truncating and writing (the file then stays empty),
    /// and podman's cleanup of the stopped container may unmount `rootfs` (CI, 2026-12-07: nil read after
    /// `stasis dump --container`).
    static func countNow(_ rootfs: String) throws -> Int {
        try #require(firstCount(rootfs), "the shell in \(rootfs) wrote no count")
    }

    /// The first count a restored container writes: its memory came back when it goes on from `frozenAt`
    /// (a container started afresh would write 1, 2, ...).
    static func firstCount(_ rootfs: String, seconds: Double = 10) -> Int? {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let count = count(rootfs) { return count }
            Thread.sleep(forTimeInterval: 0.02)
        }
        return nil
    }

    static func remove(_ names: String...) { for name in names { _ = try? run(["rm", "-f", name]) } }

    /// The bundle runc restores into: podman's spec of the container (spec.dump in the archive), with its
    /// root filesystem where podman mounts it.
    static func bundle(from archive: String, rootfs: String, at directory: String) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let spec = try Harness.run("/bin/sh", ["-c", "tar -xOf '\(archive)' spec.dump"])
        try #require(spec.succeeded, "\(spec.stderr)")
        var object = try #require(try JSONSerialization.jsonObject(with: Data(spec.stdout.utf8)) as? [String: Any])
        var root = object["root"] as? [String: Any] ?? [:]
        root["path"] = rootfs
        object["root"] = root
        try JSONSerialization.data(withJSONObject: object).write(to: URL(fileURLWithPath: directory + "/config.json"))
    }

    static func statistics(_ result: Harness.Result) throws -> [String: Any] {
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any], "\(result.stdout)")
        return try #require(object["statistics"] as? [String: Any])
    }

    @Test(arguments: ["zstd", "gzip"])
    func aContainerPodmanCheckpointedRestoresUnderStasis(compression: String) throws {
        let fixture = try Fixture("\(compression)")
        defer { fixture.remove() }
        let (name, rootfs, root) = (fixture.name, fixture.rootfs, fixture.root)
        let archive = root + "/checkpoint.tar"
        let frozenAt = try Self.countNow(rootfs)
        let checkpoint = try Self.run(["container", "checkpoint", "--compress", compression, "--export=" + archive, name])
        try #require(checkpoint.succeeded, "\(checkpoint.stderr)")

        let inspect = try Harness.stasis(["inspect", archive])
        #expect(inspect.succeeded && inspect.stdout.contains("libpod"), "\(inspect.stdout)\(inspect.stderr)")
        let environment = ["STASIS_STORE": root + "/store"]
        let imported = try Harness.stasis(["import", archive, "-D", root + "/imported"], environment: environment)
        try #require(imported.succeeded, "\(imported.stderr)")

        try Self.bundle(from: archive, rootfs: rootfs, at: root + "/bundle")
        let restore = try Harness.stasis(["restore", "-D", root + "/imported", "--bundle", root + "/bundle"], environment: environment)
        try #require(restore.succeeded, "\(restore.stderr)")
        let id = try #require(restore.stdout.split(separator: " ").map { String($0).trimmingCharacters(in: .punctuationCharacters) }.first { $0.count == 64 },
                              "\(restore.stdout)")
        defer {
            _ = try? Harness.run("/usr/sbin/runc", ["kill", id, "KILL"])
            Thread.sleep(forTimeInterval: 0.3)
            _ = try? Harness.run("/usr/sbin/runc", ["delete", "-f", id])
        }
        // The shell's memory came back: it counts on from where it was, not from 1.
        #expect(Self.waitForCount(rootfs, atLeast: frozenAt + 10), "the count stays at \(String(describing: Self.count(rootfs)))")
    }

    /// podman reads what stasis writes: a podman container checkpointed by stasis through runc (its
    /// config.dump made from what containers/storage knows of it), and a podman archive that went through
    /// stasis's store and came out as stasis's own tar.
    @Test func podmanRestoresTheArchivesStasisWrites() throws {
        let fixture = try Fixture("back")
        defer { fixture.remove() }
        let (name, rootfs, root) = (fixture.name, fixture.rootfs, fixture.root)
        let idResult = try Self.run(["inspect", "--format", "{{.ID}}", name])
        let id = idResult.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let environment = ["STASIS_STORE": root + "/store"]

        // 1. stasis checkpoints podman's container through runc, and writes an archive for podman.
        let frozenAt = try Self.countNow(rootfs)
        let dump = try Harness.stasis(["dump", "--container", id, "-D", root + "/dumped"], environment: environment)
        try #require(dump.succeeded, "\(dump.stderr)")
        let export = try Harness.stasis(["export", root + "/dumped", "-o", root + "/stasis.tar", "--archive"], environment: environment)
        try #require(export.succeeded, "\(export.stderr)")
        try Self.expectPodmanRestores(root + "/stasis.tar", replacing: name, past: frozenAt)

        // 2. podman's own archive of it, imported into stasis's store and exported again by stasis.
        let again = try Self.countNow(try Self.mountpoint(name))
        let checkpoint = try Self.run(["container", "checkpoint", "--export=" + root + "/podman.tar", name])
        try #require(checkpoint.succeeded, "\(checkpoint.stderr)")
        let imported = try Harness.stasis(["import", root + "/podman.tar", "-D", root + "/imported"], environment: environment)
        try #require(imported.succeeded, "\(imported.stderr)")
        let reexport = try Harness.stasis(["export", root + "/imported", "-o", root + "/through-stasis.tar", "--archive"], environment: environment)
        try #require(reexport.succeeded, "\(reexport.stderr)")
        try Self.expectPodmanRestores(root + "/through-stasis.tar", replacing: name, past: again)
    }

    /// stasis pushes a container's checkpoint as a checkpoint image (`push --archive`); podman pulls it from
    /// the registry and restores the container from it, counting on from where it was.
    @Test func podmanRestoresTheCheckpointImageStasisPushes() throws {
        let registry = try TestRegistry()
        defer { registry.stop() }
        let fixture = try Fixture("image")
        defer { fixture.remove() }
        let (name, rootfs, root) = (fixture.name, fixture.rootfs, fixture.root)
        let id = try Self.run(["inspect", "--format", "{{.ID}}", name]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let frozenAt = try Self.countNow(rootfs)
        let dump = try Harness.stasis(["dump", "--container", id, "-D", root + "/dumped"], environment: ["STASIS_STORE": root + "/store"])
        try #require(dump.succeeded, "\(dump.stderr)")
        let reference = "\(registry.host)/jobs/\(name):one"
        let push = try registry.stasis(["push", "--archive", root + "/dumped", reference], store: root + "/store")
        try #require(push.succeeded, "\(push.stderr)")
        let pull = try Self.run(["pull", "--tls-verify=false", "--creds", "stasis:s3cret", reference])
        try #require(pull.succeeded, "\(pull.stderr)")
        defer { _ = try? Self.run(["rmi", "-f", reference]) }
        Self.remove(name)
        // podman restores a checkpoint image only under the runtime it names, checked against its default.
        let restored = try Self.run(["--runtime", "runc", "container", "restore", reference])
        try #require(restored.succeeded, "podman could not restore the checkpoint image: \(restored.stderr)\n\(Self.criuLogTail(restored.stderr))")
        let first = Self.firstCount(try Self.mountpoint(name))
        #expect((first ?? 0) >= frozenAt, "podman's restore counts from \(String(describing: first)), not from \(frozenAt)")
    }

    /// The end of the CRIU log that podman's error names ("log file: PATH"), read before the container goes:
    /// what CRIU said when a restore failed.
    static func criuLogTail(_ stderr: String) -> String {
        guard let range = stderr.range(of: "log file: ") else { return "" }
        let path = String(stderr[range.upperBound...].prefix { !$0.isWhitespace })
        // Gone or unreadable: the message says so instead.
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return "(\(path) could not be read)" }
        return "the end of \(path):\n" + text.split(separator: "\n").suffix(25).joined(separator: "\n")
    }

    /// The container `name` removed, podman restores `archive` in its place; the restored shell's first count
    /// must be past `frozenAt` (its memory came back).
    static func expectPodmanRestores(_ archive: String, replacing name: String, past frozenAt: Int) throws {
        remove(name)
        let restored = try run(["container", "restore", "--import=" + archive])
        try #require(restored.succeeded, "podman could not restore \(archive): \(restored.stderr)\n\(criuLogTail(restored.stderr))")
        let first = firstCount(try mountpoint(name))
        #expect((first ?? 0) >= frozenAt, "podman's restore of \(archive) counts from \(String(describing: first)), not from \(frozenAt)")
    }

    /// The same container checkpointed twice by podman (the first time left running): the second archive's
    /// import adds to the store only the chunks that changed, not the 24 MiB its shell holds.
    @Test func aContainerCheckpointedTwiceAddsOnlyWhatChanged() throws {
        let fixture = try Fixture("twice", memory: 24)
        defer { fixture.remove() }
        let (name, rootfs, root) = (fixture.name, fixture.rootfs, fixture.root)
        let environment = ["STASIS_STORE": root + "/store"]
        let first = try Self.run(["container", "checkpoint", "--leave-running", "--export=" + root + "/first.tar", name])
        try #require(first.succeeded, "\(first.stderr)")
        let at = try Self.countNow(rootfs)
        #expect(Self.waitForCount(rootfs, atLeast: at + 10), "the container stopped counting after a --leave-running checkpoint")
        let second = try Self.run(["container", "checkpoint", "--export=" + root + "/second.tar", name])
        try #require(second.succeeded, "\(second.stderr)")

        let one = try Harness.stasis(["import", root + "/first.tar", "-D", root + "/one", "--json"], environment: environment)
        try #require(one.succeeded, "\(one.stderr)")
        let two = try Harness.stasis(["import", root + "/second.tar", "-D", root + "/two", "--json"], environment: environment)
        try #require(two.succeeded, "\(two.stderr)")
        let (a, b) = (try Self.statistics(one), try Self.statistics(two))
        let firstStored = a["storedBytes"] as? Int ?? 0, secondStored = b["storedBytes"] as? Int ?? 0
        #expect(firstStored > 16 << 20, "the first import stored \(firstStored) bytes: \(a)")
        #expect(secondStored < firstStored / 4, "the second import stored \(secondStored) bytes of \(firstStored): \(b)")
        #expect((b["reusedChunks"] as? Int ?? 0) > 0, "\(b)")
    }

    /// Archives that must not be restored: cut short, a flipped byte in the zstd stream, a file that no
    /// container engine writes (refused by import), and images of another CRIU: a dump log naming a CRIU newer
    /// than this host's (refused by restore before anything runs), and an inventory image of an image
    /// version this CRIU does not read (refused by CRIU; nothing is left restored).
    @Test func archivesThatMustNotBeRestoredAreRefused() throws {
        let fixture = try Fixture("damaged")
        defer { fixture.remove() }
        let (name, rootfs, root) = (fixture.name, fixture.rootfs, fixture.root)
        let archive = root + "/checkpoint.tar"
        let checkpoint = try Self.run(["container", "checkpoint", "--export=" + archive, name])
        try #require(checkpoint.succeeded, "\(checkpoint.stderr)")
        let whole = try Data(contentsOf: URL(fileURLWithPath: archive))
        try whole.prefix(whole.count / 2).write(to: URL(fileURLWithPath: root + "/short.tar"))
        var flipped = whole
        flipped[flipped.count / 2] ^= 0xFF
        try flipped.write(to: URL(fileURLWithPath: root + "/flipped.tar"))
        // The same archive unpacked and packed again: with a file added; with a dump log (podman writes none)
        // naming CRIU 9.1; with an inventory of image version 7 (CRIU 4 writes 2).
        let unpacked = root + "/unpacked"
        try FileManager.default.createDirectory(atPath: unpacked, withIntermediateDirectories: true)
        #expect(try Harness.run("/bin/tar", ["-xf", archive, "-C", unpacked]).succeeded)
        func pack(_ name: String, _ change: () throws -> Void, undo: () throws -> Void) throws {
            try change()
            #expect(try Harness.run("/bin/tar", ["-cf", root + "/\(name).tar", "-C", unpacked, "."]).succeeded)
            try undo()
        }
        let added = unpacked + "/run-me.sh", log = unpacked + "/checkpoint/dump.log", inventory = unpacked + "/checkpoint/inventory.img"
        try pack("foreign", { try Data("#!/bin/sh\necho surprise\n".utf8).write(to: URL(fileURLWithPath: added)) },
                 undo: { try FileManager.default.removeItem(atPath: added) })
        try pack("newer", { try Data("(00.000030) Version: 9.1 (gitid 0)\n".utf8).write(to: URL(fileURLWithPath: log)) },
                 undo: { try FileManager.default.removeItem(atPath: log) })
        let original = try Data(contentsOf: URL(fileURLWithPath: inventory))
        // magic (4 bytes), size (4), then field 1, img_version: 0x08 and its value.
        try #require(original.count > 10 && original[8] == 0x08 && original[9] == 0x02, "an inventory image stasis does not know: \(Array(original.prefix(12)))")
        var otherVersion = original
        otherVersion[9] = 0x07
        try pack("inventory", { try otherVersion.write(to: URL(fileURLWithPath: inventory)) }, undo: { try original.write(to: URL(fileURLWithPath: inventory)) })

        let environment = ["STASIS_STORE": root + "/store"]
        for (damaged, says) in [("short", "import of"), ("flipped", "import of"), ("foreign", "run-me.sh")] {
            let imported = try Harness.stasis(["import", root + "/\(damaged).tar", "-D", root + "/\(damaged)"], environment: environment)
            #expect(!imported.succeeded && imported.stderr.contains("stasis: error:") && imported.stderr.contains(says), "\(damaged): \(imported.stderr)")
            #expect(!FileSystem.exists(root + "/\(damaged)"), "\(damaged): nothing may be imported")
        }
        try Self.bundle(from: archive, rootfs: rootfs, at: root + "/bundle")
        for (other, says) in [("newer", "written by CRIU 9.1, newer than this host's CRIU"), ("inventory", "Not supported images version 7")] {
            let imported = try Harness.stasis(["import", root + "/\(other).tar", "-D", root + "/\(other)"], environment: environment)
            try #require(imported.succeeded, "\(imported.stderr)")
            let before = try Harness.run("/usr/sbin/runc", ["list", "-q"]).stdout
            let restore = try Harness.stasis(["restore", "-D", root + "/\(other)", "--bundle", root + "/bundle"], environment: environment)
            #expect(!restore.succeeded && restore.stderr.contains(says), "\(other): \(restore.stderr)")
            #expect(try Harness.run("/usr/sbin/runc", ["list", "-q"]).stdout == before, "\(other): nothing may be left restored")
        }
    }
}
}
