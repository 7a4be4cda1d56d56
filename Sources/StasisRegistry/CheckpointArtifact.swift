import Crypto
import Foundation
import StasisCore
import StasisOS

/// An OCI blob's name: "sha256:" and the SHA-256 of its bytes in lowercase hex.
public enum BlobDigest {
    public static func of(_ bytes: UnsafeRawBufferPointer) -> String { "sha256:" + SegmentedDigest.hex(SHA256.hash(data: bytes)) }
    public static func of<Bytes: ContiguousBytes>(_ bytes: Bytes) -> String { bytes.withUnsafeBytes { of($0) } }

    /// Whether `text` is such a name (anything else a registry or a reference gives is refused).
    public static func isValid(_ text: String) -> Bool {
        text.hasPrefix("sha256:") && text.count == 71 && text.dropFirst(7).allSatisfy { $0.isHexDigit && !$0.isUppercase }
    }
}

/// How a checkpoint lies in a registry: one OCI image manifest (artifact type `artifactType`) whose config
/// is the checkpoint's manifest.json and whose layers are its blobs: each whole file, and each stored chunk
/// as the store keeps it (compressed, with its header). A chunk's blob is named by the SHA-256 of those
/// stored bytes, as OCI requires; its annotation `chunkAnnotation` gives the SHA-256 of its plain content,
/// the name the manifest and every store use. Chunks are blobs of their own rather than packs: the same
/// chunk in two checkpoints is then one blob the registry already has (nothing is sent twice), and a pull
/// fetches exactly the chunks its store lacks. The cost is the manifest's size, a layer of about 250 bytes a
/// chunk: within distribution's 4 MiB for checkpoints up to about 16,000 chunks (16-32 GiB). Past that, the
/// chunks go in packs (`packMediaType`: stored chunk files one after another, a few per pack, in the order a
/// restore reads them) and one more layer, the pack index (`packIndexMediaType`), says which chunk lies where.
public enum CheckpointArtifact {
    public static let artifactType = "application/vnd.stasis.checkpoint.v1"
    public static let manifestMediaType = "application/vnd.oci.image.manifest.v1+json"
    public static let configMediaType = "application/vnd.stasis.checkpoint.manifest.v1+json"
    public static let fileMediaType = "application/vnd.stasis.checkpoint.file.v1"
    public static let chunkMediaType = "application/vnd.stasis.chunk.v1"
    public static let packMediaType = "application/vnd.stasis.chunk-pack.v1"
    public static let packIndexMediaType = "application/vnd.stasis.chunk-pack-index.v1+json"
    /// Layers a manifest may have before its chunks go in packs (about 250 bytes each, within 4 MiB).
    public static let maxLayers = 15_000
    /// Packs a manifest holds at most: a pack holds as many chunks as that takes.
    public static let maxPacks = 12_000
    /// The largest pack and pack index a pull takes (a push refuses to make larger ones).
    public static let maxPackBytes = 1 << 30
    public static let maxPackIndexBytes = 256 << 20

    /// Where each chunk of a packed checkpoint lies: its pack (a layer's digest), and its stored bytes there.
    public struct PackIndex: Codable, Sendable, Equatable {
        public struct Member: Codable, Sendable, Equatable {
            /// The chunk's name (the SHA-256 of its plain content), its offset and length in the pack.
            public var chunk: String
            public var offset: Int
            public var length: Int
            public init(chunk: String, offset: Int, length: Int) { (self.chunk, self.offset, self.length) = (chunk, offset, length) }
        }
        public struct Pack: Codable, Sendable, Equatable {
            public var digest: String
            public var members: [Member]
            public init(digest: String, members: [Member]) { (self.digest, self.members) = (digest, members) }
        }
        public var packs: [Pack]
        public init(packs: [Pack]) { self.packs = packs }

