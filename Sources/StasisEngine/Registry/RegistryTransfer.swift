import Foundation
import StasisCore
import StasisImage
import StasisOS
import StasisRegistry
import StasisStore

/// `stasis push` and `stasis pull`: a checkpoint to and from an OCI registry (`CheckpointArtifact` says how it
/// lies there). Push sends only the blobs the registry lacks (HEAD first), many at once, and the manifest
/// last, so a tag never names a blob that is not there; a push stopped half-way and run again sends only what
/// is still missing. Pull fetches only the chunks the local store lacks, checks every blob against its digest
/// and every chunk against its content's, and publishes the checkpoint directory as an import does: complete,
/// listed in the store, or not at all.
public enum RegistryTransfer {
    public struct Options: Sendable {
        public var reference: RegistryReference
        public var plainHTTP = false
        public var caFile: String?
        /// The local chunk store (default: the checkpoint's for push, STASIS_STORE or the default for pull).
        public var store: String?
        /// Blobs in flight at once.
        public var threads = 8
        public init(reference: RegistryReference) { self.reference = reference }

        func client() throws -> RegistryClient {
            try RegistryClient(reference, plainHTTP: plainHTTP, caFile: caFile, credentials: try RegistryCredentials.lookup(reference.registry))
        }
    }

    public struct PushReport: Codable, Sendable {
        public var reference: String
        public var digest: String
        public var blobs: Int
        public var sentBlobs: Int
        public var sentBytes: UInt64
        public var presentBlobs: Int
        public var presentBytes: UInt64
        /// Blobs the registry mounted from another of its repositories (`PushHistory`): not sent either.
        public var mountedBlobs: Int
        public var mountedBytes: UInt64
        public var seconds: Double
    }

    public struct PullReport: Codable, Sendable {
        public var reference: String
        public var digest: String
        public var directory: String
        public var store: String?
        public var fetchedBlobs: Int
        public var fetchedBytes: UInt64
        /// Chunks the local store had already: not fetched.
        public var presentChunks: Int
        public var seconds: Double
    }

    /// Blobs a push sent, those the registry had, and those it mounted from another repository.
    struct Tally {
        var sent = 0, sentBytes: UInt64 = 0, present = 0, presentBytes: UInt64 = 0, mounted = 0, mountedBytes: UInt64 = 0
        mutating func add(_ bytes: Int, _ outcome: RegistrySession.BlobPush) {
            switch outcome {
            case .sent: (sent, sentBytes) = (sent + 1, sentBytes + UInt64(bytes))
            case .present: (present, presentBytes) = (present + 1, presentBytes + UInt64(bytes))
            case .mounted: (mounted, mountedBytes) = (mounted + 1, mountedBytes + UInt64(bytes))
            }
        }
        func report(_ reference: RegistryReference, digest: String, blobs: Int, since watch: Stopwatch) -> PushReport {
            PushReport(reference: reference.description, digest: digest, blobs: blobs, sentBlobs: sent, sentBytes: sentBytes,
                       presentBlobs: present, presentBytes: presentBytes, mountedBlobs: mounted, mountedBytes: mountedBytes, seconds: watch.seconds)
        }
    }

    /// The tag a push puts its manifest under; a reference by digest cannot be pushed to.
    static func tag(of reference: RegistryReference) throws -> String {
        guard reference.digest == nil else {
            throw StasisError(.invalidArgument, "push needs a tag, not a digest: \(reference)", hint: "name it REPOSITORY:TAG")
        }
        return reference.tag ?? "latest"
    }

    /// What one layer is made of, before it is hashed and sent.
    private enum Source: Sendable {
        case file(Manifest.FileEntry)
        case chunk(String, ChunkPlace)
        case pack([(String, ChunkPlace)])
    }

    /// Layers above which a push packs its chunks (`CheckpointArtifact.maxLayers`; STASIS_REGISTRY_PACK_ABOVE
    /// lowers it, and STASIS_REGISTRY_PACK_CHUNKS sets the chunks a pack holds, so that tests reach packs
    /// with small checkpoints).
    static var packAbove: Int { Int(ProcessInfo.processInfo.environment["STASIS_REGISTRY_PACK_ABOVE"] ?? "") ?? CheckpointArtifact.maxLayers }
    static func chunksPerPack(_ chunks: Int) -> Int {
        Int(ProcessInfo.processInfo.environment["STASIS_REGISTRY_PACK_CHUNKS"] ?? "").map { max(1, $0) } ?? CheckpointArtifact.chunksPerPack(chunks)
    }

    // MARK: push

