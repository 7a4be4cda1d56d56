import Foundation
import StasisCore
import StasisOS

/// runc, the OCI runtime that podman, CRI-O and containerd end in: stasis asks it for a container's state and
/// has it checkpoint and restore the container, since runc knows how the container was made (its mounts,
/// namespaces, cgroups and console) and drives CRIU accordingly. stasis does the rest: the GPU around it, and
/// the images into and out of the chunk store.
///
/// runc runs with STASIS_CRIU_PLUGIN=off, so that a stasis CRIU plugin in CRIU's plugin directory stands aside
/// while stasis drives the GPU itself. Its own messages go to a log (`--log`); the restored container's stdio
/// is /dev/null, since CRIU cannot carry a descriptor of a file outside the container.
public struct Runc: ContainerRuntime {
    public let path: String
    public var name: String { "runc" }

    public typealias State = ContainerState

    public static func locate() throws -> Runc {
        guard let path = Spawn.which("runc") else {
            throw StasisError(.runtime, "runc is not on the PATH", hint: "install runc (Debian: apt-get install --no-install-recommends runc)")
        }
        return Runc(path: path)
    }

    /// The container's state as runc knows it.
    public func state(_ id: String) throws -> State {
        let (status, output, log) = try run(["state", id], logIn: nil)
        guard status == 0 else {
            throw StasisError(.processNotFound, "runc knows no container \(id): \(log)", hint: "`runc list` shows the containers")
        }
        // An answer that is not JSON is reported by the else below, naming the command.
        guard let object = try? JSONSerialization.jsonObject(with: output) as? [String: Any],
              let pid = object["pid"] as? Int, let state = object["status"] as? String, let bundle = object["bundle"] as? String else {
            throw StasisError(.io, "runc state \(id) gave an answer stasis cannot read")
        }
        return State(id: id, pid: Int32(pid), status: state, bundle: bundle)
    }

    /// Every process of the container, those started by `runc exec` too (which are not its init's descendants).
    public func processes(_ id: String) throws -> [Int32] {
        let (status, output, log) = try run(["ps", "--format", "json", id], logIn: nil)
        // An answer that is not JSON is reported by the else below, with runc's log.
        guard status == 0, let pids = try? JSONSerialization.jsonObject(with: output) as? [Int] else {
            throw StasisError(.runtime, "runc could not list the processes of container \(id): \(log)")
        }
        return pids.map { Int32($0) }
    }

    /// Checkpoints the container into `images` (CRIU's images and runc's descriptors.json; CRIU's log in
    /// `work`). Without `leaveRunning`, runc removes the container once its images are complete.
    public func checkpoint(_ id: String, images: String, work: String, leaveRunning: Bool, tcpEstablished: Bool, shellJob: Bool) throws {
        var arguments = ["checkpoint", "--image-path", images, "--work-path", work]
        if leaveRunning { arguments.append("--leave-running") }
        arguments += Self.flags(tcpEstablished: tcpEstablished, shellJob: shellJob)
        let (status, _, log) = try run(arguments + [id], logIn: work)
        guard status == 0 else { throw StasisError(.runtime, "runc could not checkpoint container \(id): \(log)", logPath: work + "/dump.log") }
    }

    /// Restores container `id` from `images` with the bundle `bundle`, detached.
    public func restore(_ id: String, bundle: String, images: String, work: String, tcpEstablished: Bool, shellJob: Bool) throws {
        let arguments = ["restore", "--detach", "--image-path", images, "--work-path", work, "--bundle", bundle]
            + Self.flags(tcpEstablished: tcpEstablished, shellJob: shellJob)
        let (status, _, log) = try run(arguments + [id], logIn: work)
        guard status == 0 else { throw StasisError(.runtime, "runc could not restore container \(id): \(log)", logPath: work + "/restore.log") }
    }

    /// Freezes every process of the container (its cgroup's freezer).
    public func pause(_ id: String) throws {
        let (status, _, log) = try run(["pause", id], logIn: nil)
        guard status == 0 else { throw StasisError(.runtime, "runc could not pause container \(id): \(log)") }
    }

    public func resume(_ id: String) throws {
        let (status, _, log) = try run(["resume", id], logIn: nil)
        guard status == 0 else { throw StasisError(.runtime, "runc could not resume container \(id): \(log)") }
    }

    /// Kills the container and removes it from runc's list.
    public func remove(_ id: String) throws {
        let (status, _, log) = try run(["delete", "--force", id], logIn: nil)
        guard status == 0 else { throw StasisError(.runtime, "runc could not remove container \(id): \(log)") }
    }

    /// runc's flags for what `stasis dump` takes as options (the restore replays them, as with CRIU).
    static func flags(tcpEstablished: Bool, shellJob: Bool) -> [String] {
        (tcpEstablished ? ["--tcp-established"] : []) + (shellJob ? ["--shell-job"] : [])
    }

    /// Runs runc with /dev/null as stdin and stderr (and stdout unless it is read); returns its status, what it
    /// printed, and its log's last lines.
    private func run(_ arguments: [String], logIn directory: String?) throws -> (Int32, Data, String) {
        // runc cannot start without its log: the work directory exists before it does. Without one, a private
        // directory of its own (a predictable name in /tmp would let another user plant a link there).
        let logDirectory: String
        if let directory {
            try FileSystem.makePrivateDirectory(directory)
            logDirectory = directory
        } else {
            logDirectory = try FileSystem.makeTemporaryDirectory(prefix: "stasis-runc")
        }
        let logPath = logDirectory + "/runc-\(arguments[0])-\(ThisProcess.pid).log"
        defer { if directory == nil { FileSystem.removeTree(logDirectory) } }
        // Each descriptor maps to one number in the child: a /dev/null for each of stdin, stderr and (unless
        // runc's answer is read) stdout.
        var nulls: [FileDescriptor] = []
        defer { nulls.forEach { $0.closeQuietly() } }
        for _ in 0..<3 { nulls.append(try attempt("cannot open", "/dev/null") { try FileDescriptor.open("/dev/null", .readWrite) }) }
        let (readEnd, writeEnd) = try attempt("cannot create a pipe for", path) { try FileDescriptor.makePipe() }
        var environment = ProcessInfo.processInfo.environment
        environment["STASIS_CRIU_PLUGIN"] = "off"
        // Only `state` and `ps` print what stasis reads; the others' stdout would be a detached container's.
        let stdout = ["state", "ps"].contains(arguments[0]) ? writeEnd : nulls[1]
        let pid: Int32
        do {
            defer { writeEnd.closeQuietly() }
            pid = try Spawn.start(path, ["--log", logPath, "--log-format", "json"] + arguments, descriptors: [nulls[0]: 0, stdout: 1, nulls[2]: 2],
                                  environment: environment)
        } catch {
            readEnd.closeQuietly()
            throw error
        }
        let output = FileHandle(fileDescriptor: readEnd.rawValue, closeOnDealloc: true).readDataToEndOfFile()
        let status = Spawn.wait(pid)
        // No log (runc died before writing it) is no message: its status still says whether it failed.
        let log = ((try? FileSystem.readFile(logPath)).map { String(decoding: $0, as: UTF8.self) } ?? "").split(separator: "\n").suffix(3)
            .map { line -> String in
                // runc logs JSON lines: keep their message.
                // runc logs JSON lines: keep their message (a line that is not JSON is kept as it is).
                if let data = line.data(using: .utf8), let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
                   let message = object["msg"] as? String { return message }
                return String(line)
            }.joined(separator: "; ")
        return (status, output, log)
    }
}
