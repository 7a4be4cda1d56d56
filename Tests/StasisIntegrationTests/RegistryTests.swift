import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisTestSupport
import Testing

/// A real registry (Debian's docker-registry, CNCF distribution 2.8) on the loopback address, with TLS (a
/// certificate the test makes, for localhost and 127.0.0.1) and htpasswd users, its storage in the test's
/// scratch; an auth.json for stasis as `podman login` writes one.
final class TestRegistry {
    let root: String
    let port: UInt16
    let process: Process
    let authFile: String
    var host: String { "localhost:\(port)" }
    var ca: String { root + "/cert.pem" }

    init() throws {
        root = Harness.scratch("registry")
        // A port nothing listens on: bound once here and let go, for the registry to bind next.
        var free: UInt16?
        for _ in 0..<50 where free == nil {
            let candidate = UInt16.random(in: 20_000...60_000)
            if (try? TCPListener("127.0.0.1:\(candidate)")) != nil { free = candidate }
        }
        port = try #require(free)
        let openssl = try Harness.run("/usr/bin/openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                                                           "-keyout", root + "/key.pem", "-out", root + "/cert.pem", "-days", "2", "-subj", "/CN=localhost",
                                                           "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        try #require(openssl.succeeded, "openssl: \(openssl.stderr)")
        let users = try Harness.run("/usr/bin/htpasswd", ["-Bbn", "stasis", "s3cret"])
        try #require(users.succeeded, "htpasswd: \(users.stderr)")
        try users.stdout.write(toFile: root + "/htpasswd", atomically: true, encoding: .utf8)
        // skopeo takes CA certificates from a directory, as NAME.crt.
        try FileManager.default.createDirectory(atPath: root + "/certs", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: root + "/cert.pem", toPath: root + "/certs/ca.crt")
        try """
        version: 0.1
        log:
          level: warn
        storage:
          filesystem:
            rootdirectory: \(root)/data
        http:
          addr: 127.0.0.1:\(port)
          tls:
            certificate: \(root)/cert.pem
            key: \(root)/key.pem
        auth:
          htpasswd:
            realm: stasis-test
            path: \(root)/htpasswd
        """.write(toFile: root + "/config.yml", atomically: true, encoding: .utf8)
        authFile = root + "/auth.json"
        let basic = Data("stasis:s3cret".utf8).base64EncodedString()
        try #"{"auths": {"localhost:\#(port)": {"auth": "\#(basic)"}}}"#.write(toFile: authFile, atomically: true, encoding: .utf8)
        process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/docker-registry")
        process.arguments = ["serve", root + "/config.yml"]
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: { FileManager.default.createFile(atPath: root + "/log", contents: nil); return root + "/log" }()))
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            if (try? TCPConnection.connect(to: "127.0.0.1:\(port)", seconds: 1)) != nil { return }
            usleep(100_000)
        }
        stop()
        Issue.record("the registry did not start: \((try? String(contentsOfFile: root + "/log", encoding: .utf8)) ?? "")")
        throw StasisError(.io, "no registry")
    }

    func stop() {
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    /// stasis with this registry's credentials and CA.
    func stasis(_ arguments: [String], store: String? = nil, environment: [String: String?] = [:]) throws -> Harness.Result {
        var environment = environment
        if environment["REGISTRY_AUTH_FILE"] == nil { environment["REGISTRY_AUTH_FILE"] = authFile }
        if let store { environment["STASIS_STORE"] = store }
        return try Harness.stasis(arguments + ["--ca", ca], environment: environment)
    }

    func json(_ result: Harness.Result) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any], "\(result.stdout) \(result.stderr)")
    }
}

extension Integration {
    /// Checkpoints between two "nodes" (two stores) through a registry, as a fleet would.
    @Suite struct Registry {
        /// A counting workload holding `memory` MiB, and a checkpoint of it taken with --leave-running.
        static func checkpointedWorkload(_ label: String, memory: Int) throws -> (Workload, String) {
            let workload = try Workload("counter", ["--mem", "\(memory)"])
            let checkpoint = Harness.scratch(label) + "/ckpt"
            let dump = try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint, "--leave-running")
            if !dump.succeeded { workload.stop() }
            try #require(dump.succeeded, "\(dump.stderr)")
            return (workload, checkpoint)
        }

