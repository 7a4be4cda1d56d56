import Foundation
import StasisCRIU
import StasisContainer
import StasisCore
import StasisImage
import StasisOS
import StasisStore

/// Container checkpoint archives, the layout podman and CRI-O write and checkpointctl reads: a tar holding
///
///     checkpoint/     CRIU's images and runc's descriptors.json (what `runc restore --image-path` reads)
///     config.dump     the engine's JSON about the container: {id, name, runtime, createdTime, rootfsImageName}
///     spec.dump       the container's OCI runtime spec (its config.json)
///     stats-dump      CRIU's dump statistics, when there are any
///     rootfs-diff.tar, deleted.files, network.status, ...   the engine's own, optional
///
/// `stasis export --archive` writes one from a container's checkpoint (stasis dump --container); `stasis
/// import` turns one, stasis's or an engine's, into a checkpoint whose images are in the store, which
/// `stasis restore --bundle` restores through runc; `stasis inspect` describes one.
public enum ArchiveOperation {
    static let checkpointDirectory = "checkpoint/"
    static let configDump = "config.dump"
    static let specDump = "spec.dump"
    static let statsDump = "stats-dump"
    /// Where an imported archive's other files (rootfs-diff.tar, deleted.files, ...) are kept.
    static let engineFiles = "archive/"
    /// The other files podman and CRI-O write beside checkpoint/, config.dump and spec.dump (libpod's and
    /// CRI-O's checkpoint metadata names); an archive holding anything else is refused, since stasis would
    /// carry it into a checkpoint and back to an engine without knowing what it is.
    static let knownEngineFiles: Set<String> = [
        "rootfs-diff.tar", "deleted.files", "network.status", "devshm-checkpoint.tar", "ctr.log", "pod.options",
        "pod.dump", "bind.mounts", "status.dump",
    ]
    static let knownEngineDirectories = ["artifacts/", "volumes/"]

    /// The part of config.dump stasis writes and reads (engines write more; only these keys matter here).
    struct ConfigDump: Codable {
        /// The engine's config.dump of `archive`, or a clear error naming what is wrong with it.
        static func read(_ data: Data, archive: String) throws -> ConfigDump {
            let config: ConfigDump
            do {
                config = try JSONDecoder().decode(ConfigDump.self, from: data)
            } catch let DecodingError.keyNotFound(key, _) {
                throw StasisError(.integrity, "\(archive): its \(ArchiveOperation.configDump) lacks '\(key.stringValue)'",
                                  hint: "the archive is damaged, or was not written by podman, CRI-O or stasis")
            } catch {
                throw StasisError(.integrity, "\(archive): its \(ArchiveOperation.configDump) is not the JSON a container engine writes",
                                  hint: "the archive is damaged, or was not written by podman, CRI-O or stasis")
            }
            // The id names the container to runc and in the checkpoint; the rest is printed.
            try ArchiveText.checkContainerID(config.id, archive: archive)
            for (key, value) in [("name", config.name), ("runtime", config.runtime), ("createdTime", config.createdTime),
                                 ("rootfsImageName", config.rootfsImageName)] {
                if let value { try checkPrintable(value, "its \(ArchiveOperation.configDump)'s \(key)", archive: archive) }
            }
            return config
        }

        var id: String
        var name: String
        var runtime: String?
        /// RFC 3339, with fractional seconds when podman writes it.
        var createdTime: String?
        var rootfsImageName: String?

        var created: Date? {
            guard let createdTime else { return nil }
            let formatter = ISO8601DateFormatter()
            formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            if let date = formatter.date(from: createdTime) { return date }
            formatter.formatOptions = [.withInternetDateTime]
            return formatter.date(from: createdTime)
        }
    }

    /// The annotations of an OCI runtime spec (spec.dump), decoded leniently: JSONSerialization would build
    /// the whole spec in objects, many times its size for a crafted one.
    struct SpecAnnotations: Decodable {
        var annotations: [String: String]?

        init(from decoder: Decoder) throws {
            // Lenient on purpose: a spec whose annotations are not strings has none that stasis reads.
            annotations = try? decoder.container(keyedBy: CodingKeys.self).decodeIfPresent([String: String].self, forKey: .annotations)
        }

        enum CodingKeys: String, CodingKey { case annotations }

        /// The spec's annotations; nil when it is not a JSON object.
        static func decoded(_ spec: Data) -> SpecAnnotations? { try? JSONDecoder().decode(SpecAnnotations.self, from: spec) }

