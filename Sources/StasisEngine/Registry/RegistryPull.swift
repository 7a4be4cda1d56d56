import Foundation
import StasisCore
import StasisImage
import StasisOS
import StasisRegistry
import StasisStore

/// One pull of a checkpoint from a registry into a staging directory and the local store, in three steps:
/// the whole files (the manifest written beside them), the chunks the store lacks in rounds, each made durable
/// and visible in the store as it ends (a pull that stops keeps them, and run again fetches only the rest),
/// then the publish (listed in the store, renamed into place). A failure discards the staging directory.
///
/// CRIU's images come first, in the manifest's order, then the agents' device memory: the order a restore
/// reads them. `startOverlapped` runs the chunk rounds on a thread of their own while a restore reads the
/// staging directory through `arrivingStore`, whose reads wait for their chunk's round.
public final class RegistryPull: @unchecked Sendable {
    // @unchecked Sendable: the fields below are set in `init` and read after; the chunk rounds run on one
    // thread at a time (the caller's, or the overlapped pull's, joined by `finish`), and what several threads
    // share goes through the kit's types (`Locked`, `PendingNames`).
    let options: RegistryTransfer.Options
    let reference: String
    let client: RegistryClient
    let manifestDigest: String
    private var manifest: Manifest
    private let store: (any ChunkStore)?
    private let staging: StagingDirectory
    private var lock: StoreLock?
    private var catalog: StoreCatalog?
    private let fileLayers: [String: CheckpointArtifact.Descriptor]
    /// What a pull fetches: a layer, and the chunks it stores from it (a chunk's own layer, or a pack's
    /// members the store lacks, each at its offset and length in the pack).
    struct FetchUnit {
        var layer: CheckpointArtifact.Descriptor
        var members: [CheckpointArtifact.PackIndex.Member]
    }
    /// The layers to fetch, in the order a restore reads their chunks.
    private let missing: [FetchUnit]
    private let present: Int
    private let round: Int
    private let totals: Locked<(blobs: Int, bytes: UInt64)>
    private let watch = Stopwatch()
    /// The chunks still to come, for an overlapped restore's reads.
    public let arrivals: PendingNames
    private var fetcher: Thread?
    private let fetched = DispatchSemaphore(value: 0)
    private let fetchFailure = FirstFailure()
    private let stopping = Locked(false)

