import Foundation
import StasisCore
@testable import StasisRegistry
import Testing

/// References, credential files and authentication challenges, as registries and container tools write them.
@Suite struct RegistryPieces {
    @Test func referencesAreParsedAsContainerToolsWriteThem() throws {
        let full = try RegistryReference(parsing: "registry.example.com:5000/jobs/bert:step-1000")
        #expect(full.host == "registry.example.com" && full.port == 5000 && full.repository == "jobs/bert" && full.tag == "step-1000")
        #expect(full.reference == "step-1000" && full.registry == "registry.example.com:5000")
        let digest = "sha256:" + String(repeating: "ab", count: 32)
        let pinned = try RegistryReference(parsing: "localhost/ckpt@" + digest)
        #expect(pinned.host == "localhost" && pinned.port == nil && pinned.tag == nil && pinned.reference == digest)
        let bare = try RegistryReference(parsing: "127.0.0.1:5000/a")
        #expect(bare.reference == "latest" && bare.description == "127.0.0.1:5000/a")
        for bad in ["bert:latest", "docker.io", "host.example/UPPER", "host.example/a:b c", "host.example/a@sha256:xyz",
                    "host.example:99999/a", "host.example/a//b", "host.example/"] {
            #expect(throws: StasisError.self, "\(bad)") { try RegistryReference(parsing: bad) }
        }
        #expect(RegistryReference.looksLikeReference("registry.example.com/jobs/bert:1"))
        #expect(!RegistryReference.looksLikeReference("/var/lib/ckpt") && !RegistryReference.looksLikeReference("ckpt/one"))
    }

    @Test func credentialsComeFromTheFirstFileThatHasTheRegistry() throws {
        let directory = NSTemporaryDirectory() + "stasis-auth-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let first = directory + "/auth.json", second = directory + "/config.json", broken = directory + "/broken.json"
        let basic = Data("stasis:s3cret:with:colons".utf8).base64EncodedString()
        try #"{"auths": {"other.example": {"auth": "eDp5"}}}"#.write(toFile: first, atomically: true, encoding: .utf8)
        try #"{"auths": {"https://registry.example.com:5000/v1/": {"auth": "\#(basic)"}}}"#.write(toFile: second, atomically: true, encoding: .utf8)
        try "not json".write(toFile: broken, atomically: true, encoding: .utf8)
        let found = try #require(try RegistryCredentials.lookup("registry.example.com:5000", files: [directory + "/missing.json", first, second]))
        #expect(found.user == "stasis" && found.password == "s3cret:with:colons" && found.source == second)
        #expect(try RegistryCredentials.lookup("nowhere.example", files: [first, second]) == nil)
        #expect(throws: StasisError.self) { try RegistryCredentials.lookup("registry.example.com:5000", files: [broken]) }
        let files = RegistryCredentials.files(environment: ["REGISTRY_AUTH_FILE": "/a.json", "HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1"])
        #expect(files == ["/a.json", "/run/user/1/containers/auth.json", "/home/u/.config/containers/auth.json", "/home/u/.docker/config.json"])
    }

    @Test func challengeParametersAndURLs() {
        let parameters = RegistrySession.parameters(#" realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#)
        #expect(parameters == ["realm": "https://auth.example/token", "service": "registry.example", "scope": "repository:a/b:pull,push"])
        let (endpoint, target) = try! #require(HTTPEndpoint.parse(url: "http://127.0.0.1:5000/v2/a/blobs/uploads/x?_state=y"))
        #expect(endpoint == HTTPEndpoint(secure: false, host: "127.0.0.1", port: 5000) && target == "/v2/a/blobs/uploads/x?_state=y")
        #expect(HTTPEndpoint.parse(url: "https://registry.example/v2/")?.endpoint.port == 443)
        #expect(HTTPEndpoint.parse(url: "/v2/relative") == nil && HTTPEndpoint.parse(url: "ftp://x/y") == nil)
    }

    /// A pack index is trusted only when each member lies inside its pack, right after the one before.
    @Test func aPackIndexMustPlaceEveryChunkInsideItsPack() throws {
        typealias Index = CheckpointArtifact.PackIndex
        let pack = "sha256:" + String(repeating: "a", count: 64)
        let good = Index(packs: [.init(digest: pack, members: [.init(chunk: "c1", offset: 0, length: 10), .init(chunk: "c2", offset: 10, length: 5)])])
        try good.check(layers: [pack: 15], reference: "r")
        #expect(throws: StasisError.self) { try good.check(layers: [pack: 14], reference: "r") }  // past the pack's end
        #expect(throws: StasisError.self) { try good.check(layers: [:], reference: "r") }         // no such layer
        let gap = Index(packs: [.init(digest: pack, members: [.init(chunk: "c1", offset: 0, length: 10), .init(chunk: "c2", offset: 11, length: 4)])])
        #expect(throws: StasisError.self) { try gap.check(layers: [pack: 15], reference: "r") }
        let empty = Index(packs: [.init(digest: pack, members: [.init(chunk: "c1", offset: 0, length: 0)])])
        #expect(throws: StasisError.self) { try empty.check(layers: [pack: 15], reference: "r") }
        let huge = Index(packs: [.init(digest: pack, members: [.init(chunk: "c1", offset: 0, length: 10), .init(chunk: "c2", offset: 10, length: Int.max)])])
        #expect(throws: StasisError.self) { try huge.check(layers: [pack: 15], reference: "r") }  // refused, not an overflow
        #expect(CheckpointArtifact.chunksPerPack(100) == 1 && CheckpointArtifact.chunksPerPack(70_000) == 6)
    }

    @Test func onlyStasisCheckpointsAreTakenFromARegistry() throws {
        let digest = "sha256:" + String(repeating: "0", count: 64)
        let image = #"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"\#(digest)","size":2},"layers":[]}"#
        #expect(throws: StasisError.self) { try CheckpointArtifact.decode(Array(image.utf8), reference: "r") }
        let ours = CheckpointArtifact.ImageManifest(config: .init(mediaType: CheckpointArtifact.configMediaType, digest: digest, size: 2),
                                                    layers: [.init(mediaType: CheckpointArtifact.chunkMediaType, digest: digest, size: 9,
                                                                   annotations: [CheckpointArtifact.chunkAnnotation: "ab"])])
        let decoded = try CheckpointArtifact.decode(try CheckpointArtifact.encode(ours), reference: "r")
        #expect(decoded.layers == ours.layers && decoded.artifactType == CheckpointArtifact.artifactType)
        var bad = ours
        bad.layers[0].digest = "sha256:../../etc"
        #expect(throws: StasisError.self) { try CheckpointArtifact.decode(try CheckpointArtifact.encode(bad), reference: "r") }
    }
}
