import Foundation
import StasisContainer
import StasisCore
import StasisOS

/// containerd's checkpoint image, as `ctr containers checkpoint --task` makes it and `ctr image export
/// --skip-manifest-json` writes it: an OCI image layout (oci-layout, index.json, blobs/sha256/...) whose
/// index points to an index of the checkpoint's parts, each a blob named by its media type:
///
///     application/vnd.containerd.container.criu.checkpoint.criu.tar        CRIU's images, a tar
///     application/vnd.oci.image.layer.v1.tar+gzip                          the container's rw layer (--rw)
///     application/vnd.containerd.container.checkpoint.config.v1+proto      the container's record (protobuf)
///     application/vnd.containerd.container.checkpoint.options.v1+proto     and its runtime's options
///
/// with annotations naming the runtime and the image. `stasis inspect` reads it in one pass; the blobs come
/// before index.json, so every part is looked at as it passes and matched to its media type at the end.
enum ContainerdCheckpoint {
    static let criuMediaType = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
    static let layerMediaType = "application/vnd.oci.image.layer.v1.tar+gzip"

    /// What a blob holds, as far as a summary needs: its size, its bytes when small (JSON), and the files
    /// of a tar inside it.
    struct Blob {
        var size: UInt64
        var contents: Data?
        var tarFiles: [(name: String, size: UInt64)]?
    }

    /// Blobs this small are kept whole (the indexes are JSON of a few hundred bytes); larger ones are only
    /// listed as they pass. What is kept in all is bounded, so that a crafted image cannot fill memory.
    static let smallBlob: UInt64 = 64 << 10
    static let keptLimit = 16 << 20

    /// Summarizes the OCI layout `reader` is reading (`first` its first entry, already taken).
    static func summarize(_ reader: Tar.Reader, first: Tar.Reader.Entry?, archive: String) throws -> ArchiveOperation.Summary {
        var blobs: [String: Blob] = [:]
        var index: Data?
        var kept = 0
        var entry = first
        while let current = entry {
            if current.isFile {
                if current.name == "index.json" {
                    index = try reader.readAll()
                    kept += index?.count ?? 0
                } else if current.name.hasPrefix("blobs/sha256/") {
                    let digest = "sha256:" + current.name.dropFirst("blobs/sha256/".count)
                    let blob = try blob(reader, current, archive: archive)
                    kept += blob.contents?.count ?? 0
                    blobs[digest] = blob
                }
                guard kept <= keptLimit else {
                    throw StasisError(.integrity, "\(archive) holds more than \(keptLimit >> 20) MiB of small blobs: not a checkpoint image containerd wrote")
                }
            }
            entry = try reader.next()
        }
        guard let index else { throw StasisError(.notACheckpoint, "\(archive) is an OCI image layout without index.json") }
        // index.json -> the checkpoint's own index -> its parts.
        func object(_ data: Data?) -> [String: Any]? { data.flatMap { try? JSONSerialization.jsonObject(with: $0) as? [String: Any] } }
        let outer = object(index)
        guard let top = (outer?["manifests"] as? [[String: Any]])?.first, let topDigest = top["digest"] as? String,
              let checkpoint = object(blobs[topDigest]?.contents), let parts = checkpoint["manifests"] as? [[String: Any]] else {
            throw StasisError(.notACheckpoint, "\(archive) is an OCI image layout, but not of a checkpoint (its index names no checkpoint index)")
        }
        let annotations = checkpoint["annotations"] as? [String: String] ?? [:]
        func part(_ mediaType: String) -> Blob? {
            (parts.first { $0["mediaType"] as? String == mediaType }?["digest"] as? String).flatMap { blobs[$0] }
        }
        guard let criu = part(criuMediaType), let files = criu.tarFiles else {
            throw StasisError(.notACheckpoint, "\(archive) is an OCI image layout without CRIU's images (\(criuMediaType))",
                              hint: "an image of a container, not of its checkpoint? `ctr containers checkpoint --task` makes one with them")
        }
        let name = (top["annotations"] as? [String: String])?["io.containerd.image.name"] ?? "?"
        let pages = files.filter { ($0.name as NSString).lastPathComponent.hasPrefix("pages-") }.reduce(0) { $0 + $1.size }
        return ArchiveOperation.Summary(
            archive: archive, engine: "containerd (image \(annotations["org.opencontainers.image.ref.name"] ?? "?"), snapshotter \(annotations["io.containerd.checkpoint.snapshotter"] ?? "?"))",
            container: name, name: name, runtime: annotations["io.containerd.checkpoint.runtime"], created: nil,
            checkpointBytes: criu.size, pagesBytes: pages, rootfsDiffBytes: part(layerMediaType)?.size,
            files: files.map { "checkpoint/" + $0.name })
    }

    /// A blob as it passes: small ones kept whole, a tar listed.
    private static func blob(_ reader: Tar.Reader, _ entry: Tar.Reader.Entry, archive: String) throws -> Blob {
        if entry.size <= smallBlob {
            let data = try reader.readAll()
            return Blob(size: entry.size, contents: data, tarFiles: tarListing(of: data, archive: archive + ":" + entry.name))
        }
        // A larger one is CRIU's tar or a layer: listed if it is a tar, else passed over.
        let inner = Tar.Reader(entryOf: reader, path: archive + ":" + entry.name)
        var files: [(String, UInt64)] = []
        do {
            while let file = try inner.next() { if file.isFile { files.append((file.name, file.size)) } }
        } catch let error as StasisError where error.code == .notACheckpoint && files.isEmpty {
            return Blob(size: entry.size, contents: nil, tarFiles: nil)
        }
        return Blob(size: entry.size, contents: nil, tarFiles: files)
    }

    /// The files of a small blob that is a tar; nil for any other blob.
    private static func tarListing(of data: Data, archive: String) -> [(name: String, size: UInt64)]? {
        guard data.count >= 512, data[data.startIndex + 257..<data.startIndex + 262].elementsEqual("ustar".utf8) else { return nil }
        let reader = Tar.Reader(data: data, path: archive)
        var files: [(String, UInt64)] = []
        while let file = try? reader.next() { if file.isFile { files.append((file.name, file.size)) } }
        return files
    }
}