        /// io.container.manager: the engine that wrote the spec.
        var manager: String? { annotations?["io.container.manager"] }
    }

    /// Refuses `value` (`what` of `archive`, printed by inspect and import) when it holds a control character
    /// or a bidi override, which would reach the terminal as they are.
    static func checkPrintable(_ value: String, _ what: String, archive: String) throws {
        guard ArchiveText.hasHostileCharacters(value) else { return }
        throw StasisError(.integrity, "\(archive): \(what) holds a control character or a bidi override, \(ArchiveText.quoted(value))",
                          hint: "the archive is damaged or crafted: no container engine writes this")
    }

    /// True when `path` is a tar archive (ustar magic), as checkpoint archives are, plain or compressed
    /// (zstd, gzip).
    public static func isArchive(_ path: String) -> Bool {
        // Compressed: an archive (stasis bundles never are); a damaged one is then refused as such, by its decoder.
        if let compression = ArchiveInput.compression(of: path), compression != .none { return true }
        // A question, not an import: a file that cannot be opened as an archive is not one, and the caller's own open says why.
        guard let input = try? ArchiveInput(path) else { return false }
        var head = [UInt8](repeating: 0, count: 262)
        // A short or failing read is not a tar header (false), as above.
        let got = (try? head.withUnsafeMutableBytes { try input.tar.read(filling: $0) }) ?? 0
        // Only 262 bytes were wanted: the decoder's complaint about the rest is not this question's.
        try? input.finish()
        return got == head.count && Array(head[257..<262]) == Array("ustar".utf8)
    }

    public struct ExportReport: Codable, Sendable {
        public var checkpoint: String
        public var archive: String
        public var files: Int
        public var bytes: UInt64
        public var seconds: Double
    }

    /// Writes the container checkpoint in `directory` as a checkpoint archive `file` (0600, complete or absent).
    public static func export(_ directory: String, to file: String, store explicit: String?,
                              progress: ProgressHandler? = nil) throws -> ExportReport {
        let watch = Stopwatch()
        let directory = URL(fileURLWithPath: directory).standardizedFileURL.path
        let manifest = try Checkpoint.readManifest(directory)
        guard let container = manifest.container else {
            throw StasisError(.invalidArgument, "\(directory) is a checkpoint of a process tree, not of a container: a checkpoint archive holds a container",
                              hint: "write it as a stasis bundle (stasis export without --archive)")
        }
        guard manifest.gpu.processes.isEmpty else {
            throw StasisError(.invalidArgument, "\(directory) holds GPU state, which a checkpoint archive cannot carry to podman or CRI-O",
                              hint: "write it as a stasis bundle (stasis export without --archive)")
        }
        guard !FileSystem.exists(file) else { throw StasisError(.invalidArgument, "\(file) already exists") }
        let store = try Checkpoint.store(for: manifest, explicit: explicit)
        let lock = try store?.lock(exclusive: false)
        defer { lock?.release() }
        _ = try Checkpoint.verify(directory, manifest: manifest, store: store, chunks: false)
        // Hidden beside the target until complete; published without replacing anything that appeared meanwhile.
        let output = try AtomicFile(creating: file)
        let partial = output.temporaryPath
        // Of the images' plain bytes, which the tar holds (with its headers: held at 100 % until it ends).
        let total = manifest.files.reduce(0) { $0 + $1.size }
        let ticker = ProgressTicker.reporting(progress, phase: "exporting", total: total) { min(FileSystem.size(partial) ?? 0, total) }
        defer { ticker?.stop() }
        var tar = Tar.Writer(fd: output.descriptor, path: file)
        do {
            try tar.directory(checkpointDirectory)
            var count = 0
            for entry in manifest.files where entry.path != container.spec {
                // An imported archive's own files (archive/) go back to where the engine had them.
                let name = entry.path == statsDump ? statsDump
                    : entry.path.hasPrefix(engineFiles) ? String(entry.path.dropFirst(engineFiles.count)) : checkpointDirectory + entry.path
                if let item = ChunkedFiles.Item(entry) {
                    guard let store, let info = manifest.store else { throw StasisError(.integrity, "\(directory): chunked files but no store") }
                    try tar.file(name, size: item.size) { out in
                        try streamThroughPipe(to: out) { pipe in
                            try ChunkedFiles.stream(item, from: store, checkpoint: directory, chunkSize: info.chunkSize, to: pipe)
                        }
                    }
                } else {
                    try tar.file(name, contents: try FileSystem.readFile(directory + "/" + entry.path))
                }
                count += 1
            }
            try tar.file(specDump, contents: try FileSystem.readFile(directory + "/" + container.spec))
            // An imported archive's own config.dump went back above, unchanged; else stasis writes its part.
            // For a container podman made, the keys podman needs to restore it too.
            if !manifest.files.contains(where: { $0.path == engineFiles + configDump }) {
                let created = ISO8601DateFormatter().string(from: manifest.createdAt)
                let contents: Data
                if let engine = container.engine, engine.name == Podman.manager {
                    contents = try Podman.configDump(engine: engine, id: container.id, runtime: container.runtime, created: created,
                                                     spec: try FileSystem.readFile(directory + "/" + container.spec))
                } else {
                    contents = try JSONEncoder().encode(ConfigDump(id: container.id, name: container.id, runtime: container.runtime,
                                                                   createdTime: created, rootfsImageName: nil))
                }
                try tar.file(configDump, contents: contents)
            }
            try tar.finish()
            try output.publish()
            return ExportReport(checkpoint: directory, archive: file, files: count + 2, bytes: tar.bytes, seconds: watch.seconds)
        } catch {
            throw StasisError.wrapping(error, as: .io).prefixed("export of \(directory) as a checkpoint archive failed")
        }
    }

