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

    /// The part of an OCI index (index.json, the checkpoint's own index) that a summary reads, decoded
    /// leniently (a field of another type is absent). Decoded rather than parsed into objects: a crafted
    /// index of 1 MiB of small objects took JSONSerialization to 260 MB.
    struct OCIIndex: Decodable {
        struct Descriptor: Decodable {
            var mediaType: String?
            var digest: String?
            var annotations: [String: String]?

            init(from decoder: Decoder) throws {
                let fields = try decoder.container(keyedBy: CodingKeys.self)
                // containerd's JSON, read leniently: a field of another type counts as absent, and what is then missing is refused by name.
                mediaType = try? fields.decodeIfPresent(String.self, forKey: .mediaType)
                digest = try? fields.decodeIfPresent(String.self, forKey: .digest)  // lenient, as above
                annotations = try? fields.decodeIfPresent([String: String].self, forKey: .annotations)  // lenient, as above
            }

            enum CodingKeys: String, CodingKey { case mediaType, digest, annotations }
        }

        var manifests: [Descriptor]?
        var annotations: [String: String]?

        init(from decoder: Decoder) throws {
            let fields = try decoder.container(keyedBy: CodingKeys.self)
            // Lenient, as Descriptor's fields above.
            manifests = try? fields.decodeIfPresent([Descriptor].self, forKey: .manifests)
            annotations = try? fields.decodeIfPresent([String: String].self, forKey: .annotations)  // lenient, as above
        }

        enum CodingKeys: String, CodingKey { case manifests, annotations }
    }

    /// What a blob holds, as far as a summary needs: its size, its bytes when small (JSON), and what a tar
    /// inside it lists.
    struct Blob {
        var size: UInt64
        var contents: Data?
        var listing: Listing?
    }

    /// The files of a tar in a blob: how many, the bytes of CRIU's memory pages among them, and the first
    /// `ArchiveOperation.listedFiles` names (with their sizes).
    struct Listing {
        var count = 0
        var pagesBytes: UInt64 = 0
        var names: [String] = []
        var nameBytes: Int { names.reduce(0) { $0 + $1.utf8.count } }

        mutating func add(_ file: Tar.Reader.Entry) {
            count += 1
            if (file.name as NSString).lastPathComponent.hasPrefix("pages-") { pagesBytes += file.size }
            if names.count < ArchiveOperation.listedFiles { names.append(file.name) }
        }
    }

    /// Blobs this small are kept whole (the indexes are JSON of a few hundred bytes); larger ones are only
    /// listed as they pass. What is kept in all (blobs, their digests and listings) is bounded, so that a
    /// crafted image cannot fill memory.
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
                    let data = try reader.readAll()
                    kept += data.count
                    index = data
                } else if current.name.hasPrefix("blobs/sha256/") {
                    let digest = "sha256:" + current.name.dropFirst("blobs/sha256/".count)
                    let blob = try blob(reader, current, archive: archive)
                    kept += digest.utf8.count + (blob.contents?.count ?? 0) + (blob.listing?.nameBytes ?? 0)
                    blobs[digest] = blob
                }
                guard kept <= keptLimit else {
                    throw StasisError(.integrity, "\(archive) holds more than \(keptLimit >> 20) MiB of indexes, small blobs and names: not a checkpoint image containerd wrote")
                }
            }
            entry = try reader.next()
        }
        guard let index else { throw StasisError(.notACheckpoint, "\(archive) is an OCI image layout without index.json") }
        // index.json -> the checkpoint's own index -> its parts.
        func decoded(_ data: Data?) -> OCIIndex? { data.flatMap { try? JSONDecoder().decode(OCIIndex.self, from: $0) } }
        guard let top = decoded(index)?.manifests?.first, let topDigest = top.digest,
              let checkpoint = decoded(blobs[topDigest]?.contents), let parts = checkpoint.manifests else {
            throw StasisError(.notACheckpoint, "\(archive) is an OCI image layout, but not of a checkpoint (its index names no checkpoint index)")
        }
        let annotations = checkpoint.annotations ?? [:]
        func part(_ mediaType: String) -> Blob? {
            (parts.first { $0.mediaType == mediaType }?.digest).flatMap { blobs[$0] }
        }
        guard let criu = part(criuMediaType), let files = criu.listing else {
            throw StasisError(.notACheckpoint, "\(archive) is an OCI image layout without CRIU's images (\(criuMediaType))",
                              hint: "an image of a container, not of its checkpoint? `ctr containers checkpoint --task` makes one with them")
        }
        // What is printed comes from the image's writer: one with control characters or bidi overrides is refused.
        func printable(_ value: String?, _ what: String) throws -> String {
            guard let value else { return "?" }
            try ArchiveOperation.checkPrintable(value, what, archive: archive)
            return ArchiveText.quotedLimit < value.count ? String(value.prefix(ArchiveText.quotedLimit)) + "..." : value
        }
        let name = try printable(top.annotations?["io.containerd.image.name"], "its image name")
        let image = try printable(annotations["org.opencontainers.image.ref.name"], "its image reference")
        let snapshotter = try printable(annotations["io.containerd.checkpoint.snapshotter"], "its snapshotter")
        let runtime = try annotations["io.containerd.checkpoint.runtime"].map { try printable($0, "its runtime") }
        return ArchiveOperation.Summary(
            archive: archive, engine: "containerd (image \(image), snapshotter \(snapshotter))",
            container: name, name: name, runtime: runtime, created: nil,
            checkpointBytes: criu.size, pagesBytes: files.pagesBytes, rootfsDiffBytes: part(layerMediaType)?.size,
            files: files.names.map { "checkpoint/" + $0 }, fileCount: files.count)
    }

    /// A blob as it passes: small ones kept whole, a tar listed.
    private static func blob(_ reader: Tar.Reader, _ entry: Tar.Reader.Entry, archive: String) throws -> Blob {
        if entry.size <= smallBlob {
            let data = try reader.readAll()
            return Blob(size: entry.size, contents: data, listing: tarListing(of: data, within: reader, archive: archive + ":" + entry.name))
        }
        // A larger one is CRIU's tar or a layer: listed if it is a tar, else passed over. Its entries count
        // against the image's limits.
        let inner = Tar.Reader(entryOf: reader, path: archive + ":" + entry.name)
        var listing = Listing()
        do {
            while let file = try inner.next() { if file.isFile { listing.add(file) } }
        } catch let error as StasisError where error.code == .notACheckpoint && listing.count == 0 {
            return Blob(size: entry.size, contents: nil, listing: nil)
        }
        return Blob(size: entry.size, contents: nil, listing: listing)
    }

    /// The files of a small blob that is a tar (nil for any other blob), as far as it reads. Its entries
    /// count against the image's limits, so an image past them is refused at the outer reader's next entry.
    private static func tarListing(of data: Data, within reader: Tar.Reader, archive: String) -> Listing? {
        guard data.count >= 512, data[data.startIndex + 257..<data.startIndex + 262].elementsEqual("ustar".utf8) else { return nil }
        let inner = Tar.Reader(data: data, path: archive, within: reader)
        var listing = Listing()
        // "As far as it reads": an inner tar that goes bad ends its listing; the limits still hold.
        while let file = try? inner.next() { if file.isFile { listing.add(file) } }
        return listing
    }
}
