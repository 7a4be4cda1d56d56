import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisTestSupport
import Testing

/// Migrations over TLS 1.3 between two hosts (ReceiverHost: a receiver in network and PID namespaces of its
/// own). Each end has a key and certificate (`stasis serve --init-tls`) and pins the other's. Whoever is
/// refused (a plain-text source, a source with another certificate or an expired one, a receiver that is not
/// the pinned one: a man in the middle re-signing with its own key) is refused before any chunk is read, and
/// the job runs on here as it was.
extension Migration {
@Suite(.serialized) struct OverTLS {
    /// A key and certificate made by `stasis serve --init-tls`, and the fingerprint it printed.
    static func identity(_ name: String) throws -> (directory: String, fingerprint: String) {
        let directory = Harness.scratch("tls-\(name)") + "/identity"
        let made = try Harness.stasis(["serve", "--init-tls", directory])
        try #require(made.succeeded, "\(made.stderr)")
        let line = try #require(made.stdout.split(separator: "\n").first { $0.hasPrefix("fingerprint: ") })
        return (directory, String(line.dropFirst("fingerprint: ".count)))
    }

    @Test func onlyThePinnedPeersGetThroughAndTheJobMovesEncrypted() throws {
        let host = try ReceiverHost(5)
        let token = try Migration.token("tls", "a shared secret of the TLS migration test")
        let receiver = try Self.identity("receiver"), source = try Self.identity("source"), stranger = try Self.identity("stranger")
        // Expired yesterday: made through the same code as --init-tls, with dates in the past.
        let expired = Harness.scratch("tls-expired") + "/identity"
        let expiredPrint = try TLSConfiguration.generate(in: expired, name: "expired",
                                                        validity: Date().addingTimeInterval(-3 * 86_400)...Date().addingTimeInterval(-86_400))
        try host.serve(token: token, store: Harness.scratch("tls-store-there") + "/store",
                       extra: ["--tls", receiver.directory, "--tls-peer", source.fingerprint, "--tls-peer", expiredPrint])
        #expect(host.logText.contains("TLS 1.3; accepting 2 pinned certificate(s)"), "\(host.logText)")
        let workload = try Workload("counter", ["--mem", "32"])
        defer { workload.stop() }
        let address = "\(host.there):7070", store = Harness.scratch("tls-store-here") + "/store"
        let trusting = { (identity: String) in ["--tls", identity, "--tls-peer", receiver.fingerprint] }

        // Refused, each before anything of the job is touched or sent.
        let cases: [(what: String, extra: [String], source: String, receiver: String)] = [
            ("a plain-text source", [], "--tls", "refused: TLS with"),
            ("a source with a certificate the receiver does not pin", trusting(stranger.directory), "TLS", "is not one of the pinned ones"),
            ("a source with an expired certificate", trusting(expired), "TLS", "its certificate has expired"),
            ("a source that pins another receiver", ["--tls", source.directory, "--tls-peer", stranger.fingerprint], "is not one of the pinned ones", ""),
        ]
        for (index, refusal) in cases.enumerated() {
            let result = try Migration().migrate(workload.pid, to: address, token: token, store: store, extra: refusal.extra)
            #expect(!result.succeeded && result.stderr.contains(refusal.source), "\(refusal.what): \(result.stderr)")
            if !refusal.receiver.isEmpty {
                let lines = host.logText.split(separator: "\n").filter { $0.contains("refused") }
                #expect(lines.count >= index + 1 && lines.last!.contains(refusal.receiver), "\(refusal.what): the receiver says \(host.logText)")
            }
            #expect(workload.verify().hasPrefix("PASS"), "\(refusal.what): the job runs on, never frozen")
        }
        #expect(!host.logText.contains("restored"), "nothing was restored: \(host.logText)")

        // The pinned source: the job moves, encrypted.
        let moved = try Migration().migrate(workload.pid, to: address, token: token, store: store, extra: trusting(source.directory))
        try #require(moved.succeeded, "\(moved.stderr)")
        let report = try #require(try JSONSerialization.jsonObject(with: Data(moved.stdout.utf8)) as? [String: Any])
        let encryption = report["encryption"] as? String ?? ""
        #expect(encryption.hasPrefix("TLSv1.3") && encryption.contains(receiver.fingerprint), "\(encryption)")
        #expect(Harness.waitGone(workload.pid), "the source ends once the job runs there")
        let remotePID = try #require((report["remotePID"] as? Int).map(Int32.init))
        let remote = try #require(host.hostPID(of: remotePID), "the job runs in the receiver's PID namespace")
        defer { kill(remote, SIGKILL) }
        #expect(Migration.verify(remote, workload.directory).hasPrefix("PASS"))
    }

    /// A man in the middle: it answers on an address the source was given, with a certificate of its own key
    /// (all it can do without the receiver's key). The source refuses it during the handshake: nothing of the
    /// job, not even the token's proof, reaches it.
    @Test func aManInTheMiddleWithAnotherKeyIsRefused() throws {
        let receiver = try Self.identity("real"), source = try Self.identity("honest"), middle = try Self.identity("middle")
        let token = try Migration.token("mitm", "a shared secret of the MITM test, long")
        let port = UInt16.random(in: 20_000...60_000)
        let listener = try TCPListener("127.0.0.1:\(port)")
        let context = try TLSContext(TLSConfiguration(directory: middle.directory, pinned: [source.fingerprint], caFile: nil), server: true)
        let handshake = Locked<String?>(nil)
        let proxy = Thread {
            guard let connection = try? listener.accept() else { return }
            connection.setTimeout(seconds: 10)
            do {
                try connection.secure(with: context)
                handshake.withLock { $0 = "completed" }
            } catch {
                handshake.withLock { $0 = "\(error)" }
            }
        }
        proxy.start()
        let workload = try Workload("counter", ["--mem", "8"])
        defer { workload.stop() }
        let result = try Migration().migrate(workload.pid, to: "127.0.0.1:\(port)", token: token, store: Harness.scratch("mitm-store") + "/store",
                                             extra: ["--tls", source.directory, "--tls-peer", receiver.fingerprint])
        #expect(!result.succeeded && result.stderr.contains("is not one of the pinned ones") && result.stderr.contains(middle.fingerprint),
                "\(result.stderr)")
        let deadline = Date().addingTimeInterval(10)
        while handshake.current == nil && Date() < deadline { usleep(20_000) }
        #expect(handshake.current != "completed", "the man in the middle must not complete a handshake")
        #expect(workload.verify().hasPrefix("PASS"), "the job runs on, never frozen")
    }
}
}