    /// Reads the registry's manifest and the stasis manifest, and what the local store lacks; makes the
    /// staging directory and takes the store's lock (shared) until the pull ends.
    init(_ options: RegistryTransfer.Options, into destination: String, round: Int) throws {
        self.options = options
        self.round = round
        reference = options.reference.description
        client = try options.client()
        let session = client.session()
        let (bytes, _, digest) = try session.manifest(options.reference.reference, accept: [CheckpointArtifact.manifestMediaType])
        manifestDigest = digest
        let image = try CheckpointArtifact.decode(bytes, reference: reference)
        let configBytes = try session.blob(image.config.digest, maxBytes: 64 << 20)
        totals = Locked((blobs: 1, bytes: UInt64(configBytes.count)))
        manifest = try Manifest.decode(Data(configBytes), path: "the checkpoint manifest of \(reference)")
        try CheckpointBundle.checkChunkLists(manifest, name: reference, code: .manifestInvalid)
        // Every file and chunk the stasis manifest lists must be a layer: the registry's manifest is only a map.
        var fileLayers: [String: CheckpointArtifact.Descriptor] = [:]
        // Where each chunk lies: its own layer, or a member of a pack (the pack index says where).
        var chunkSources: [String: (layer: CheckpointArtifact.Descriptor, member: CheckpointArtifact.PackIndex.Member)] = [:]
        var packLayers: [String: CheckpointArtifact.Descriptor] = [:]
        var indexLayer: CheckpointArtifact.Descriptor?
        for layer in image.layers {
            if layer.mediaType == CheckpointArtifact.fileMediaType, let path = layer.annotations?[CheckpointArtifact.titleAnnotation] {
                fileLayers[path] = layer
            } else if layer.mediaType == CheckpointArtifact.chunkMediaType, let chunk = layer.annotations?[CheckpointArtifact.chunkAnnotation] {
                chunkSources[chunk] = (layer, .init(chunk: chunk, offset: 0, length: layer.size))
            } else if layer.mediaType == CheckpointArtifact.packMediaType {
                packLayers[layer.digest] = layer
            } else if layer.mediaType == CheckpointArtifact.packIndexMediaType {
                indexLayer = layer
            }
        }
        if let indexLayer {
            let bytes = try session.blob(indexLayer.digest, maxBytes: CheckpointArtifact.maxPackIndexBytes)
            totals.withLock { $0.blobs += 1; $0.bytes += UInt64(bytes.count) }
            let index: CheckpointArtifact.PackIndex
            do { index = try JSONDecoder().decode(CheckpointArtifact.PackIndex.self, from: Data(bytes)) } catch {
                throw StasisError(.manifestInvalid, "the pack index of \(reference) cannot be read: \(error)")
            }
            try index.check(layers: packLayers.mapValues(\.size), reference: reference)
            for pack in index.packs {
                for member in pack.members { chunkSources[member.chunk] = (packLayers[pack.digest]!, member) }
            }
        }
        for entry in manifest.files where entry.chunks == nil && fileLayers[entry.path] == nil {
            throw StasisError(.manifestInvalid, "\(reference) lists the file \(entry.path) but has no blob for it")
        }
        self.fileLayers = fileLayers
        try StagingDirectory.check(destination: destination)
        let store = try manifest.store.map { _ in try Backends().openStore(options.store, create: true) }
        self.store = store
        // The store's lock (shared) before any chunk is judged present: gc, holding it exclusive, may be removing
        // chunks no checkpoint lists (an interrupted pull's rounds among them).
        let lock: StoreLock?
        do { lock = try store?.lock(exclusive: false) } catch {
            throw StasisError.wrapping(error, as: .io).prefixed("pull of \(reference) failed")
        }
        var missing: [FetchUnit] = []
        var present = 0
        let staging: StagingDirectory
        do {
            if let store { try BundleOperation.refuseListedTwice(manifest.id, in: store, verb: "pull") }
            // A layer is fetched once, for every chunk in it the store lacks (a pack's members). Keyed by media
            // type too: a chunk's layer and a pack are never one unit, whatever their digests.
            var unitOfLayer: [String: Int] = [:]
            var seen = Set<String>()
            for item in Checkpoint.chunkedItemsInReadOrder(manifest) {
                for chunk in item.chunks where !chunk.isEmpty && seen.insert(chunk).inserted {
                    if store!.has(chunk) { present += 1; continue }
                    guard let source = chunkSources[chunk] else {
                        throw StasisError(.manifestInvalid, "\(reference) lists chunk \(chunk) of \(item.path) but has no blob for it")
                    }
                    let key = source.layer.mediaType + " " + source.layer.digest
                    if let unit = unitOfLayer[key] {
                        missing[unit].members.append(source.member)
                    } else {
                        unitOfLayer[key] = missing.count
                        missing.append(FetchUnit(layer: source.layer, members: [source.member]))
                    }
                }
            }
            staging = try StagingDirectory(destination: destination, store: store)
        } catch {
            lock?.release()
            throw StasisError.wrapping(error, as: .io).prefixed("pull of \(reference) failed")
        }
        self.lock = lock
        self.missing = missing
        self.present = present
        self.staging = staging
        arrivals = PendingNames(Set(missing.flatMap { $0.members.map(\.chunk) }))
    }


    /// Starts a pull whose chunks keep arriving while a restore reads `directory` through `arrivingStore`: the
    /// whole files and the manifest are in place when it returns. `finish` publishes it, `discard` drops it.
    static func startOverlapped(_ options: RegistryTransfer.Options, into destination: String) throws -> RegistryPull {
        let pull = try RegistryPull(options, into: destination, round: RegistryTransfer.overlappedPullRound)
        do {
            try pull.fetchWholeFiles()
            // The restore reads the manifest from the staging directory; the publish writes it again.
            try FileSystem.writeAtomically(try Manifest.encoder().encode(pull.storedManifest), to: pull.staging.path + "/" + Manifest.fileName)
        } catch {
            throw pull.discard(error)
        }
        let thread = Thread { [pull] in
            do { try pull.fetchChunks() } catch {
                pull.fetchFailure.set(error)
                pull.arrivals.fail(StasisError.wrapping(error, as: .io).prefixed("pull of \(pull.reference) failed"))
            }
            pull.fetched.signal()
        }
        thread.name = "stasis-pull-overlapped"
        pull.fetcher = thread
        thread.start()
        return pull
    }

    /// The checkpoint as far as it has arrived: the staging directory, and the store whose reads wait for
    /// chunks still to come (nil for a checkpoint without a store).
    public var directory: String { staging.path }
    public var arrivingStore: (any ChunkStore)? { store.map { ArrivingChunkStore(local: $0, arrivals: arrivals) } }
    public var destination: String { staging.destination }

    /// The manifest as this machine's store keeps it.
    private var storedManifest: Manifest {
        var stored = manifest
        if let store { stored.store!.path = store.path }
        return stored
    }

    /// The whole files, each checked against the manifest, into the staging directory.
    func fetchWholeFiles() throws {
        let files = manifest.files.filter { $0.chunks == nil }
        let next = Locked(0)
        let (layers, path, reference, totals, client) = (fileLayers, staging.path, reference, totals, client)
        try WorkerGroup.run(min(options.threads, max(1, files.count)), name: "stasis-pull") { _, failure in
            let session = client.session()
            while failure.error == nil, let index = next.takeNext(below: files.count) {
                let entry = files[index]
                let data = try session.blob(layers[entry.path]!.digest, maxBytes: Int(min(entry.size, UInt64(Int.max))))
                try RegistryTransfer.writeFile(data, entry, into: path, from: reference)
                totals.withLock { $0.blobs += 1; $0.bytes += UInt64(data.count) }
            }
        }
    }

