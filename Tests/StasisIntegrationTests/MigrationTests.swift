import Foundation
import Glibc
import StasisOS
import StasisTestSupport
import Testing

/// Two hosts on this machine: this one (the root network and PID namespaces) and a receiver in a network
/// namespace of its own, joined to this one by a veth pair, and in a PID namespace of its own (restored
/// processes keep their PIDs, which the source's frozen tree still holds here).
final class ReceiverHost {
    static let ip = FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") ? "/usr/sbin/ip" : "/sbin/ip"
    let namespace: String
    let here: String, there: String
    private let link: String
    private var receiver: Process?
    let log: String

    init(_ index: Int) throws {
        namespace = "stasis-mig-\(getpid())-\(index)"
        link = "smig\(getpid() % 10000)\(index)"
        here = "10.\(200 + index).\(getpid() % 250).1"
        there = "10.\(200 + index).\(getpid() % 250).2"
        log = Harness.scratch("receiver-\(index)") + "/serve.log"
        for command in [
            ["netns", "add", namespace],
            ["link", "add", link + "a", "type", "veth", "peer", "name", link + "b"],
            ["link", "set", link + "b", "netns", namespace],
            ["addr", "add", here + "/24", "dev", link + "a"],
            ["link", "set", link + "a", "up"],
            ["-n", namespace, "addr", "add", there + "/24", "dev", link + "b"],
            ["-n", namespace, "link", "set", link + "b", "up"],
            ["-n", namespace, "link", "set", "lo", "up"],
        ] {
            let result = try Harness.run(ReceiverHost.ip, command)
            guard result.succeeded else { throw Workload.WorkloadError(text: "ip \(command.joined(separator: " ")): \(result.stderr)") }
        }
    }

    /// Starts `stasis serve` there; its PID namespace lives as long as the shell that is its init.
    func serve(token: String, store: String, fault: String? = nil, extra: [String] = []) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: ReceiverHost.ip)
        // In clear only where the test says nothing of TLS: --insecure, as the receiver is not on loopback.
        let clear = extra.contains("--tls") ? [] : ["--insecure"]
        let serve = "\(Harness.stasis) serve --listen \(there):7070 --token-file \(token) --store \(store) --directory \(store)-received "
            + (clear + extra).joined(separator: " ") + " >\(log) 2>&1; sleep 100000"
        process.arguments = ["netns", "exec", namespace, "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c", serve]
        var environment = ProcessInfo.processInfo.environment
        environment["STASIS_FAULT"] = fault
        process.environment = environment
        try process.run()
        receiver = process
        #expect(waitFor("listening"), "the receiver did not start: \(logText)")
    }

    var logText: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

    func waitFor(_ text: String, seconds: Double = 20) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if logText.contains(text) { return true }
            usleep(50_000)
        }
        return false
    }

    /// Kills the receiver and everything it restored (its PID namespace ends with its init).
    func kill() {
        guard let receiver else { return }
        Glibc.kill(receiver.processIdentifier, SIGKILL)
        receiver.waitUntilExit()
        self.receiver = nil
    }

    /// The PID here of the process the receiver restored as `pid` in its namespace.
    func hostPID(of pid: Int32) -> Int32? {
        for candidate in ProcFS.allPIDs() {
            guard let status = try? String(contentsOfFile: "/proc/\(candidate)/status", encoding: .utf8),
                  let line = status.split(separator: "\n").first(where: { $0.hasPrefix("NSpid:") }) else { continue }
            let ids = line.split(separator: "\t").dropFirst().compactMap { Int32($0.trimmingCharacters(in: .whitespaces)) }
            if ids.count == 2, ids[1] == pid, ids[0] != pid { return candidate }
        }
        return nil
    }

    /// The PID here of the receiver's init (its shell): what nsenter enters.
    var initPID: Int32? {
        guard let receiver else { return nil }
        return ProcFS.tree(root: receiver.processIdentifier).map(\.pid).first { pid in
            ProcFS.stat(pid)?.command == "sh"
        }
    }

    deinit {
        kill()
        _ = try? Harness.run("/usr/sbin/ip", ["link", "del", link + "a"])
        _ = try? Harness.run("/usr/sbin/ip", ["netns", "del", namespace])
    }
}

@Suite(.serialized) struct Migration {
    static func token(_ name: String, _ text: String) throws -> String {
        let path = Harness.scratch("token-\(name)") + "/token"
        try Data(text.utf8).write(to: URL(fileURLWithPath: path))
        chmod(path, 0o600)
        return path
    }

    struct Sent: Decodable {
        var remotePID: Int32; var bytesSent: UInt64; var bytesSkipped: UInt64; var chunksSkipped: Int; var downtimeSeconds: Double
        var restoreSeconds: Double; var receiverReceiveSeconds: Double?; var receiverRestoreSeconds: Double?
    }