        @Test func aCheckpointPushedFromOneStoreRestoresFromAnother() throws {
            let registry = try TestRegistry()
            defer { registry.stop() }
            let workload = try Workload("counter", ["--mem", "24"])
            defer { workload.stop() }
            let first = Harness.scratch("node-a") + "/first"
            #expect(try Harness.stasis("dump", "\(workload.pid)", "-D", first, "--leave-running").succeeded)
            let reference = "\(registry.host)/jobs/counter:first"
            let push = try registry.stasis(["push", first, reference, "--json"])
            try #require(push.succeeded, "\(push.stderr)")
            let pushed = try registry.json(push)
            let blobs = try #require(pushed["blobs"] as? Int)
            #expect(pushed["sentBlobs"] as? Int == blobs && pushed["presentBlobs"] as? Int == 0)

            // skopeo, a second reader, sees a valid OCI artifact.
            let inspect = try Harness.run("/usr/bin/skopeo", ["inspect", "--raw", "--cert-dir", registry.root + "/certs", "--creds", "stasis:s3cret", "docker://\(reference)"])
            #expect(inspect.succeeded && inspect.stdout.contains("application/vnd.stasis.checkpoint.v1"), "\(inspect.stderr)")

            // A second checkpoint of the same process sends only what changed.
            usleep(300_000)
            let second = Harness.scratch("node-a") + "/second"
            #expect(try Harness.stasis("dump", "\(workload.pid)", "-D", second, "--leave-running").succeeded)
            let again = try registry.json(try registry.stasis(["push", second, "\(registry.host)/jobs/counter:second", "--json"]))
            let sentAgain = try #require(again["sentBlobs"] as? Int), presentAgain = try #require(again["presentBlobs"] as? Int)
            #expect(presentAgain > 0 && sentAgain < presentAgain, "second push: \(again)")
            #expect((again["sentBytes"] as? Int ?? .max) < (pushed["sentBytes"] as? Int ?? 0) / 2, "second push: \(again)")

            // Node B: an empty store pulls the first whole, then only what the second adds.
            let storeB = Harness.scratch("node-b") + "/store"
            let pulledFirst = Harness.scratch("node-b") + "/first"
            let pull = try registry.json(try registry.stasis(["pull", reference, "-D", pulledFirst, "--json"], store: storeB))
            #expect(pull["presentChunks"] as? Int == 0)
            let pulledSecond = Harness.scratch("node-b") + "/second"
            let pullSecond = try registry.json(try registry.stasis(["pull", "\(registry.host)/jobs/counter:second", "-D", pulledSecond, "--json"], store: storeB))
            #expect((pullSecond["presentChunks"] as? Int ?? 0) > 0 && (pullSecond["fetchedBytes"] as? Int ?? .max) < (pull["fetchedBytes"] as? Int ?? 0) / 2,
                    "second pull: \(pullSecond)")
            #expect(try Harness.stasis(["verify", pulledSecond], environment: ["STASIS_STORE": storeB]).succeeded)