    /// Runs `produce` on the write end of a pipe on a thread of its own and copies what it writes to `out`;
    /// returns the bytes copied. (The store's streaming writes zero chunks with vmsplice, which wants a pipe.)
    static func streamThroughPipe(to out: FileDescriptor, _ produce: @escaping @Sendable (FileDescriptor) throws -> Void) throws -> UInt64 {
        let (readEnd, writeEnd) = try attempt("cannot create a pipe", "") { try FileDescriptor.makePipe() }
        let brokenPipe = Signals.ignoreBrokenPipe()
        defer { Signals.restoreBrokenPipe(brokenPipe) }
        let finished = DispatchSemaphore(value: 0)
        let failure = Locked<Error?>(nil)
        let thread = Thread {
            do { try produce(writeEnd) } catch { failure.withLock { $0 = error } }
            writeEnd.closeQuietly()
            finished.signal()
        }
        thread.start()
        var copied: UInt64 = 0
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        var problem: Error?
        while true {
            let n: Int
            do { n = try readEnd.readSome(into: buffer) } catch { problem = systemError("cannot read a pipe", "", error); break }
            if n == 0 { break }
            do {
                try out.write(all: UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
            } catch {
                problem = systemError("cannot write", "the archive", error)
                break
            }
            copied += UInt64(n)
        }
        readEnd.closeQuietly()
        finished.wait()
        // Writing the archive failing (a full disk) is the cause; the producer's broken pipe only follows it.
        if let problem { throw problem }
        if let error = failure.current { throw error }
        return copied
    }

    public struct ImportReport: Codable, Sendable {
        public var archive: String
        public var directory: String
        public var container: String
        /// The engine that wrote it, as its spec says ("libpod", "cri-o", or "stasis").
        public var engine: String
        public var files: Int
        public var statistics: ChunkIngester.Statistics
        public var seconds: Double
    }

    /// Turns the checkpoint archive `file` into a checkpoint in `destination` whose large images go into the
    /// store (`explicit`, else STASIS_STORE, else the default). The archive's bundle is not known: restore it
    /// with `stasis restore --bundle`. The engine's own files (rootfs-diff.tar and the like) are kept as they
    /// are, under archive/.
    public static func importArchive(_ file: String, into destination: String, store explicit: String?,
                                     progress: ProgressHandler? = nil) throws -> ImportReport {
        let watch = Stopwatch()
        try StagingDirectory.check(destination: destination)
        do {
            return try ArchiveInput.reading(file) { input in
                try importArchive(input, into: destination, store: explicit, progress: progress, started: watch)
            }
        } catch let error as StasisError where !error.message.hasPrefix("import of") {
            throw error.prefixed("import of \(file) failed")
        }
    }

    private static func importArchive(_ input: ArchiveInput, into destination: String, store explicit: String?,
                                      progress: ProgressHandler?, started watch: Stopwatch) throws -> ImportReport {
        let file = input.path
        // How far the reader is: the archive file's position (read front to back, by the decoder if compressed).
        let position = input.file
        let ticker = ProgressTicker.reporting(progress, phase: "importing", total: FileSystem.size(file)) {
            // Progress only: a position that cannot be asked shows 0, the import goes on.
            UInt64((try? position.seek(offset: 0, from: .current)) ?? 0)
        }
        defer { ticker?.stop() }
        let store = try Backends().openStore(explicit, create: true)
        let staging = try StagingDirectory(destination: destination, store: store)
        do {
            let lock = try store.lock(exclusive: false)
            defer { lock.release() }
            let reader = Tar.Reader(fd: input.tar, path: file)
            var config: ConfigDump?
            var spec: Data?
            var files = 0
            var sawCheckpoint = false
            while let entry = try reader.next() {
                guard entry.isFile else {
                    // Directories are implied; links, devices and sparse files have no place in a checkpoint.
                    guard entry.type == "5" else {
                        throw StasisError(.integrity, "\(file) holds \(ArchiveText.quoted(entry.name)) of tar type \(ArchiveText.quoted(String(entry.type))), which a checkpoint archive does not have")
                    }
                    continue
                }
                let name = entry.name
                guard !name.contains(".."), !name.hasPrefix("/") else {
                    throw StasisError(.integrity, "\(file) names \(ArchiveText.quoted(name)), outside the archive")
                }
                // Its name becomes a file's: one that prints as another name is not taken.
                guard !ArchiveText.hasHostileCharacters(name) else {
                    throw StasisError(.integrity, "\(file) names \(ArchiveText.quoted(name)), holding a control character or a bidi override",
                                      hint: "no container engine writes such a name: the archive is damaged or crafted")
                }
                if name == "oci-layout" || name.hasPrefix("blobs/") {
                    throw StasisError(.notACheckpoint, "\(file) is an OCI image (containerd's checkpoint image, say), not a checkpoint archive of podman or CRI-O",
                                      hint: "`stasis inspect` describes it; containerd restores it (`ctr containers restore`)")
                }
                if name == configDump {
                    // Kept as the engine wrote it too, for an export back to it.
                    let data = try reader.readAll()
                    config = try ConfigDump.read(data, archive: file)
                    try FileSystem.makePrivateDirectory(staging.path + "/" + engineFiles)
                    try FileSystem.writeAtomically(data, to: staging.path + "/" + engineFiles + configDump)
                    files += 1
                } else if name == specDump {
                    spec = try reader.readAll()
                } else {
                    let target: String
                    if name.hasPrefix(checkpointDirectory) {
                        target = String(name.dropFirst(checkpointDirectory.count))
                        sawCheckpoint = true
                    } else if name == statsDump {
                        target = statsDump
                    } else if knownEngineFiles.contains(name) || knownEngineDirectories.contains(where: { name.hasPrefix($0) }) {
                        target = engineFiles + name
                    } else {
                        throw StasisError(.integrity, "\(file) holds \(ArchiveText.quoted(name)), which neither podman, CRI-O nor stasis writes in a checkpoint archive",
                                          hint: "was the archive changed after it was written? Only checkpoint/, config.dump, spec.dump, stats-dump and the engines' own files belong there")
                    }
                    guard !target.isEmpty, !target.contains("/") || target.hasPrefix(engineFiles) else {
                        throw StasisError(.integrity, "\(file) holds \(ArchiveText.quoted(name)): checkpoint/ in an archive is flat")
                    }
                    try extract(reader, to: staging.path + "/" + target)
                    files += 1
                }
            }
            guard let config, let spec, sawCheckpoint else {
                throw StasisError(.notACheckpoint, "\(file) is not a container checkpoint archive (it lacks \(config == nil ? configDump : spec == nil ? specDump : "checkpoint/"))")
            }
            try FileSystem.writeAtomically(spec, to: staging.path + "/" + CheckpointWriter.containerSpecName)
            let engine = SpecAnnotations.decoded(spec)?.manager ?? "stasis"
            try checkPrintable(engine, "its \(specDump)'s io.container.manager", archive: file)
            // The CRIU that wrote the images, as its log says: a restore refuses images of a newer CRIU than its own.
            let criuVersion = (try? FileSystem.readFile(staging.path + "/dump.log"))
                .flatMap { CRIUBinary.version(inLog: String(decoding: $0.prefix(4096), as: UTF8.self)) } ?? "unknown (imported from a checkpoint archive)"
            // Large images into the store, the rest kept whole, as a dump does.
            let ingester = ChunkIngester(directory: staging.path, store: store, codec: .standard, contentDefined: .standard,
                                         releaseIngested: true, follows: { _ in false })
            var contents = CheckpointWriter.Contents(
                toolVersion: StasisVersion.current, criu: .init(version: criuVersion, logFile: "dump.log"),
                options: .init(leaveRunning: false, tcpEstablished: false, shellJob: false),
                processTree: .init(rootPID: 0, processes: []), gpu: .init(), deviceFiles: [], deviceStatistics: .init(), timings: .init(),
                container: .init(runtime: config.runtime ?? "runc", id: config.id, bundle: "", spec: CheckpointWriter.containerSpecName),
                codec: Codec.standard.description)
            contents.createdAt = config.created
            // A compressed archive's decoder must have found its stream whole before anything is published.
            try input.finish(draining: true)
            let statistics = try CheckpointWriter.write(contents, staging: staging, ingester: ingester, store: store).images
            try staging.publish()
            return ImportReport(archive: file, directory: staging.destination, container: config.id, engine: engine, files: files,
                                statistics: statistics, seconds: watch.seconds)
        } catch {
            if !staging.published, let id = staging.manifestID { StoreCatalog(store: store).unregister(id: id) }
            staging.discard()
            throw StasisError.wrapping(error, as: .io).prefixed("import of \(file) failed")
        }
    }

    private static func extract(_ reader: Tar.Reader, to path: String) throws {
        let directory = (path as NSString).deletingLastPathComponent
        try FileSystem.makePrivateDirectory(directory)
        let out = try attempt("cannot create", path) {
            try FileDescriptor.open(path, .writeOnly, options: [.create, .exclusiveCreate], permissions: .ownerReadWrite)
        }
        defer { out.closeQuietly() }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        while true {
            let n = try reader.read(into: buffer)
            if n == 0 { break }
            try attempt("cannot write", path) { try out.write(all: UnsafeRawBufferPointer(rebasing: buffer[0..<n])) }
        }
    }

    /// What `stasis inspect` says of an archive, read without unpacking it.
    public struct Summary: Codable, Sendable {
        public var archive: String
        public var engine: String
        public var container: String
        public var name: String
        public var runtime: String?
        public var created: Date?
        public var checkpointBytes: UInt64
        public var pagesBytes: UInt64
        public var rootfsDiffBytes: UInt64?
        /// The first `listedFiles` files' names (an archive's names are the writer's: all of them could take
        /// gigabytes), and how many there are.
        public var files: [String]
        public var fileCount: Int
    }

    /// The most file names a summary lists.
    static let listedFiles = 1000

    public static func summarize(_ file: String) throws -> Summary {
        try ArchiveInput.reading(file) { input in try summarize(input) }
    }

    private static func summarize(_ input: ArchiveInput) throws -> Summary {
        let file = input.path
        let reader = Tar.Reader(fd: input.tar, path: file)
        let first = try reader.next()
        // An OCI image layout (oci-layout or blobs/ first) is containerd's checkpoint image.
        if let first, first.name == "oci-layout" || first.name.hasPrefix("blobs/") {
            return try ContainerdCheckpoint.summarize(reader, first: first, archive: file)
        }
        var config: ConfigDump?
        var engine = "unknown"
        var checkpointBytes: UInt64 = 0, pagesBytes: UInt64 = 0
        var rootfsDiff: UInt64?
        var files: [String] = []
        var fileCount = 0
        var next = first
        while let entry = next {
            if entry.isFile {
                fileCount += 1
                if files.count < listedFiles { files.append(entry.name) }
                if entry.name == configDump { config = try ConfigDump.read(try reader.readAll(), archive: file) }
                if entry.name == specDump, let spec = SpecAnnotations.decoded(try reader.readAll()) {
                    engine = spec.manager ?? "stasis or runc"
                    try checkPrintable(engine, "its \(specDump)'s io.container.manager", archive: file)
                }
                if entry.name.hasPrefix(checkpointDirectory) {
                    checkpointBytes += entry.size
                    if entry.name.hasPrefix(checkpointDirectory + "pages-") { pagesBytes += entry.size }
                }
                if entry.name == "rootfs-diff.tar" { rootfsDiff = entry.size }
            }
            next = try reader.next()
        }
        guard let config else { throw StasisError(.notACheckpoint, "\(file) is not a container checkpoint archive (no \(configDump))") }
        return Summary(archive: file, engine: engine, container: config.id, name: config.name, runtime: config.runtime, created: config.created,
                       checkpointBytes: checkpointBytes, pagesBytes: pagesBytes, rootfsDiffBytes: rootfsDiff, files: files, fileCount: fileCount)
    }
}
