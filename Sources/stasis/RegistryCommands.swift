import ArgumentParser
import StasisCore
import StasisEngine
import StasisRegistry

/// How to reach a registry: TLS verified by default, plain HTTP only when asked.
struct RegistryOptions: ParsableArguments {
    @Flag(name: .long, help: "Speak plain HTTP to the registry (no TLS): only for a registry on a trusted network or this host.")
    var plainHTTP = false

    @Option(name: .long, help: "A CA certificate file (PEM) to accept the registry's certificate by, besides the system's CAs.")
    var ca: String?

    @Option(name: .long, help: "Blobs in flight at once.")
    var jobs = 8

    func validate() throws {
        if plainHTTP && ca != nil { throw ValidationError("--plain-http and --ca exclude each other: a CA is for TLS") }
        guard (1...64).contains(jobs) else { throw ValidationError("--jobs must be between 1 and 64") }
    }

    func options(_ reference: String, store: String?) throws -> RegistryTransfer.Options {
        var options = RegistryTransfer.Options(reference: try RegistryReference(parsing: reference))
        options.plainHTTP = plainHTTP
        options.caFile = ca
        options.store = store
        options.threads = jobs
        return options
    }
}

struct PushCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "push",
        abstract: "Send a checkpoint to an OCI registry, as an artifact other machines pull.",
        discussion: """
        REF is HOST[:PORT]/REPOSITORY[:TAG] (TAG defaults to latest). Only the blobs the registry lacks are sent \
        (each file, and each chunk as the store keeps it, compressed), then the manifest, so the tag never names \
        a blob that is not there; a push that stopped midway, run again, sends only what is still missing. \
        Credentials come from $REGISTRY_AUTH_FILE, containers' auth.json or docker's config.json (as `podman \
        login` writes them). docs/REGISTRY.md has the layout and running a fleet from a registry.
        """)

    @Argument(help: "The checkpoint directory.")
    var directory: String

    @Argument(help: "Where to push it: HOST[:PORT]/REPOSITORY[:TAG].")
    var reference: String

    @Flag(name: .long, help: "A container's checkpoint as the checkpoint image podman and CRI-O restore from (one layer: the archive `stasis export --archive` writes), instead of stasis's own artifact.")
    var archive = false

    @OptionGroup var registry: RegistryOptions

    @OptionGroup var store: StoreOptions

    @OptionGroup var output: OutputOptions

    func run() throws {
        try Output.run(json: output.json) {
            let options = try registry.options(reference, store: store.store)
            let report = try archive ? RegistryTransfer.pushArchive(directory, options) : RegistryTransfer.push(directory, options)
            if output.json { return Output.json(report) }
            print("pushed \(directory) as \(report.reference)@\(report.digest)")
            print("  blobs: \(report.sentBlobs) sent (\(Format.bytes(report.sentBytes))), \(report.presentBlobs) already there "
                + "(\(Format.bytes(report.presentBytes)))"
                + (report.mountedBlobs > 0 ? ", \(report.mountedBlobs) mounted from another repository (\(Format.bytes(report.mountedBytes)))" : "")
                + "; \(Format.seconds(report.seconds))")
        }
    }
}

struct PullCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pull",
        abstract: "Fetch a checkpoint from an OCI registry into a new checkpoint directory and the local store.",
        discussion: """
        REF is HOST[:PORT]/REPOSITORY[:TAG] or ...@sha256:DIGEST. Only the chunks the store lacks are fetched; \
        every blob is checked against its digest and every chunk against its content before it is stored, and \
        the directory appears complete or not at all. `stasis restore DIR` then restores it.
        """)

    @Argument(help: "What to pull: HOST[:PORT]/REPOSITORY[:TAG] or HOST[:PORT]/REPOSITORY@sha256:DIGEST.")
    var reference: String

    @Option(name: [.customShort("D"), .customLong("images-dir")], help: "The checkpoint directory to create (must not exist or be empty).")
    var directory: String

    @OptionGroup var registry: RegistryOptions

    @OptionGroup var store: StoreOptions

    @OptionGroup var output: OutputOptions

    func validate() throws { try Arguments.requireCreatableName(directory, option: "-D") }

    func run() throws {
        try Output.run(json: output.json) {
            let report = try RegistryTransfer.pull(try registry.options(reference, store: store.store), into: directory)
            if output.json { return Output.json(report) }
            print("pulled \(report.reference) (\(report.digest)) into \(report.directory)")
            print("  blobs: \(report.fetchedBlobs) fetched (\(Format.bytes(report.fetchedBytes))); \(report.presentChunks) chunks already in "
                + "\(report.store ?? "no store"); \(Format.seconds(report.seconds))")
        }
    }
}