        /// Refuses an index whose members do not lie inside their packs, one after another.
        public func check(layers: [String: Int], reference: String) throws {
            for pack in packs {
                guard let size = layers[pack.digest] else {
                    throw StasisError(.manifestInvalid, "the pack index of \(reference) names a pack \(Format.printable(pack.digest)) that is not a layer")
                }
                var end = 0
                for member in pack.members {
                    guard member.offset == end, member.length > 0, member.length <= size - member.offset else {
                        throw StasisError(.manifestInvalid, "the pack index of \(reference) places chunk \(Format.printable(member.chunk)) outside its pack")
                    }
                    end += member.length
                }
            }
        }
    }

    /// Chunks a pack holds so that `chunks` fit in `maxPacks` packs.
    public static func chunksPerPack(_ chunks: Int) -> Int { max(1, (chunks + maxPacks - 1) / maxPacks) }
    public static let titleAnnotation = "org.opencontainers.image.title"
    public static let chunkAnnotation = "dev.stasis.chunk"

    public struct Descriptor: Codable, Sendable, Equatable {
        public var mediaType: String
        public var digest: String
        public var size: Int
        public var annotations: [String: String]?
        public init(mediaType: String, digest: String, size: Int, annotations: [String: String]? = nil) {
            (self.mediaType, self.digest, self.size, self.annotations) = (mediaType, digest, size, annotations)
        }
    }

    public struct ImageManifest: Codable, Sendable {
        public var schemaVersion = 2
        public var mediaType = CheckpointArtifact.manifestMediaType
        public var artifactType: String? = CheckpointArtifact.artifactType
        public var config: Descriptor
        public var layers: [Descriptor]
        public var annotations: [String: String]?
        public init(config: Descriptor, layers: [Descriptor], annotations: [String: String]? = nil) {
            (self.config, self.layers, self.annotations) = (config, layers, annotations)
        }
    }

    /// The annotations a registry's listing shows for `manifest`: when, which CRIU, GPUs and workload.
    public static func annotations(for manifest: Manifest) -> [String: String] {
        let formatter = ISO8601DateFormatter()
        var annotations = [
            "org.opencontainers.image.created": formatter.string(from: manifest.createdAt),
            "dev.stasis.checkpoint.id": manifest.id,
            "dev.stasis.criu.version": manifest.criu.version,
            "dev.stasis.host": manifest.host.hostname,
        ]
        if let root = manifest.processTree.processes.first(where: { $0.pid == manifest.processTree.rootPID }) {
            annotations["dev.stasis.workload"] = String((root.arguments.isEmpty ? root.command : root.arguments.joined(separator: " ")).prefix(200))
        }
        if !manifest.gpu.devices.isEmpty {
            annotations["dev.stasis.gpus"] = manifest.gpu.devices.map { "\($0.name) (\($0.uuid))" }.joined(separator: ", ")
        }
        if let container = manifest.container { annotations["dev.stasis.container"] = container.id }
        return annotations
    }

    public static func encode(_ manifest: ImageManifest) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Array(try encoder.encode(manifest))
    }

    /// Reads an image manifest from a registry, refusing what is not a stasis checkpoint.
    public static func decode(_ bytes: [UInt8], reference: String) throws -> ImageManifest {
        let manifest: ImageManifest
        do { manifest = try JSONDecoder().decode(ImageManifest.self, from: Data(bytes)) } catch {
            throw StasisError(.manifestInvalid, "the manifest of \(reference) is not an OCI image manifest: \(error)")
        }
        guard manifest.schemaVersion == 2, manifest.config.mediaType == configMediaType else {
            throw StasisError(.manifestInvalid, "\(reference) is not a stasis checkpoint (its config is \(Format.printable(manifest.config.mediaType)))",
                              hint: "a container image? stasis pulls what `stasis push` pushed")
        }
        for layer in manifest.layers + [manifest.config] where !BlobDigest.isValid(layer.digest) || layer.size < 0 {
            throw StasisError(.manifestInvalid, "the manifest of \(reference) names a blob \(Format.printable(layer.digest)) that is not a SHA-256 digest")
        }
        return manifest
    }
}
