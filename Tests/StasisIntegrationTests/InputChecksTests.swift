import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisTestSupport
import Testing

/// What stasis refuses to take as input, and how it prints names it did not choose: arguments that are not
/// text, special files where a file is read, secrets directories it does not own, names with control
/// characters. Each refusal is quick and clear; nothing waits for ever.
extension Integration {
@Suite struct InputChecks {
    /// Runs stasis with arguments given as raw bytes (Foundation's Process takes only Strings, which cannot
    /// hold bytes that are not UTF-8); stdout and stderr go to files. Killed after `timeout` seconds.
    func stasisWithRawArguments(_ arguments: [[UInt8]], timeout: Double = 30) throws -> (status: Int32, stdout: String, stderr: String) {
        let root = Harness.scratch("raw")
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, root + "/out", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, root + "/err", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        let argv = ([Array(Harness.stasis.utf8)] + arguments).map { bytes -> UnsafeMutablePointer<CChar>? in
            let copy = UnsafeMutablePointer<CChar>.allocate(capacity: bytes.count + 1)
            for (index, byte) in bytes.enumerated() { copy[index] = CChar(bitPattern: byte) }
            copy[bytes.count] = 0
            return copy
        } + [nil]
        defer { argv.forEach { $0?.deallocate() } }
        let variables = ["STASIS_STORE=\(Harness.store)", "PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"]
        let environment: [UnsafeMutablePointer<CChar>?] = variables.map { strdup($0) } + [nil]
        defer { environment.forEach { free($0) } }
        var pid: pid_t = 0
        #expect(posix_spawn(&pid, Harness.stasis, &actions, nil, argv, environment) == 0)
        let result = Harness.collect(pid, timeout: timeout, outputIn: root)
        return (result.status, result.stdout, result.stderr)
    }

    /// A path with bytes that are not UTF-8 would be renamed by the argument parser (to U+FFFD); it is
    /// refused before parsing, naming the argument.
    /// A directory without a manifest (/tmp, say) is "not a checkpoint", before anything about its modes.
    @Test func aDirectoryWithoutAManifestIsNotACheckpointWhateverItsModes() throws {
        let directory = Harness.scratch("not-a-checkpoint")
        #expect(chmod(directory, 0o777) == 0)
        for command in [["inspect", directory], ["verify", directory], ["restore", directory]] {
            let result = try Harness.stasis(command)
            #expect(result.status == 1 && result.stderr.contains("has no manifest.json"), "\(command[0]): \(result.stderr)")
        }
    }

    /// restore takes the checkpoint directory as its argument or with -D, one of them.
    @Test func restoreNamesOneCheckpointDirectory() throws {
        let none = try Harness.stasis("restore")
        #expect(none.status == 64 && none.stderr.contains("name the checkpoint directory"), "\(none.stderr)")
        let two = try Harness.stasis("restore", "/tmp/a", "-D", "/tmp/b")
        #expect(two.status == 64 && two.stderr.contains("two checkpoint directories"), "\(two.stderr)")
    }

    @Test func anArgumentThatIsNotUTF8IsRefused() throws {
        let parent = Harness.scratch("utf8")
        let bad = Array((parent + "/ckpt").utf8) + [0xFF, 0xFE]
        let result = try stasisWithRawArguments([Array("dump".utf8), Array("4000000".utf8), Array("-D".utf8), bad])
        #expect(result.status == 1)
        #expect(result.stderr.contains("stasis: error: argument 4 (after -D) is not valid UTF-8: \(parent)/ckpt\\xFF\\xFE"), "\(result.stderr)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: parent).isEmpty, "no directory under another name")
        let json = try stasisWithRawArguments([Array("inspect".utf8), Array("--json".utf8), [0x80]])
        #expect(json.status == 1)
        #expect(json.stdout.contains("\"code\" : \"invalid-argument\""), "\(json.stdout)")
    }

    /// Control characters in the name of something stasis creates are refused (it could not print it).
    @Test func aNameToCreateWithAControlCharacterIsRefused() throws {
        let parent = Harness.scratch("names")
        for arguments in [["dump", "4000000", "-D", parent + "/a\nb"], ["import", parent + "/bundle", "-D", parent + "/a\u{1B}[2Jb"],
                          ["export", parent + "/ckpt", "-o", parent + "/x\u{202E}fdp.exe"]] {
            let result = try Harness.stasis(arguments)
            #expect(result.status == 64, "\(arguments): \(result.stderr)")
            #expect(result.stderr.contains("a control or bidirectional character"), "\(result.stderr)")
            #expect(!result.stderr.unicodeScalars.contains { $0 == "\u{1B}" || $0 == "\u{202E}" })
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: parent).isEmpty)
    }

