import Foundation
import StasisCore
import StasisOS
import StasisStore

/// Turns a staging directory of images into a checkpoint: its large images chunked into the store, the rest
/// hashed and synced, the manifest assembled, listed in the store's catalog and written. What a dump does in
/// CRIU's post-dump step (the tree frozen) and what an archive import does once the archive is unpacked.
public enum CheckpointWriter {
    /// The file that keeps a container's config.json in its checkpoint.
    public static let containerSpecName = "container-config.json"

    /// CRIU's memory images: followed while CRIU writes them, and always chunked.
    public static func isMemoryImage(_ name: String) -> Bool { name.hasPrefix("pages-") && name.hasSuffix(".img") }

    /// Bytes of memory images in `directory` so far (a dump's progress).
    public static func pageBytes(in directory: String) -> UInt64 {
        // Progress only: a directory that cannot be listed shows no bytes yet, and the dump reports its own errors.
        let names = (try? FileSystem.namesOrNone(in: directory)) ?? []
        return names.filter { $0.hasPrefix("pages-") }.reduce(0) { $0 + (FileSystem.size(directory + "/" + $1) ?? 0) }
    }

    /// The images of a directory as a manifest lists them.
    public struct Images {
        public var files: [Manifest.FileEntry]
        public var chunked: [String: ChunkIngester.File]
        public var statistics: ChunkIngester.Statistics
        public var hashSeconds: Double
        public var syncSeconds: Double
    }

    /// The memory images, and any other of a chunk or more, chunked into the store (`ingester` finishes them);
    /// the rest hashed and synced as whole files. Files named in `skipped` are left out.
    public static func completeImages(in directory: String, ingester: ChunkIngester, except skipped: Set<String> = []) throws -> Images {
        let watch = Stopwatch()
        let names = try FileSystem.regularFiles(under: directory).filter { !skipped.contains($0) }
        let large = names.filter { isMemoryImage($0) || (FileSystem.size(directory + "/" + $0) ?? 0) >= UInt64(ChunkFormat.chunkSize) }
        let (chunked, statistics) = try ingester.finish(alsoIngest: large)
        let whole = names.filter { chunked[$0] == nil }
        let hashed = try ParallelHasher.hash(whole, under: directory)
        let hashSeconds = watch.seconds
        let syncWatch = Stopwatch()
        for name in whole { try FileSystem.fsync(path: directory + "/" + name) }
        let files = hashed.map { Manifest.FileEntry(path: $0.path, size: $0.size, sha256: $0.sha256, segments: $0.segments) }
            + chunked.map { Manifest.FileEntry(path: $0.key, size: $0.value.size, sha256: ChunkDigest.ofFile(chunks: $0.value.chunks),
                                               chunks: $0.value.chunks, chunkLengths: $0.value.lengths) }
        return Images(files: files, chunked: chunked, statistics: statistics, hashSeconds: hashSeconds, syncSeconds: syncWatch.seconds)
    }

    /// What a dump knows about its checkpoint besides the images.
    public struct Contents {
        public var toolVersion: String
        public var criu: Manifest.CRIUInfo
        public var options: Manifest.DumpOptions
        public var processTree: Manifest.ProcessTree
        public var gpu: Manifest.GPUSection
        /// Chunked files of device memory the agents moved, and what they added to the store.
        public var deviceFiles: [Manifest.FileEntry]
        public var deviceStatistics: ChunkIngester.Statistics
        public var timings: Manifest.Timings
        public var container: Manifest.Container?
        /// The codec new chunks were written with ("lz4", "zstd:3", "none").
        public var codec: String
        /// When the checkpoint was taken: now, unless it comes from elsewhere (an engine's archive says).
        public var createdAt: Date?

        public init(toolVersion: String, criu: Manifest.CRIUInfo, options: Manifest.DumpOptions, processTree: Manifest.ProcessTree,
                    gpu: Manifest.GPUSection, deviceFiles: [Manifest.FileEntry], deviceStatistics: ChunkIngester.Statistics,
                    timings: Manifest.Timings, container: Manifest.Container?, codec: String) {
            (self.toolVersion, self.criu, self.options, self.processTree, self.gpu) = (toolVersion, criu, options, processTree, gpu)
            (self.deviceFiles, self.deviceStatistics, self.timings, self.container, self.codec) = (deviceFiles, deviceStatistics, timings, container, codec)
        }
    }

    /// Completes the chunking of the images in `staging` and removes the chunked ones from it, hashes and syncs
    /// the small ones, lists the checkpoint in the store's catalog and writes the manifest; the caller then
    /// publishes; returns the manifest and what the images (device memory aside) added to the store. The
    /// manifest passes the shape check every reader makes (`Manifest.validate`) before it is
    /// listed: nothing this writes is refused later. `beforeListing` runs once it is assembled (a test's fault
    /// point).
    public static func write(_ contents: Contents, staging: StagingDirectory, ingester: ChunkIngester, store: ChunkStore,
                             skipping skipped: Set<String> = [], beforeListing: () throws -> Void = {}) throws -> (manifest: Manifest, images: ChunkIngester.Statistics) {
        let images = try completeImages(in: staging.path, ingester: ingester, except: skipped)
        var timings = contents.timings
        timings.hash = images.hashSeconds
        timings.sync = images.syncSeconds
        let files = (images.files + contents.deviceFiles).sorted { $0.path < $1.path }
        let processes = contents.processTree.processes
        var manifest = Manifest(
            id: UUID().uuidString.lowercased(), createdAt: contents.createdAt ?? Date(),
            tool: .init(name: "stasis", version: contents.toolVersion), host: HostFacts.current(),
            criu: contents.criu, options: contents.options, processTree: contents.processTree,
            memory: .init(residentBytes: processes.reduce(0) { $0 + $1.residentBytes },
                          dumpedBytes: images.chunked.filter { isMemoryImage($0.key) }.reduce(0) { $0 + $1.value.size },
                          imageBytes: files.reduce(0) { $0 + $1.size }),
            timings: timings, gpu: contents.gpu, files: files)
        manifest.container = contents.container
        manifest.formatVersion = files.contains(where: { $0.chunkLengths != nil }) ? Manifest.versionWithContentDefinedChunks
            : contents.gpu.processes.contains(where: { !($0.agent?.imports ?? []).isEmpty }) ? Manifest.versionWithSharedMemory
            : contents.container != nil ? Manifest.versionWithContainer
            : contents.gpu.processes.contains(where: { $0.agent != nil }) ? Manifest.versionWithAgents : Manifest.versionWithoutAgents
        // What this checkpoint added to the store: CRIU's images and the device memory agents moved.
        let added = images.statistics + contents.deviceStatistics
        manifest.store = .init(path: store.path, chunkSize: ChunkFormat.chunkSize, codec: contents.codec,
                               plainBytes: added.plainBytes, storedBytes: added.storedBytes, newChunks: added.newChunks,
                               reusedChunks: added.reusedChunks, zeroChunks: added.zeroChunks)
        try manifest.validate(name: "the manifest of \(staging.destination)")
        try beforeListing()
        // Listed before the checkpoint exists, so that from the moment it does, gc keeps its chunks.
        staging.manifestID = manifest.id
        try StoreCatalog(store: store).register(manifest, directory: staging.destination)
        for name in images.chunked.keys { FileSystem.remove(staging.path + "/" + name) }
        try FileSystem.writeAtomically(try Manifest.encoder().encode(manifest), to: staging.path + "/" + Manifest.fileName)
        try FileSystem.fsync(path: staging.path)
        return (manifest, images.statistics)
    }
}