    public static func push(_ directory: String, _ options: Options) throws -> PushReport {
        let watch = Stopwatch()
        let tag = try tag(of: options.reference)
        let manifest = try Checkpoint.readManifest(directory)
        let manifestData = try FileSystem.readFile(directory + "/" + Manifest.fileName)
        let store = try Checkpoint.store(for: manifest, explicit: options.store)
        var collected: [Source] = manifest.files.filter { $0.chunks == nil }.map { .file($0) }
        var seen = Set<String>()
        let chunkSize = manifest.store?.chunkSize ?? ChunkFormat.chunkSize
        var chunks: [(String, ChunkPlace)] = []
        // In the order a restore reads them (CRIU's images, then device memory), as a pull fetches them.
        for item in Checkpoint.chunkedItemsInReadOrder(manifest) {
            for (index, digest) in item.chunks.enumerated() where !digest.isEmpty && seen.insert(digest).inserted {
                chunks.append((digest, item.place(index, chunkSize: chunkSize, checkpoint: directory)))
            }
        }
        // A layer a chunk while the manifest stays within what registries take; past that, packs of chunks.
        let packed = collected.count + chunks.count > packAbove
        if packed {
            let perPack = chunksPerPack(chunks.count)
            // What a pull refuses is not made: a pack and the index past the sizes a pull takes.
            guard perPack * ChunkSink.scratchSize(chunkSize: chunkSize) <= CheckpointArtifact.maxPackBytes,
                  chunks.count * 160 <= CheckpointArtifact.maxPackIndexBytes else {
                throw StasisError(.invalidArgument, "\(directory) has \(chunks.count) chunks: more than a registry checkpoint holds (packs of at most \(CheckpointArtifact.maxPackBytes >> 20) MiB, an index of \(CheckpointArtifact.maxPackIndexBytes >> 20) MiB)")
            }
            collected += stride(from: 0, to: chunks.count, by: perPack).map { .pack(Array(chunks[$0..<min(chunks.count, $0 + perPack)])) }
        } else {
            collected += chunks.map { .chunk($0.0, $0.1) }
        }
        let client = try options.client()
        let mountFrom = PushHistory.mountSource(store, registry: options.reference.registry, repository: options.reference.repository)
        let sources = collected
        let layers = Locked([CheckpointArtifact.Descriptor?](repeating: nil, count: sources.count))
        let packIndex = Locked([CheckpointArtifact.PackIndex.Pack?](repeating: nil, count: sources.count))
        let totals = Locked(Tally())
        let next = Locked(0)
        try WorkerGroup.run(min(options.threads, max(1, sources.count)), name: "stasis-push") { _, failure in
            let session = client.session()
            let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkSink.scratchSize(chunkSize: chunkSize), alignment: 4096)
            defer { plain.deallocate(); scratch.deallocate() }
            /// Sends one layer's bytes unless the registry has them; records its descriptor at `index`.
            func send(_ bytes: UnsafeRawBufferPointer, mediaType: String, annotations: [String: String], index: Int) throws {
                let descriptor = CheckpointArtifact.Descriptor(mediaType: mediaType, digest: BlobDigest.of(bytes), size: bytes.count,
                                                               annotations: annotations.isEmpty ? nil : annotations)
                let outcome = try session.pushBlobIfMissing(bytes, digest: descriptor.digest, mountFrom: mountFrom)
                totals.withLock { $0.add(bytes.count, outcome) }
                // Tests end a push here, some blobs sent and no manifest (STASIS_FAULT=push-blob-kill).
                if outcome == .sent { FaultInjection.die("push-blob") }
                layers.withLock { $0[index] = descriptor }
            }
            while failure.error == nil, let index = next.takeNext(below: sources.count) {
                switch sources[index] {
                case .file(let entry):
                    let data = try FileSystem.readFile(directory + "/" + entry.path)
                    guard UInt64(data.count) == entry.size else {
                        throw StasisError(.integrity, "\(directory)/\(entry.path) holds \(data.count) bytes, the manifest says \(entry.size)",
                                          hint: "run `stasis verify \(directory)`")
                    }
                    try data.withUnsafeBytes {
                        try send($0, mediaType: CheckpointArtifact.fileMediaType, annotations: [CheckpointArtifact.titleAnnotation: entry.path], index: index)
                    }
                case .chunk(let chunk, let place):
                    // Read whole and checked: a damaged chunk is never pushed.
                    let stored = try store!.read(chunk, into: UnsafeMutableRawBufferPointer(rebasing: plain[0..<place.length]),
                                                 scratch: scratch, place: place, fileInScratch: true)
                    try send(UnsafeRawBufferPointer(rebasing: scratch[0..<stored]), mediaType: CheckpointArtifact.chunkMediaType,
                             annotations: [CheckpointArtifact.chunkAnnotation: chunk], index: index)
                case .pack(let members):
                    // The stored chunk files one after another, each read whole and checked first.
                    var pack: [UInt8] = []
                    var placed: [CheckpointArtifact.PackIndex.Member] = []
                    for (chunk, place) in members {
                        let stored = try store!.read(chunk, into: UnsafeMutableRawBufferPointer(rebasing: plain[0..<place.length]),
                                                     scratch: scratch, place: place, fileInScratch: true)
                        placed.append(.init(chunk: chunk, offset: pack.count, length: stored))
                        pack += UnsafeRawBufferPointer(rebasing: scratch[0..<stored])
                    }
                    try pack.withUnsafeBytes { try send($0, mediaType: CheckpointArtifact.packMediaType, annotations: [:], index: index) }
                    let digest = layers.withLock { $0[index]!.digest }
                    packIndex.withLock { $0[index] = .init(digest: digest, members: placed) }
                }
            }
        }
        let session = client.session()
        var allLayers = layers.withLock { $0.compactMap { $0 } }
        if packed {
            // The pack index, a layer of its own: which chunk lies where.
            // Sorted keys: the same checkpoint gives the same bytes, a blob the registry has already.
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            let index = try encoder.encode(CheckpointArtifact.PackIndex(packs: packIndex.withLock { $0.compactMap { $0 } }))
            let digest = BlobDigest.of(index)
            let outcome = try index.withUnsafeBytes { try session.pushBlobIfMissing($0, digest: digest, mountFrom: mountFrom) }
            totals.withLock { $0.add(index.count, outcome) }
            allLayers.append(.init(mediaType: CheckpointArtifact.packIndexMediaType, digest: digest, size: index.count))
        }
        let configDigest = BlobDigest.of(manifestData)
        let configOutcome = try manifestData.withUnsafeBytes { try session.pushBlobIfMissing($0, digest: configDigest, mountFrom: mountFrom) }
        totals.withLock { $0.add(manifestData.count, configOutcome) }
        let image = CheckpointArtifact.ImageManifest(
            config: .init(mediaType: CheckpointArtifact.configMediaType, digest: configDigest, size: manifestData.count),
            layers: allLayers, annotations: CheckpointArtifact.annotations(for: manifest))
        let encoded = try CheckpointArtifact.encode(image)
        guard encoded.count <= RegistryClient.maxManifestBytes else {
            throw StasisError(.invalidArgument, "the registry manifest of \(directory) would be \(encoded.count) bytes, more than the \(RegistryClient.maxManifestBytes) registries take")
        }
        let manifestDigest = try session.putManifest(encoded, mediaType: CheckpointArtifact.manifestMediaType, reference: tag)
        PushHistory.record(store, registry: options.reference.registry, repository: options.reference.repository)
        return totals.withLock { $0 }.report(options.reference, digest: manifestDigest, blobs: allLayers.count + 1, since: watch)
    }

    /// `stasis push --archive`: a container's checkpoint as the checkpoint image podman and CRI-O restore
    /// from: an OCI image of one uncompressed layer, the checkpoint archive `stasis export --archive` writes,
    /// annotated with the container's name under both engines' keys. Its blobs are sent as any push sends
    /// them (only those the registry lacks; the manifest last).
    public static func pushArchive(_ directory: String, _ options: Options) throws -> PushReport {
        let watch = Stopwatch()
        let tag = try tag(of: options.reference)
        let manifest = try Checkpoint.readManifest(directory)
        guard let container = manifest.container else {
            throw StasisError(.invalidArgument, "\(directory) is a checkpoint of a process tree: a checkpoint image holds a container's",
                              hint: "push it without --archive")
        }
        try FileSystem.makePrivateDirectory(archiveScratch)
        let scratch = try FileSystem.makeTemporaryDirectory(in: archiveScratch, prefix: "push")
        defer { FileSystem.removeTree(scratch) }
        _ = try ArchiveOperation.export(directory, to: scratch + "/checkpoint.tar", store: options.store)
        let layer = try FileSystem.readFile(scratch + "/checkpoint.tar")
        let layerDigest = BlobDigest.of(layer)
        let created = ISO8601DateFormatter().string(from: manifest.createdAt)
        let config = try JSONSerialization.data(withJSONObject: [
            "architecture": "amd64", "os": "linux", "created": created,
            "rootfs": ["type": "layers", "diff_ids": [layerDigest]], "config": [String: String](),
        ], options: [.sortedKeys, .withoutEscapingSlashes])
        let session = try options.client().session()
        var totals = Tally()
        for blob in [layer, config] {
            totals.add(blob.count, try blob.withUnsafeBytes { try session.pushBlobIfMissing($0, digest: BlobDigest.of($0)) })
        }
        var annotations = CheckpointArtifact.annotations(for: manifest)
        // The keys podman 4 reads (it restores only an image naming the runtime it runs), the newer
        // org.criu.checkpoint ones, and CRI-O's name.
        for prefix in ["io.podman.annotations.checkpoint.", "org.criu.checkpoint."] {
            annotations[prefix + "name"] = container.id
            annotations[prefix + "runtime.name"] = container.runtime
            annotations[prefix + "criu.version"] = manifest.criu.version
        }
        annotations["io.kubernetes.cri-o.annotations.checkpoint.name"] = container.id
        var image = CheckpointArtifact.ImageManifest(
            config: .init(mediaType: "application/vnd.oci.image.config.v1+json", digest: BlobDigest.of(config), size: config.count),
            layers: [.init(mediaType: "application/vnd.oci.image.layer.v1.tar", digest: layerDigest, size: layer.count)],
            annotations: annotations)
        image.artifactType = nil
        let manifestDigest = try session.putManifest(try CheckpointArtifact.encode(image), mediaType: CheckpointArtifact.manifestMediaType, reference: tag)
        return totals.report(options.reference, digest: manifestDigest, blobs: 2, since: watch)
    }

    /// Where `pushArchive` writes the archive it sends (private, removed after).
    static let archiveScratch = "/var/lib/stasis/push"


    // MARK: pull

    /// Chunks a pull fetches before it makes them durable and visible in the store (a round); smaller while
    /// a restore waits for them.
    static let pullRound = 64
    static let overlappedPullRound = 16

    /// Where `stasis restore REF` puts what it pulls: a directory per checkpoint id.
    public static let pulledRoot = "/var/lib/stasis/pulled"

    /// The checkpoint `options.reference` names, for a restore: the copy the local store lists already (by the
    /// checkpoint's id; nothing is fetched again), else a pull into `pulledRoot`/ID that goes on while the
    /// restore reads what has arrived (`RegistryPull.startOverlapped`).
    public enum ForRestore {
        case local(String)
        case arriving(RegistryPull)
    }

    public static func forRestore(_ options: Options) throws -> ForRestore {
        let session = try options.client().session()
        let reference = options.reference.description
        let (bytes, _, _) = try session.manifest(options.reference.reference, accept: [CheckpointArtifact.manifestMediaType])
        let image = try CheckpointArtifact.decode(bytes, reference: reference)
        let manifest = try Manifest.decode(Data(try session.blob(image.config.digest, maxBytes: 64 << 20)), path: "the checkpoint manifest of \(reference)")
        if manifest.store != nil {
            let store = try Backends().openStore(options.store, create: true)
            if let listed = StoreCatalog(store: store).entry(id: manifest.id), FileSystem.exists(listed.directory + "/" + Manifest.fileName) {
                return .local(listed.directory)
            }
        }
        try FileSystem.makePrivateDirectory(pulledRoot)
        return .arriving(try RegistryPull.startOverlapped(options, into: pulledRoot + "/" + manifest.id))
    }

    public static func pull(_ options: Options, into destination: String) throws -> PullReport {
        let pull = try RegistryPull(options, into: destination, round: pullRound)
        do {
            try pull.fetchWholeFiles()
            try pull.fetchChunks()
            return try pull.publish()
        } catch {
            throw pull.discard(error)
        }
    }
    /// Writes one whole file of the checkpoint, checked against the manifest's SHA-256, private and synced.
    static func writeFile(_ data: [UInt8], _ entry: Manifest.FileEntry, into directory: String, from reference: String) throws {
        var hasher = SegmentedDigest.Streaming()
        data.withUnsafeBytes { hasher.update($0) }
        guard UInt64(data.count) == entry.size, hasher.finish() == entry.sha256 else {
            throw StasisError(.integrity, "the file \(entry.path) from \(reference) does not match the checkpoint's manifest")
        }
        let target = directory + "/" + entry.path
        if let slash = target.lastIndex(of: "/"), entry.path.contains("/") { try FileSystem.makePrivateDirectory(String(target[..<slash])) }
        let fd = try attempt("cannot create", target) {
            try FileDescriptor.open(target, .writeOnly, options: [.create, .exclusiveCreate], permissions: .ownerReadWrite)
        }
        defer { fd.closeQuietly() }
        try data.withUnsafeBytes { bytes in try attempt("cannot write", target) { try fd.write(all: bytes) } }
        try attempt("cannot sync", target) { try fd.syncData() }
    }
}