            // The original goes; node B restores the latest checkpoint, and the workload checks itself.
            kill(workload.pid, SIGKILL)
            #expect(Harness.waitGone(workload.pid))
            let restore = try Harness.stasis(["restore", pulledSecond], environment: ["STASIS_STORE": storeB])
            #expect(restore.succeeded, "\(restore.stderr)")
            #expect(workload.verify().hasPrefix("PASS"))
        }

        /// `stasis restore REF`: pulled into /var/lib/stasis/pulled/ID on first use, then restored from there
        /// again without fetching anything.
        @Test func aReferenceRestoresAndIsPulledOnlyOnce() throws {
            let registry = try TestRegistry()
            defer { registry.stop() }
            let (workload, checkpoint) = try Self.checkpointedWorkload("byref", memory: 8)
            defer { workload.stop() }
            let reference = "\(registry.host)/jobs/byref:one"
            #expect(try registry.stasis(["push", checkpoint, reference]).succeeded)
            let store = Harness.scratch("byref") + "/node-b-store"
            var pulledDirectory = ""
            defer { if !pulledDirectory.isEmpty { _ = try? Harness.stasis(["rm", pulledDirectory], environment: ["STASIS_STORE": store]) } }
            for round in 0..<2 {
                kill(workload.pid, SIGKILL)
                #expect(Harness.waitGone(workload.pid))
                let restore = try registry.stasis(["restore", reference], store: store)
                #expect(restore.succeeded, "\(restore.stderr)")
                #expect(restore.stdout.contains("  pull: ") == (round == 0), "round \(round): \(restore.stdout)")
                let restored = try #require(restore.stdout.split(separator: "\n").first { $0.hasPrefix("restored ") })
                pulledDirectory = String(restored.dropFirst("restored ".count).prefix { $0 != ":" })
                #expect(pulledDirectory.hasPrefix("/var/lib/stasis/pulled/"), "\(restore.stdout)")
                #expect(workload.verify().hasPrefix("PASS"))
            }
        }

        /// A checkpoint pushed to a second repository of the same registry is mounted from the first, blob by
        /// blob (cross-repository mount): nothing is sent, and it pulls and verifies from the second.
        @Test func aSecondRepositoryMountsWhatTheFirstHas() throws {
            let registry = try TestRegistry()
            defer { registry.stop() }
            let (workload, checkpoint) = try Self.checkpointedWorkload("mount", memory: 8)
            defer { workload.stop() }
            let first = try registry.json(try registry.stasis(["push", checkpoint, "\(registry.host)/team-a/job:one", "--json"]))
            #expect(first["mountedBlobs"] as? Int == 0)
            let second = try registry.json(try registry.stasis(["push", checkpoint, "\(registry.host)/team-b/job:one", "--json"]))
            #expect(second["sentBlobs"] as? Int == 0 && second["mountedBlobs"] as? Int == second["blobs"] as? Int, "\(second)")
            let pulled = Harness.scratch("mount") + "/pulled"
            let pull = try registry.stasis(["pull", "\(registry.host)/team-b/job:one", "-D", pulled], store: Harness.scratch("mount") + "/store-b")
            #expect(pull.succeeded, "\(pull.stderr)")
            #expect(try Harness.stasis(["verify", pulled], environment: ["STASIS_STORE": Harness.scratch("mount") + "/store-b"]).succeeded)
        }

        /// A checkpoint with more chunks than a manifest can list goes in packs of chunks with an index (the
        /// limit lowered here so that a small checkpoint reaches it): skopeo still reads it, a restore from it
        /// into an empty store verifies, and pushed again it sends nothing.
        @Test func aCheckpointPastTheLayerLimitGoesInPacks() throws {
            let registry = try TestRegistry()
            defer { registry.stop() }
            let (workload, checkpoint) = try Self.checkpointedWorkload("packs", memory: 24)
            defer { workload.stop() }
            let reference = "\(registry.host)/jobs/packed:one"
            let packing: [String: String?] = ["STASIS_REGISTRY_PACK_ABOVE": "1", "STASIS_REGISTRY_PACK_CHUNKS": "5"]
            let push = try registry.json(try registry.stasis(["push", checkpoint, reference, "--json"], environment: packing))
            let inspect = try Harness.run("/usr/bin/skopeo", ["inspect", "--raw", "--cert-dir", registry.root + "/certs", "--creds", "stasis:s3cret", "docker://\(reference)"])
            #expect(inspect.succeeded && inspect.stdout.contains("application/vnd.stasis.chunk-pack.v1")
                    && inspect.stdout.contains("application/vnd.stasis.chunk-pack-index.v1+json") && !inspect.stdout.contains("application/vnd.stasis.chunk.v1"),
                    "\(inspect.stdout.prefix(600))")
            let again = try registry.json(try registry.stasis(["push", checkpoint, reference, "--json"], environment: packing))
            #expect(again["sentBlobs"] as? Int == 0 && again["blobs"] as? Int == push["blobs"] as? Int, "\(push)\n\(again)")
            kill(workload.pid, SIGKILL)
            #expect(Harness.waitGone(workload.pid))
            let restore = try registry.stasis(["restore", reference, "--json"], store: Harness.scratch("packs") + "/node-b-store")
            #expect(restore.succeeded, "\(restore.stderr)")
            #expect(workload.verify().hasPrefix("PASS"))
            if let pulled = (try? registry.json(restore))?["pulled"] as? [String: Any], let directory = pulled["directory"] as? String {
                _ = try? Harness.stasis(["rm", directory], environment: ["STASIS_STORE": Harness.scratch("packs") + "/node-b-store"])
            }
        }

        /// `stasis restore REF` restores while the pull goes on; a pull that fails midway (after its first round
        /// of chunks, STASIS_FAULT=pull-later-round) fails the restore with nothing left running and nothing
        /// published, and the next restore fetches only what the first did not store.
        @Test func aRestoreOverlappingItsPullNeverRunsOnWhatDidNotArrive() throws {
            let registry = try TestRegistry()
            defer { registry.stop() }
            let (workload, checkpoint) = try Self.checkpointedWorkload("overlap", memory: 96)
            defer { workload.stop() }
            let reference = "\(registry.host)/jobs/overlap:one"
            #expect(try registry.stasis(["push", checkpoint, reference]).succeeded)
            kill(workload.pid, SIGKILL)
            #expect(Harness.waitGone(workload.pid))
            let store = Harness.scratch("overlap") + "/node-b-store"
            let failed = try registry.stasis(["restore", reference], store: store, environment: ["STASIS_FAULT": "pull-later-round"])
            #expect(!failed.succeeded && failed.stderr.contains("pull-later-round"), "\(failed.stdout)\n\(failed.stderr)")
            #expect(!ProcFS.isLive(workload.pid), "nothing restored runs")
            let pulled = (try? FileSystem.names(in: "/var/lib/stasis/pulled")) ?? []
            let manifestID = try #require(try JSONSerialization.jsonObject(with: Data(try FileSystem.readFile(checkpoint + "/manifest.json"))) as? [String: Any])["id"] as? String
            #expect(!pulled.contains { $0.hasPrefix(manifestID ?? "-") }, "nothing published: \(pulled)")
            let restore = try registry.stasis(["restore", reference, "--json"], store: store)
            #expect(restore.succeeded, "\(restore.stderr)")
            let report = try registry.json(restore)
            let pull = try #require(report["pulled"] as? [String: Any])
            #expect((pull["presentChunks"] as? Int ?? 0) >= 16, "the first round is not fetched again: \(pull)")
            #expect(workload.verify().hasPrefix("PASS"))
            if let directory = pull["directory"] as? String { _ = try? Harness.stasis(["rm", directory], environment: ["STASIS_STORE": store]) }
        }

        /// A registry that misbehaves (an answer of 500, a manifest over 4 MiB, a blob that is not what its
        /// digest says): each is a clear error, and nothing is published on either side.
        @Test func aRegistryThatMisbehavesIsRefusedAndNothingIsHalfPublished() throws {
            let root = Harness.scratch("bad-registry")
            let script = root + "/server.py"
            try #"""
            import hashlib, http.server, json, os, sys
            config = b'{"not": "what its digest says"}'
            claimed = "sha256:" + hashlib.sha256(b"something else").hexdigest()
            mismatch = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.stasis.checkpoint.manifest.v1+json", "digest": claimed, "size": len(config)},
                "layers": []}).encode()
            class Handler(http.server.BaseHTTPRequestHandler):
                protocol_version = "HTTP/1.1"
                def log_message(self, *args): pass
                def answer(self, status, body=b"", length=None):
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body) if length is None else length))
                    self.end_headers()
                    if self.command != "HEAD": self.wfile.write(body)
                def do_HEAD(self): self.answer(404)
                def do_POST(self): self.answer(500, json.dumps({"errors": [{"code": "UNKNOWN", "message": "disk on fire"}]}).encode())
                busy = 0
                def do_GET(self):
                    if self.path.endswith("/manifests/busy"):
                        # Too busy twice (the second time with a Retry-After), then missing: a client that backs off gets the 404.
                        Handler.busy += 1
                        if Handler.busy <= 2:
                            self.send_response(429 if Handler.busy == 1 else 503)
                            if Handler.busy == 2: self.send_header("Retry-After", "1")
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                        else:
                            self.answer(404)
                    elif self.path.endswith("/manifests/negative"): self.answer(200, b"{}", length=-5)
                    elif self.path.endswith("/manifests/hugechunk"):
                        self.send_response(200)
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        self.wfile.write(b"7fffffffffffffff\r\n{}")
                        self.close_connection = True
                    elif self.path.endswith("/manifests/big"): self.answer(200, b" " * (5 << 20))
                    elif self.path.endswith("/manifests/mismatch"): self.answer(200, mismatch)
                    elif "/blobs/" in self.path: self.answer(200, config)
                    else: self.answer(404)
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            open(sys.argv[1] + ".tmp", "w").write(str(server.server_address[1]))
            os.rename(sys.argv[1] + ".tmp", sys.argv[1])
            server.serve_forever()
            """#.write(toFile: script, atomically: true, encoding: .utf8)
            let server = Process()
            server.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
            server.arguments = [script, root + "/port"]
            try server.run()
            defer { kill(server.processIdentifier, SIGKILL); server.waitUntilExit() }
            var port = ""
            for _ in 0..<100 where port.isEmpty {
                port = (try? String(contentsOfFile: root + "/port", encoding: .utf8)) ?? ""
                if port.isEmpty { usleep(50_000) }
            }
            let host = "127.0.0.1:\(port)"

            let workload = try Workload("counter", ["--mem", "4"])
            defer { workload.stop() }
            let checkpoint = root + "/ckpt"
            #expect(try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint, "--leave-running").succeeded)
            let push = try Harness.stasis("push", checkpoint, "\(host)/jobs/x:one", "--plain-http")
            #expect(push.status == 1 && push.stderr.contains("answered 500") && push.stderr.contains("disk on fire") && push.stderr.contains("try again"),
                    "\(push.stderr)")

            let store = root + "/store"
            // A registry too busy (429, then 503 with Retry-After: 1) is waited for, not failed on.
            let watch = Date()
            let busy = try Harness.stasis(["pull", "\(host)/jobs/bad:busy", "-D", root + "/pulled-busy", "--plain-http"], environment: ["STASIS_STORE": store])
            #expect(busy.status == 1 && busy.stderr.contains("404"), "backed off, then the registry's answer: \(busy.stderr)")
            #expect(Date().timeIntervalSince(watch) >= 1.4, "waited 0.5 s, then the 1 s the registry asked for")
            for (tag, why) in [("big", "more than the \(4 << 20) allowed"), ("mismatch", "does not match its digest"),
                               ("negative", "is not a length"), ("hugechunk", "larger than the \(4 << 20) bytes allowed")] {
                let target = root + "/pulled-" + tag
                let pull = try Harness.stasis(["pull", "\(host)/jobs/bad:\(tag)", "-D", target, "--plain-http"], environment: ["STASIS_STORE": store])
                #expect(pull.status == 1 && pull.stderr.contains(why), "\(tag): \(pull.stderr)")
                #expect(!FileSystem.exists(target), "\(tag): nothing published")
            }
        }

        /// A pull killed after a round of chunks publishes nothing; run again, it fetches only the rest.
        @Test func aPullKilledMidwayResumesWithTheChunksItStored() throws {
            let registry = try TestRegistry()
            defer { registry.stop() }
            let (workload, checkpoint) = try Self.checkpointedWorkload("pull-resume", memory: 160)
            defer { workload.stop() }
            let reference = "\(registry.host)/jobs/pull-resume:one"
            #expect(try registry.stasis(["push", checkpoint, reference]).succeeded)
            let store = Harness.scratch("pull-resume") + "/store", target = Harness.scratch("pull-resume") + "/pulled"
            let killed = try registry.stasis(["pull", reference, "-D", target], store: store, environment: ["STASIS_FAULT": "pull-round-kill"])
            #expect(!killed.succeeded && !FileSystem.exists(target), "nothing published: \(killed.stderr)")
            let rerun = try registry.json(try registry.stasis(["pull", reference, "-D", target, "--json"], store: store))
            #expect((rerun["presentChunks"] as? Int ?? 0) >= 64, "the first round is not fetched again: \(rerun)")
            #expect(try Harness.stasis(["verify", target], environment: ["STASIS_STORE": store]).succeeded)
        }

        /// A push killed after some blobs left no tag; run again, it sends only what is still missing.
        @Test func aPushKilledMidwayResumesWithoutResendingAndNeverTagsMissingBlobs() throws {
            let registry = try TestRegistry()
            defer { registry.stop() }
            let (workload, checkpoint) = try Self.checkpointedWorkload("resume", memory: 24)
            defer { workload.stop() }
            let reference = "\(registry.host)/jobs/resume:one"
            let killed = try registry.stasis(["push", checkpoint, reference], environment: ["STASIS_FAULT": "push-blob-kill"])
            #expect(killed.status == 128 + SIGKILL || killed.status == -SIGKILL || !killed.succeeded)
            let pull = try registry.stasis(["pull", reference, "-D", Harness.scratch("resume") + "/pulled"], store: Harness.scratch("resume") + "/store")
            #expect(pull.status == 1 && pull.stderr.contains("404"), "no tag before the manifest: \(pull.stderr)")
            let rerun = try registry.json(try registry.stasis(["push", checkpoint, reference, "--json"]))
            #expect((rerun["presentBlobs"] as? Int ?? 0) >= 1, "the blob sent before the kill is not sent again: \(rerun)")
            #expect((rerun["sentBlobs"] as? Int ?? 0) + (rerun["presentBlobs"] as? Int ?? 0) == rerun["blobs"] as? Int)
        }

        /// Refusals name what failed and what to do: no credentials, a tag that is not there, a certificate
        /// no CA vouches for, plain HTTP to a TLS registry, a reference that is none.
        @Test func whatTheRegistryRefusesIsSaidClearly() throws {
            let registry = try TestRegistry()
            defer { registry.stop() }
            let (workload, checkpoint) = try Self.checkpointedWorkload("refused", memory: 4)
            defer { workload.stop() }
            let reference = "\(registry.host)/jobs/refused:one"

            let anonymous = try registry.stasis(["push", checkpoint, reference], environment: ["REGISTRY_AUTH_FILE": registry.root + "/none.json", "HOME": registry.root])
            #expect(anonymous.status == 1 && anonymous.stderr.contains("refused access (401)") && anonymous.stderr.contains("podman login"), "\(anonymous.stderr)")

            let missing = try registry.stasis(["pull", "\(registry.host)/jobs/refused:nothing", "-D", Harness.scratch("refused") + "/none"])
            #expect(missing.status == 1 && missing.stderr.contains("is not in the registry (404"), "\(missing.stderr)")
            #expect(!FileSystem.exists(Harness.scratch("refused") + "/none"))

            let untrusted = try Harness.stasis(["push", checkpoint, reference], environment: ["REGISTRY_AUTH_FILE": registry.authFile])
            #expect(untrusted.status == 1 && untrusted.stderr.contains("certificate is refused") && untrusted.stderr.contains("--ca"), "\(untrusted.stderr)")

            let plain = try Harness.stasis(["push", checkpoint, reference, "--plain-http"], environment: ["REGISTRY_AUTH_FILE": registry.authFile])
            #expect(plain.status == 1 && !plain.stderr.contains("Fatal"), "\(plain.stderr)")

            let notAReference = try registry.stasis(["push", checkpoint, "counter:latest"])
            #expect(notAReference.status == 1 && notAReference.stderr.contains("not a registry reference"), "\(notAReference.stderr)")
        }
    }
}