    func migrate(_ pid: Int32, to address: String, token: String, store: String, through nsenter: Int32? = nil, extra: [String] = []) throws -> Harness.Result {
        let arguments = ["migrate", "\(pid)", "--to", address, "--token-file", token, "--store", store, "--json"]
            + (extra.contains("--tls") ? [] : ["--insecure"]) + extra
        guard let nsenter else { return try Harness.stasis(arguments) }
        return try Harness.run("/usr/bin/nsenter", ["-t", "\(nsenter)", "-n", "-p", "-m", Harness.stasis] + arguments)
    }

    /// A job moves there and back: each way it verifies itself, and the way back sends a fraction of the
    /// bytes, as this host's store still has the chunks of the first checkpoint.
    @Test func aJobMovesToTheOtherHostAndBackSendingOnlyWhatIsMissing() throws {
        let host = try ReceiverHost(1)
        let token = try Self.token("good", "a shared secret of the migration test")
        let storeHere = Harness.scratch("mig-store-a") + "/store", storeThere = Harness.scratch("mig-store-b") + "/store"
        try host.serve(token: token, store: storeThere)
        let workload = try Workload("counter", ["--mem", "64"])
        defer { workload.stop() }
        #expect(workload.verify().hasPrefix("PASS"))

        let first = try migrate(workload.pid, to: "\(host.there):7070", token: token, store: storeHere)
        #expect(first.succeeded, "\(first.stderr)")
        let there = try JSONDecoder().decode(Sent.self, from: Data(first.stdout.utf8))
        // The receiver's own restore figure, the one its log prints, comes back inside the source's interval.
        let restoredThere = try #require(there.receiverRestoreSeconds, "the receiver gives its figures")
        #expect(there.receiverReceiveSeconds != nil && restoredThere > 0 && restoredThere <= there.restoreSeconds, "\(first.stdout)")
        #expect(Harness.waitGone(workload.pid), "the source ends once the job runs there")
        let remote = try #require(host.hostPID(of: there.remotePID), "the job runs in the receiver's PID namespace")
        defer { kill(remote, SIGKILL) }
        #expect(Self.verify(remote, workload.directory).hasPrefix("PASS"))
        #expect(there.bytesSent > 64 << 20, "the first time everything goes")

        // Back: this host serves, the job leaves the receiver's namespaces.
        let back = Process()
        back.executableURL = URL(fileURLWithPath: Harness.stasis)
        back.arguments = ["serve", "--listen", "\(host.here):7071", "--token-file", token, "--store", storeHere,
                          "--directory", storeHere + "-received", "--once", "--insecure"]
        try back.run()
        defer { if back.isRunning { back.terminate() } }
        usleep(300_000)
        let receiverInit = host.initPID
        #expect(receiverInit != nil, "the receiver's init is found")
        let second = try migrate(there.remotePID, to: "\(host.here):7071", token: token, store: storeThere, through: receiverInit ?? 0)
        #expect(second.succeeded, "\(second.stderr)")
        back.waitUntilExit()
        #expect(back.terminationStatus == 0)
        let returned = try JSONDecoder().decode(Sent.self, from: Data(second.stdout.utf8))
        #expect(returned.remotePID == workload.pid, "back under its own PID")
        #expect(workload.verify().hasPrefix("PASS"), "the job runs here again")
        #expect(returned.chunksSkipped > 0 && returned.bytesSent * 4 < there.bytesSent,
                "the way back sends only what changed: \(returned.bytesSent) bytes against \(there.bytesSent)")
    }

    @Test func aWrongTokenIsRefusedAndTheJobIsNotTouched() throws {
        let host = try ReceiverHost(2)
        try host.serve(token: try Self.token("server", "the receiver's secret, long enough"), store: Harness.scratch("mig-store-c") + "/store")
        let workload = try Workload("counter", ["--mem", "8"])
        defer { workload.stop() }
        let refused = try migrate(workload.pid, to: "\(host.there):7070", token: try Self.token("other", "another secret, also long enough"),
                                  store: Harness.scratch("mig-store-d") + "/store")
        #expect(!refused.succeeded)
        #expect(refused.stderr.contains("token"), "\(refused.stderr)")
        #expect(workload.verify().hasPrefix("PASS"), "the job runs on, never frozen")
        #expect(host.waitFor("does not know the token"), "the receiver says why: \(host.logText)")
    }

    /// Anyone who reaches the port can open connections and say nothing: 100 idle ones (more than the receiver
    /// lets wait at once) do not keep an honest migration out.
    @Test func idleConnectionsDoNotKeepAMigrationOut() throws {
        let host = try ReceiverHost(6)
        let token = try Self.token("idle", "a shared secret for the crowded receiver")
        try host.serve(token: token, store: Harness.scratch("mig-store-i") + "/store")
        var idle: [Int32] = []
        defer { for fd in idle { close(fd) } }
        for _ in 0..<100 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            // A receiver that stops accepting fills its backlog: connect then waits, bounded here.
            var limit = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = UInt16(7070).bigEndian
            inet_pton(AF_INET, host.there, &address.sin_addr)
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            #expect(connected == 0)
            idle.append(fd)
        }
        let workload = try Workload("counter", ["--mem", "8"])
        defer { workload.stop() }
        let moved = try migrate(workload.pid, to: "\(host.there):7070", token: token, store: Harness.scratch("mig-store-j") + "/store")
        #expect(moved.succeeded, "\(moved.stderr)")
        let there = try JSONDecoder().decode(Sent.self, from: Data(moved.stdout.utf8))
        let remote = try #require(host.hostPID(of: there.remotePID))
        defer { kill(remote, SIGKILL) }
        #expect(Self.verify(remote, workload.directory).hasPrefix("PASS"))
    }

    /// The receiver dies while chunks arrive during the dump ("chunk"), or once the dump is done and the rest
    /// of the checkpoint comes ("receive").
    @Test(arguments: ["chunk", "receive"])
    func theReceiverKilledMidTransferLeavesTheJobRunningHere(_ point: String) throws {
        let host = try ReceiverHost(point == "chunk" ? 3 : 4)
        let token = try Self.token("kill-\(point)", "a shared secret for the killed receiver")
        try host.serve(token: token, store: Harness.scratch("mig-store-e-\(point)") + "/store", fault: "\(point)-stall")
        let workload = try Workload("counter", ["--mem", "256", "--fill", "random"])
        defer { workload.stop() }
        let source = Process()
        source.executableURL = URL(fileURLWithPath: Harness.stasis)
        source.arguments = ["migrate", "\(workload.pid)", "--to", "\(host.there):7070", "--token-file", token, "--store", Harness.scratch("mig-store-f-\(point)") + "/store", "--insecure"]
        let errors = Pipe()
        source.standardError = errors
        source.standardOutput = FileHandle.nullDevice
        try source.run()
        #expect(host.waitFor("stalled at \(point)"), "the receiver stops in the middle: \(host.logText)")
        host.kill()
        source.waitUntilExit()
        let stderr = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(source.terminationStatus != 0)
        #expect(stderr.contains("still running"), "\(stderr)")
        #expect(workload.isLive)
        #expect(workload.verify().hasPrefix("PASS"), "nothing lost: the job runs on here")
    }

    /// The source dies after the receiver restored the job but before it committed: CRIU thaws the job
    /// here (it lost its peer), and the receiver, with no commit, stops its copy. One copy runs, not two.
    @Test func aSourceThatDiesBeforeItsCommitKeepsTheJobAndTheReceiverDropsItsCopy() throws {
        let host = try ReceiverHost(5)
        let token = try Self.token("commit", "a shared secret for the lost commit")
        try host.serve(token: token, store: Harness.scratch("mig-store-g") + "/store")
        let workload = try Workload("counter", ["--mem", "16"])
        defer { workload.stop() }
        let source = Process()
        source.executableURL = URL(fileURLWithPath: Harness.stasis)
        source.arguments = ["migrate", "\(workload.pid)", "--to", "\(host.there):7070", "--token-file", token, "--store", Harness.scratch("mig-store-h") + "/store", "--insecure"]
        var environment = ProcessInfo.processInfo.environment
        environment["STASIS_FAULT"] = "commit-stall"
        source.environment = environment
        let errors = Harness.scratch("commit-source") + "/stderr"
        _ = FileManager.default.createFile(atPath: errors, contents: nil)
        source.standardError = FileHandle(forWritingAtPath: errors)
        source.standardOutput = FileHandle.nullDevice
        try source.run()
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline, !((try? String(contentsOfFile: errors, encoding: .utf8)) ?? "").contains("stalled at commit") { usleep(50_000) }
        #expect(host.logText.contains("restored in"), "the receiver restored it: \(host.logText)")
        kill(source.processIdentifier, SIGKILL)
        source.waitUntilExit()
        #expect(host.waitFor("did not commit"), "the receiver stops its copy: \(host.logText)")
        #expect(workload.verify().hasPrefix("PASS"), "the job runs on here")
        let gone = Date().addingTimeInterval(5)
        while Date() < gone, let copy = host.hostPID(of: workload.pid), ProcFS.isLive(copy) { usleep(50_000) }
        #expect(host.hostPID(of: workload.pid).map(ProcFS.isLive) != true, "and not there")
    }

    static func verify(_ pid: Int32, _ directory: String) -> String {
        let result = directory + "/result"
        unlink(result)
        guard kill(pid, SIGUSR1) == 0 else { return "FAIL PID \(pid) is not running" }
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            if let text = try? String(contentsOfFile: result, encoding: .utf8) { return text }
            usleep(20_000)
        }
        return "FAIL no result"
    }
}
