import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisTestSupport
import Testing

/// What a migration promises beyond moving the job: with --tls nothing of the job crosses the wire in clear,
/// and a signal to `stasis migrate` never leaves the job running on both hosts (nor on none).
extension Migration {
@Suite(.serialized) struct Safety {
    /// A TCP relay on this host's loopback address that forwards a migration to the receiver and keeps every
    /// byte that passes, both ways: what anyone on the path would see.
    final class WireRecorder: @unchecked Sendable {
        let address: String
        private let listener: TCPListener
        private let recorded = Locked<[UInt8]>([])
        private let done = DispatchSemaphore(value: 0)

        init(to target: String) throws {
            let port = UInt16.random(in: 20_000...60_000)
            address = "127.0.0.1:\(port)"
            listener = try TCPListener(address)
            Thread { [self] in
                defer { done.signal() }
                guard let inbound = try? listener.accept(), let outbound = try? TCPConnection.connect(to: target) else { return }
                inbound.setTimeout(seconds: 0)
                outbound.setTimeout(seconds: 0)
                let back = Thread { [self] in pump(outbound, inbound) }
                back.start()
                pump(inbound, outbound)
            }.start()
        }

        private func pump(_ from: TCPConnection, _ to: TCPConnection) {
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let got = (try? buffer.withUnsafeMutableBytes { try from.receiveSome(into: $0) }) ?? 0
                guard got > 0 else { to.shutdown(); return }
                recorded.withLock { $0.append(contentsOf: buffer[0..<got]) }
                do {
                    try buffer.withUnsafeBytes { try to.send(UnsafeRawBufferPointer(rebasing: $0[0..<got])) }
                } catch {
                    from.shutdown()
                    return
                }
            }
        }

        var bytes: [UInt8] { recorded.current }

        func contains(_ text: String) -> Bool {
            Data(bytes).range(of: Data(text.utf8)) != nil
        }
    }