    /// The missing chunks, in rounds: each round's chunks checked, durable and visible in the store, then
    /// reported to `arrivals`.
    func fetchChunks() throws {
        guard let store else { return }
        let (client, reference, totals) = (client, reference, totals)
        var start = 0
        while start < missing.count {
            guard !stopping.current else { throw StasisError(.interrupted, "the pull was stopped") }
            // Tests fail a pull after its first round (STASIS_FAULT=pull-later-round): an overlapped restore is
            // then reading what arrived and waiting for the rest.
            if start > 0 { try FaultInjection.check("pull-later-round") }
            // A round: layers until it holds `round` chunks (a pack may hold several).
            var end = start, chunks = 0
            while end < missing.count && (chunks < self.round || end == start) { chunks += missing[end].members.count; end += 1 }
            let round = Array(missing[start..<end])
            let receiver = ChunkReceiver(store: store)
            let next = Locked(0)
            try WorkerGroup.run(min(options.threads, round.count), name: "stasis-pull") { _, failure in
                let session = client.session()
                while failure.error == nil, !self.stopping.current, let index = next.takeNext(below: round.count) {
                    let unit = round[index]
                    // A chunk's layer is at most a stored chunk file; a pack, its members (the index was checked
                    // against its size). The blob is checked against its digest, its size against the manifest.
                    let packed = unit.layer.mediaType == CheckpointArtifact.packMediaType
                    let data = try session.blob(unit.layer.digest, maxBytes: packed ? min(unit.layer.size, CheckpointArtifact.maxPackBytes) : ChunkSink.scratchSize())
                    guard !packed || data.count == unit.layer.size else {
                        throw StasisError(.integrity, "pack \(unit.layer.digest) of \(reference) holds \(data.count) bytes, its manifest says \(unit.layer.size)")
                    }
                    for member in unit.members {
                        let member = packed ? member : .init(chunk: member.chunk, offset: 0, length: data.count)
                        guard member.offset >= 0, member.length >= 0, member.length <= data.count - member.offset else {
                            throw StasisError(.integrity, "chunk \(member.chunk) lies outside blob \(unit.layer.digest) of \(reference)")
                        }
                        try receiver.submit(digest: member.chunk, length: member.length, from: reference) { buffer in
                            data.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[member.offset..<member.offset + member.length])) }
                        }
                    }
                    totals.withLock { $0.blobs += 1; $0.bytes += UInt64(data.count) }
                }
            }
            // Stopped midway (the restore failed): what the round stored is kept if it can be (its failure to
            // commit matters less than the stop, which is what is reported); not all of the round came.
            guard !stopping.current else { _ = try? receiver.finish(); throw StasisError(.interrupted, "the pull was stopped") }
            _ = try receiver.finish()
            arrivals.arrived(round.flatMap { $0.members.map(\.chunk) })
            start = end
            // Tests end a pull here, a round of chunks stored and nothing published (STASIS_FAULT=pull-round-kill).
            FaultInjection.die("pull-round")
        }
    }

    /// Waits for an overlapped pull's chunks (if any are still coming), then publishes the checkpoint.
    public func finish() throws -> RegistryTransfer.PullReport {
        if fetcher != nil {
            fetched.wait()
            fetcher = nil
            if let error = fetchFailure.error { throw discard(error) }
        }
        do { return try publish() } catch { throw discard(error) }
    }

    /// Lists the checkpoint in the store and renames it into place.
    func publish() throws -> RegistryTransfer.PullReport {
        try BundleOperation.publishImported(&manifest, store: store, staging: staging, catalog: &catalog)
        lock?.release()
        lock = nil
        let fetched = totals.current
        return RegistryTransfer.PullReport(reference: reference, digest: manifestDigest, directory: staging.destination, store: store?.path,
                                           fetchedBlobs: fetched.blobs, fetchedBytes: fetched.bytes, presentChunks: present, seconds: watch.seconds)
    }

    /// Stops fetching (an overlapped pull ends its round first), drops the staging directory and the lock;
    /// the rounds already stored stay in the store for the next pull. Returns `error`, saying what failed.
    @discardableResult
    public func discard(_ error: Error) -> Error {
        stopping.withLock { $0 = true }
        if fetcher != nil {
            fetched.wait()
            fetcher = nil
        }
        if !staging.published { catalog?.unregister(id: manifest.id) }
        staging.discard()
        lock?.release()
        lock = nil
        if let stasisError = error as? StasisError, stasisError.message.hasPrefix("pull of ") { return stasisError }
        return StasisError.wrapping(error, as: .io).prefixed("pull of \(reference) failed")
    }
}