    /// A FIFO has no end until a writer comes: each command that reads a named file refuses it at once.
    @Test func aFIFOIsRefusedQuickly() throws {
        let root = Harness.scratch("fifo")
        let fifo = root + "/fifo"
        #expect(mkfifo(fifo, 0o600) == 0)
        let cases: [([String], String)] = [
            (["inspect", fifo], "\(fifo) is a FIFO, not a checkpoint directory or archive"),
            (["verify", fifo], "\(fifo) is a FIFO, not a checkpoint directory"),
            (["import", fifo, "-D", root + "/imported"], "\(fifo) is a FIFO, not a bundle"),
            (["serve", "--listen", "127.0.0.1:0", "--token-file", fifo], "\(fifo) is a FIFO, not a token file"),
        ]
        for (arguments, expected) in cases {
            let watch = Stopwatch()
            let result = try Harness.run(Harness.stasis, arguments, environment: ["STASIS_STORE": Harness.store], timeout: 20)
            #expect(watch.seconds < 15, "\(arguments) took \(watch.seconds) s")
            #expect(result.status == 1, "\(arguments): \(result.stderr)")
            #expect(result.stderr.contains(expected), "\(arguments): \(result.stderr)")
        }
        #expect(!FileSystem.exists(root + "/imported"))
    }

    @Test func aDirectoryAsTokenFileIsRefused() throws {
        let directory = Harness.scratch("token")
        #expect(chmod(directory, 0o700) == 0)
        let result = try Harness.stasis("serve", "--listen", "127.0.0.1:0", "--token-file", directory)
        #expect(result.status == 1)
        #expect(result.stderr.contains("\(directory) is a directory, not a token file"), "\(result.stderr)")
        #expect(!result.stderr.contains("NSCocoaErrorDomain"))
    }

    /// --init-tls puts a private key in a directory only this user can enter: another user's is refused,
    /// even empty and open to all; an empty one of this user's is made 0700.
    @Test func initTLSRefusesAnotherUsersDirectoryAndClosesItsOwn() throws {
        let root = Harness.scratch("tls")
        let foreign = root + "/foreign", own = root + "/own"
        #expect(mkdir(foreign, 0o777) == 0 && chmod(foreign, 0o777) == 0 && chown(foreign, 65534, 65534) == 0)
        let refused = try Harness.stasis("serve", "--init-tls", foreign)
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("\(foreign) belongs to user 65534"), "\(refused.stderr)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: foreign).isEmpty, "no key was written")

        #expect(mkdir(own, 0o777) == 0 && chmod(own, 0o777) == 0)
        let made = try Harness.stasis("serve", "--init-tls", own)
        #expect(made.succeeded, "\(made.stderr)")
        #expect(try #require(try FileSystem.status(own)).permissions == 0o700)
        #expect(try #require(try FileSystem.status(own + "/key.pem")).permissions & 0o777 == 0o600)

        #expect(symlink(own, root + "/link") == 0)
        let linked = try Harness.stasis("serve", "--init-tls", root + "/link")
        #expect(linked.status == 1, "\(linked.stdout)")
    }

    /// A restore's work directory (CRIU's log, the socket CRIU reads the images from) is never another
    /// user's: its owner could put a socket of their own in CRIU's way and feed it memory.
    @Test func restoreRefusesAnotherUsersWorkDirectory() throws {
        let sample = try SampleCheckpoint.make()
        let foreign = Harness.scratch("work") + "/foreign"
        #expect(mkdir(foreign, 0o777) == 0 && chmod(foreign, 0o777) == 0 && chown(foreign, 65534, 65534) == 0)
        let result = try Harness.stasis("restore", "-D", sample.checkpoint, "-W", foreign, "--store", sample.store.path)
        #expect(result.status == 1)
        #expect(result.stderr.contains("\(foreign) belongs to user 65534"), "\(result.stderr)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: foreign).isEmpty)
    }

    /// A manifest's hostname with a terminal escape sequence and an RTL override is printed written out by
    /// `inspect`; its JSON keeps the same string (escaped as JSON).
    @Test func aHostileHostnameIsPrintedEscaped() throws {
        let sample = try SampleCheckpoint.make(chunked: false)
        let hostile = "evil\u{1B}]0;owned\u{07}\u{1B}[2J\u{202E}host\nline"
        var manifest = sample.manifest
        manifest.host.hostname = hostile
        manifest.processTree.processes[0].command = "job\u{9B}31m"
        try FileSystem.writeAtomically(try Manifest.encoder().encode(manifest), to: sample.checkpoint + "/" + Manifest.fileName)

        let text = try Harness.stasis("inspect", sample.checkpoint)
        #expect(text.succeeded, "\(text.stderr)")
        #expect(text.stdout.contains("on evil\\u{1B}]0;owned\\u{7}\\u{1B}[2J\\u{202E}host\\nline (kernel"), "\(text.stdout)")
        #expect(text.stdout.contains("job\\u{9B}31m"), "\(text.stdout)")
        #expect(!text.stdout.unicodeScalars.contains { Format.isHostile($0) && $0 != "\n" })

        let json = try Harness.stasis("inspect", "--json", sample.checkpoint)
        #expect(json.succeeded, "\(json.stderr)")
        #expect(!json.stdout.unicodeScalars.contains { Format.isHostile($0) && $0 != "\n" })
        let decoded = try Manifest.decoder().decode(Manifest.self, from: Data(json.stdout.utf8))
        #expect(decoded.host.hostname == hostile)
        #expect(decoded.processTree.processes[0].command == "job\u{9B}31m")
    }
}
}
