import ArgumentParser
import Foundation
import StasisCRIU
import StasisCore
import StasisEngine
import StasisOS
import StasisStore

/// TLS 1.3 for a migration's connection, the same on both ends.
struct TLSOptions: ParsableArguments {
    @Option(name: .customLong("tls"), help: ArgumentHelp("Encrypt with TLS 1.3, with the key and certificate in this directory (key.pem, cert.pem; `stasis serve --init-tls DIR` makes them).", valueName: "dir"))
    var directory: String?

    @Option(name: .customLong("tls-peer"), help: ArgumentHelp("Accept the peer whose certificate has this SHA-256 fingerprint (as --init-tls printed it); repeatable.", valueName: "sha256:hex"))
    var peers: [String] = []

    @Option(name: .customLong("tls-ca"), help: ArgumentHelp("Accept a peer whose certificate chains to a CA in this PEM file (and, for the receiver, names the host in --to).", valueName: "file"))
    var caFile: String?

    func validate() throws {
        if directory == nil && (!peers.isEmpty || caFile != nil) { throw ValidationError("--tls-peer and --tls-ca need --tls DIR") }
        if directory != nil && peers.isEmpty && caFile == nil { throw ValidationError("--tls needs --tls-peer FINGERPRINT or --tls-ca FILE: whom to accept") }
        for peer in peers { _ = try TLSFingerprint.parse(peer) }
    }

    var configuration: TLSConfiguration? {
        get throws { try directory.map { try TLSConfiguration(directory: $0, pinned: peers, caFile: caFile) } }
    }
}

struct MigrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Move the process tree rooted at PID to another host that runs `stasis serve`.",
        discussion: """
        The receiver is reached and authenticated first (both ends prove they know the token in --token-file). \
        Then the tree is frozen and checkpointed into the local store; each new chunk goes to the receiver as \
        the dump writes it, if the receiver lacks it, and then the rest of the checkpoint. The receiver checks \
        every byte, restores the job, and answers. The tree \
        here ends only once that authenticated answer says the job runs there; if anything fails before, it \
        runs on here as it was. Restored processes keep their PIDs: the receiver must have them free.

        With --tls, every byte (the handshake, the chunks, the checkpoint itself) goes through TLS 1.3 and the \
        receiver must present the certificate pinned with --tls-peer (or one a --tls-ca signed); the token still \
        authorizes. Without --tls the job's memory crosses the network in clear: that needs --insecure, unless \
        the receiver is on a loopback address.

        SIGINT, SIGTERM or SIGHUP before the commit abandon the migration (the job runs on here); once the \
        commit is sent they wait until the outcome is settled, so the job never runs on both hosts.
        """)

    @Argument(help: "The root of the process tree to move.")
    var pid: Int32

    @Option(name: .long, help: "The receiver, ADDRESS:PORT (`stasis serve --listen`).")
    var to: String

    @Option(name: .long, help: "A file (mode 0600) holding the shared token, at least 16 bytes; the same on both hosts.")
    var tokenFile: String

    @Flag(name: .long, help: "Carry established TCP connections (the network must then reach the receiver's host at the same addresses).")
    var tcpEstablished = false

    @Option(name: .long, help: "Seconds to wait for each CUDA process to reach a point where it can be locked, and for a GPU job's tree to hold still (no compiler running in it).")
    var lockTimeout: Double = 10

    @Option(name: .long, help: "How new chunks are compressed: lz4 (default), zstd, zstd:LEVEL (1-19) or none.")
    var compress = Codec.standard.description

    @Option(name: .long, help: "Where the local checkpoint is made (default: a new directory under /var/lib/stasis/migrate); removed once the job runs there.")
    var spool: String?

    @OptionGroup var tls: TLSOptions

    @Flag(name: .long, help: "Send the job's memory in clear (no --tls) to a receiver that is not on a loopback address.")
    var insecure = false

    @OptionGroup var store: StoreOptions

    @OptionGroup var output: OutputOptions

    func validate() throws {
        if insecure && tls.directory != nil { throw ValidationError("--insecure and --tls exclude each other") }
        _ = try Codec(parsing: compress)
        guard pid > 0 else { throw ValidationError("PID must be a positive number") }
        guard lockTimeout > 0, lockTimeout < 86_400 else { throw ValidationError("--lock-timeout must be between 0 and 86400 seconds") }
        if let spool { try Arguments.requireCreatableName(spool, option: "--spool") }
    }

    func run() throws {
        try Output.run(json: output.json) {
            var options = MigrateOperation.Options(pid: pid, to: to, tokenFile: tokenFile)
            options.store = store.store
            options.codec = try Codec(parsing: compress)
            options.process = .init(tcpEstablished: tcpEstablished)
            options.spool = spool
            options.tls = try tls.configuration
            options.insecure = insecure
            options.settleSeconds = lockTimeout
            options.progress = Output.progressHandler(json: output.json)
            options.backends = Backends(lockTimeoutSeconds: lockTimeout)
            let report = try MigrateOperation(options, device: options.backends.deviceStep()).run()
            Output.clearProgress()
            if let signal = report.deferredSignal {
                FileHandle.standardError.write(Data("stasis: \(signal) came after the commit was sent; it waited until the migration was settled: the job runs on \(report.receiver)\n".utf8))
            }
            if output.json { return Output.json(report) }
            for line in report.textLines { print(line) }
        }
    }
}

struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Receive migrations (`stasis migrate`) and restore them here.",
        discussion: """
        Listens on --listen; each peer must prove it knows the token in --token-file before anything it sends \
        is read. Chunks already in the store are not asked for. Every chunk received is checked against its \
        digest, every file against the manifest, whose HMAC proves the peer sent it, and only what that \
        manifest lists is restored; the peer is told the outcome. One migration at a time; prints a line for \
        each. Restored processes keep their PIDs, which must be free here.

        With --tls, a peer must speak TLS 1.3 and present the certificate pinned with --tls-peer (or one a \
        --tls-ca signed) before anything it sends is read, and every byte after is encrypted. `stasis serve \
        --init-tls DIR` makes a key and a self-signed certificate in DIR and prints the fingerprint to give the \
        other host's --tls-peer. Without --tls, listening on an address other than a loopback one needs \
        --insecure.

        SIGINT, SIGTERM or SIGHUP end the receiver at once between migrations; during one, they abandon it \
        before the restore, and after that wait until its outcome is settled.
        """)

    @Option(name: .long, help: "Where to listen, ADDRESS:PORT (0.0.0.0:PORT for every IPv4 address).")
    var listen: String?

    @Option(name: .long, help: "A file (mode 0600) holding the shared token, at least 16 bytes.")
    var tokenFile: String?

    @Option(name: .customLong("init-tls"), help: ArgumentHelp("Make a P-256 key (key.pem, 0600) and a self-signed certificate (cert.pem, valid --tls-days) in this new directory, print its fingerprint and exit.", valueName: "dir"))
    var initTLS: String?

    @Option(name: .customLong("tls-days"), help: "How many days a certificate --init-tls makes is valid.")
    var tlsDays = 365

    @OptionGroup var tls: TLSOptions

    @Option(name: .long, help: "Where received checkpoints are kept, a directory each.")
    var directory = "/var/lib/stasis/received"

    @Flag(name: .long, help: "Exit after one migration; the status says whether it was restored.")
    var once = false

    @Flag(name: .long, help: "Receive jobs' memory in clear (no --tls) on an address that is not a loopback one.")
    var insecure = false

    @OptionGroup var store: StoreOptions

    func validate() throws {
        guard (1...36_500).contains(tlsDays) else { throw ValidationError("--tls-days must be between 1 and 36500") }
        if initTLS != nil { return }
        if insecure && tls.directory != nil { throw ValidationError("--insecure and --tls exclude each other") }
        guard listen != nil, tokenFile != nil else { throw ValidationError("serve needs --listen and --token-file (or --init-tls DIR)") }
    }

    func run() throws {
        if let initTLS {
            try Output.run(json: false) {
                guard try FileSystem.isMissingOrEmptyDirectory(initTLS) else {
                    throw StasisError(.invalidArgument, "\(initTLS) already exists and is not empty: --init-tls never replaces a key")
                }
                let now = Date()
                let fingerprint = try TLSConfiguration.generate(in: initTLS, name: ProcessInfo.processInfo.hostName,
                                                                validity: now.addingTimeInterval(-300)...now.addingTimeInterval(Double(tlsDays) * 86_400))
                print("made \(initTLS)/\(TLSConfiguration.keyName) (0600) and \(initTLS)/\(TLSConfiguration.certificateName), valid \(tlsDays) days")
                print("fingerprint: \(fingerprint)")
                print("give it to the other host: --tls-peer \(fingerprint)")
            }
            return
        }
        guard let listen, let tokenFile else { return }
        var failures = 0
        try Output.run(json: false) {
            var options = ServeOperation.Options(listen: listen, tokenFile: tokenFile)
            options.tls = try tls.configuration
            options.insecure = insecure
            options.store = store.store
            options.root = directory
            options.once = once
            options.progress = Output.progressHandler()
            // A migration's line replaces its progress line rather than following it.
            options.log = { line in
                Output.clearProgress()
                // Lines name what the peer sent (its manifest's names): escaped like every other text output.
                FileHandle.standardOutput.write(Data((Format.printable(line) + "\n").utf8))
            }
            let backends = options.backends
            failures = try ServeOperation(options, device: { backends.deviceStep() }).run()
        }
        if failures > 0 { throw ExitCode.failure }
    }
}