    /// A job whose memory and open files name a secret: its log file's path, in its argv (its stack) and in
    /// CRIU's image of its files. Chunks are stored uncompressed, so a secret sent in clear shows as it is.
    static func secretJob() throws -> (workload: Workload, secret: String) {
        let secret = "stasis-secret-" + (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
        let workload = try Workload("counter", ["--mem", "16", "--file", Harness.scratch("secret") + "/\(secret).log"])
        return (workload, secret)
    }

    static let telltales = ["STASISBUNDLE1", "pstree.img", "inventory.img"]

    /// The same migration through the same recorder, in clear and then over TLS: in clear the recording holds
    /// the bundle's magic, CRIU's image names and the secret (so the recorder sees what passes); over TLS it
    /// holds none of them.
    @Test func withTLSNothingOfTheJobCrossesTheWireInClear() throws {
        let token = try Migration.token("wire", "a shared secret of the wire recording test")
        let plainHost = try ReceiverHost(7)
        try plainHost.serve(token: token, store: Harness.scratch("wire-plain-there") + "/store")
        let plain = try Self.secretJob()
        defer { plain.workload.stop() }
        let plainWire = try WireRecorder(to: "\(plainHost.there):7070")
        let inClear = try Migration().migrate(plain.workload.pid, to: plainWire.address, token: token,
                                              store: Harness.scratch("wire-plain-here") + "/store", extra: ["--compress", "none"])
        try #require(inClear.succeeded, "\(inClear.stderr)")
        let plainRemote = try JSONDecoder().decode(Sent.self, from: Data(inClear.stdout.utf8)).remotePID
        if let remote = plainHost.hostPID(of: plainRemote) { kill(remote, SIGKILL) }
        for telltale in Self.telltales + [plain.secret] {
            #expect(plainWire.contains(telltale), "the recorder must see \(telltale) in a migration in clear (\(plainWire.bytes.count) bytes)")
        }

        let receiver = try OverTLS.identity("wire-receiver"), source = try OverTLS.identity("wire-source")
        let tlsHost = try ReceiverHost(8)
        try tlsHost.serve(token: token, store: Harness.scratch("wire-tls-there") + "/store",
                          extra: ["--tls", receiver.directory, "--tls-peer", source.fingerprint])
        let job = try Self.secretJob()
        defer { job.workload.stop() }
        let wire = try WireRecorder(to: "\(tlsHost.there):7070")
        let moved = try Migration().migrate(job.workload.pid, to: wire.address, token: token, store: Harness.scratch("wire-tls-here") + "/store",
                                            extra: ["--compress", "none", "--tls", source.directory, "--tls-peer", receiver.fingerprint])
        try #require(moved.succeeded, "\(moved.stderr)")
        let sent = try JSONDecoder().decode(Sent.self, from: Data(moved.stdout.utf8))
        let remote = try #require(tlsHost.hostPID(of: sent.remotePID))
        defer { kill(remote, SIGKILL) }
        #expect(Migration.verify(remote, job.workload.directory).hasPrefix("PASS"))
        #expect(UInt64(wire.bytes.count) >= sent.bytesSent, "the whole migration passed the recorder: \(wire.bytes.count) of \(sent.bytesSent) bytes")
        for telltale in Self.telltales + [job.secret] {
            #expect(!wire.contains(telltale), "\(telltale) crossed the wire in clear under --tls")
        }
    }

    /// Without --tls, a receiver off the loopback address needs --insecure at both ends; nothing is touched.
    @Test func aMigrationInClearOffLoopbackNeedsInsecure() throws {
        let token = try Migration.token("insecure", "a shared secret of the insecure test")
        let workload = try Workload("counter", ["--mem", "8"])
        defer { workload.stop() }
        let refused = try Harness.stasis(["migrate", "\(workload.pid)", "--to", "10.1.2.3:7070", "--token-file", token])
        #expect(!refused.succeeded && refused.stderr.contains("--insecure") && refused.stderr.contains("in clear"), "\(refused.stderr)")
        #expect(workload.verify().hasPrefix("PASS"))
        let serve = try Harness.stasis(["serve", "--listen", "0.0.0.0:7071", "--token-file", token, "--once"])
        #expect(!serve.succeeded && serve.stderr.contains("--insecure"), "\(serve.stderr)")
    }

    /// Where a signal comes, held there by an answer that waits 3 s (STASIS_FAULT ...-pause), and where the
    /// job must then run: "receive" (the receiver has not restored; the source waits for its answer) and
    /// "commit" (the receiver runs the job; the source has not committed) abandon the migration; "committed"
    /// (the commit is sent, the acknowledgement held back) completes it.
    static let phases: [(point: String, onReceiver: Bool, moves: Bool)] = [("receive", true, false), ("commit", false, false), ("committed", true, true)]

    @Test(arguments: [0, 1, 2])
    func aSignalAtAnyPhaseLeavesTheJobRunningOnExactlyOneHost(_ phase: Int) throws {
        let (point, onReceiver, moves) = Self.phases[phase]
        let host = try ReceiverHost(9 + phase)
        let token = try Migration.token("signal-\(point)", "a shared secret of the signal test")
        try host.serve(token: token, store: Harness.scratch("sig-there-\(point)") + "/store", fault: onReceiver ? "\(point)-pause" : nil)
        for signal in [SIGINT, SIGTERM, SIGHUP] {
            let what = "\(point), \(Interruption.name(signal))"
            let workload = try Workload("counter", ["--mem", "16"])
            defer { workload.stop() }
            let source = Process()
            source.executableURL = URL(fileURLWithPath: Harness.stasis)
            source.arguments = ["migrate", "\(workload.pid)", "--to", "\(host.there):7070", "--token-file", token, "--insecure",
                                "--store", Harness.scratch("sig-here-\(point)") + "/store", "--json"]
            var environment = ProcessInfo.processInfo.environment
            environment["STASIS_FAULT"] = onReceiver ? nil : "\(point)-pause"
            source.environment = environment
            let errors = Pipe(), output = Pipe()
            source.standardError = errors
            source.standardOutput = output
            let stderr = ReadAll(errors.fileHandleForReading), stdout = ReadAll(output.fileHandleForReading)
            let pausesBefore = host.logText.components(separatedBy: "paused at \(point)").count
            // This round's restore, not an earlier round's line (each round's signal must come after it).
            let restoresBefore = host.logText.components(separatedBy: "restored in").count
            try source.run()
            if onReceiver {
                let deadline = Date().addingTimeInterval(30)
                while Date() < deadline, host.logText.components(separatedBy: "paused at \(point)").count == pausesBefore { usleep(20_000) }
            } else {
                // The source says so on its stderr, read to the end only once it exits: wait for the receiver's restore.
                let deadline = Date().addingTimeInterval(30)
                while Date() < deadline, host.logText.components(separatedBy: "restored in").count == restoresBefore { usleep(20_000) }
                #expect(host.logText.components(separatedBy: "restored in").count > restoresBefore, "\(what): the receiver restored it: \(host.logText)")
                usleep(300_000)
            }
            kill(source.processIdentifier, signal)
            source.waitUntilExit()
            let said = stderr.wait(), report = stdout.wait()
            if moves {
                #expect(source.terminationStatus == 0, "\(what): the migration completes: \(said)")
                #expect(said.contains("came after the commit"), "\(what): \(said)")
                #expect(Harness.waitGone(workload.pid), "\(what): the job ends here")
                let sent = try JSONDecoder().decode(Sent.self, from: Data(report.utf8))
                let remote = try #require(host.hostPID(of: sent.remotePID), "\(what): the job runs there")
                #expect(Migration.verify(remote, workload.directory).hasPrefix("PASS"), "\(what)")
                kill(remote, SIGKILL)
            } else {
                #expect(source.terminationStatus != 0, "\(what)")
                #expect(said.contains("abandoned"), "\(what): \(said)")
                #expect(workload.verify().hasPrefix("PASS"), "\(what): the job runs on here")
                let gone = Date().addingTimeInterval(8)
                while Date() < gone, let copy = host.hostPID(of: workload.pid), ProcFS.isLive(copy) { usleep(50_000) }
                #expect(host.hostPID(of: workload.pid).map(ProcFS.isLive) != true, "\(what): and not there: \(host.logText)")
            }
            #expect(((try? FileManager.default.contentsOfDirectory(atPath: "/var/lib/stasis/migrate")) ?? []).allSatisfy { !$0.hasSuffix("-\(workload.pid)") },
                    "\(what): no checkpoint is left in the spool")
        }
    }
}
}
