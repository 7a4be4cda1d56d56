import Foundation
import StasisCore
import Testing

/// The manifest names its chunk store by kind; manifests written before it did still read as a directory store.
@Suite struct StoreKindInManifest {
    func withStore(_ info: Manifest.StoreInfo) -> Manifest {
        var manifest = ManifestDecoding.sample()
        manifest.store = info
        return manifest
    }

    func info() -> Manifest.StoreInfo {
        .init(path: "/var/lib/stasis/store", chunkSize: 2 << 20, codec: "lz4", plainBytes: 1, storedBytes: 1, newChunks: 1,
              reusedChunks: 0, zeroChunks: 0)
    }

    @Test func aManifestWithoutAStoreKindReadsAsADirectoryStore() throws {
        let encoded = try Manifest.encoder().encode(withStore(info()))
        // As every manifest written before the kind was recorded: the key is absent.
        var object = try #require(try JSONSerialization.jsonObject(with: encoded) as? [String: Any])
        var store = try #require(object["store"] as? [String: Any])
        store.removeValue(forKey: "kind")
        object["store"] = store
        let old = try JSONSerialization.data(withJSONObject: object)
        let decoded = try Manifest.decode(old, path: "m")
        #expect(decoded.store?.kind == nil)
        #expect(try decoded.store?.storeKind() == .directory)
        #expect(decoded.store?.path == "/var/lib/stasis/store")
    }

    @Test func aNewManifestRecordsItsStoreKindAndPathAndRoundTrips() throws {
        let manifest = withStore(info())
        let encoded = try Manifest.encoder().encode(manifest)
        let store = try #require((try JSONSerialization.jsonObject(with: encoded) as? [String: Any])?["store"] as? [String: Any])
        #expect(store["kind"] as? String == "directory")
        // Still written, so that an older stasis (which reads only the path) reads new manifests.
        #expect(store["path"] as? String == "/var/lib/stasis/store")
        let decoded = try Manifest.decode(encoded, path: "m")
        #expect(decoded == manifest)
        #expect(try decoded.store?.storeKind() == .directory)
    }

    @Test func aStoreKindThisBuildDoesNotKnowIsRefusedByName() throws {
        var unknown = info()
        unknown.kind = "registry"
        let decoded = try Manifest.decode(try Manifest.encoder().encode(withStore(unknown)), path: "m")
        let error = try #require(throws: StasisError.self) { try decoded.store?.storeKind() }
        #expect(error.code == .manifestVersion)
        #expect(error.message.contains("registry"))
    }
}
