import Foundation
import Glibc
import StasisCore
@testable import StasisGPU
import StasisOS
import StasisStore
import StasisAgentStandIn
import StasisTestSupport
import Testing

/// A stasis that dies after its agent released the device memory: the agent puts it back by itself.
/// The stand-in plays the job and runs the real agent's watch (orphan.c, from libstasis-agent.so); the
/// controller is a process of its own that connects to the stand-in (so that SO_PEERCRED names it) and
/// hands the connection to this test, which drives the dump through it as stasis does; then the controller
/// is killed, and nobody here runs `stasis resume`.
@Suite(.serialized) struct AgentOrphanTests {
    static let grace = 0.5

    @Test func theJobRunsOnByItselfWhenItsStasisDiedAfterRelease() throws {
        let job = try OrphanJob(stasis: Harness.stasis)
        defer { job.stop() }
        try job.dumpUntilRelease()
        #expect(job.peer.contentsLost)
        job.controller.kill()
        // Within the grace period and a resume, with no `stasis resume` run here.
        let said = job.waitFor("put the device memory back; CUDA calls go on", seconds: Self.grace + 20)
        #expect(job.peer.running, "the job stayed held: \(said)")
        #expect(job.peer.written == job.memory, "the memory put back is the memory evacuated")
        #expect(AgentEvacuation.rescue(pid: getpid(), in: job.store) == nil, "the rescue entry goes once used")
        #expect(said.contains("the stasis that was checkpointing this process (PID \(job.controller.pid)) is gone; putting device memory back"), "\(said)")
        #expect(said.contains("resume \(getpid()) --store \(job.store.path)"), "\(said)")
        #expect(said.contains("resumed PID \(getpid())"), "\(said)")
        // The resume it started is reaped: no zombie left in the job.
        let resumer = try #require(said.firstMatch(of: /`stasis resume \d+` \(PID (\d+)\) put the device memory back/).flatMap { Int32($0.1) }, "\(said)")
        #expect(ProcFS.stat(resumer) == nil, "PID \(resumer) is still there: \(String(describing: ProcFS.stat(resumer)))")
    }

    /// A dump that is only slow: its stasis lives, so the agent waits for it, however long.
    @Test func aLivingStasisIsWaitedFor() throws {
        let job = try OrphanJob(stasis: Harness.stasis)
        defer { job.stop() }
        try job.dumpUntilRelease()
        Thread.sleep(forTimeInterval: Self.grace + 2)
        #expect(job.peer.contentsLost && !job.peer.running)
        #expect(job.peer.written.isEmpty)
        #expect(job.messages().isEmpty)
    }

    /// A resume that fails (here a "stasis" that only exits 1): the job stays held, and the agent says
    /// what to run by hand; it tries once.
    @Test func aResumeThatFailsLeavesTheJobHeldAndSaysWhatToRun() throws {
        let job = try OrphanJob(stasis: "/bin/false")
        defer { job.stop() }
        try job.dumpUntilRelease()
        job.controller.kill()
        let said = job.waitFor("CUDA calls stay held", seconds: AgentOrphanTests.grace + 10)
        #expect(said.contains("could not put the device memory back (it exited with status 1); CUDA calls stay held: run `stasis resume \(getpid()) --store \(job.store.path)`"), "\(said)")
        Thread.sleep(forTimeInterval: Self.grace + 1)
        #expect(!job.messages().contains("putting device memory back"), "one try per release")
        #expect(job.peer.contentsLost && AgentEvacuation.rescue(pid: getpid(), in: job.store) != nil)
    }

    /// Without a stasis binary to run, the job stays held, says so, and the rescue entry stays for a
    /// `stasis resume` by hand.
    @Test func withoutAStasisToRunTheJobStaysHeldAndSaysSo() throws {
        let job = try OrphanJob(stasis: "/nonexistent/stasis")
        defer { job.stop() }
        try job.dumpUntilRelease()
        job.controller.kill()
        Thread.sleep(forTimeInterval: Self.grace + 2)
        #expect(job.peer.contentsLost && !job.peer.running)
        let said = job.messages()
        #expect(said.contains("cannot run /nonexistent/stasis; CUDA calls stay held until `stasis resume \(getpid()) --store \(job.store.path)`"), "\(said)")
        #expect(AgentEvacuation.rescue(pid: getpid(), in: job.store) != nil)
        let resumed = try Harness.stasis("resume", String(getpid()), "--store", job.store.path)
        #expect(resumed.succeeded, "\(resumed.stderr)")
        #expect(job.peer.written == job.memory)
    }
}

/// The real agent's watch, looked up in libstasis-agent.so.
private struct AgentWatch {
    typealias Configure = @convention(c) (UnsafePointer<CChar>?, Double, Int32) -> Void
    typealias Piece = @convention(c) (UnsafeRawPointer?) -> Void
    typealias Released = @convention(c) (Int32) -> Void
    typealias Resumed = @convention(c) () -> Void
    typealias Step = @convention(c) (Int32) -> Int32
    let configure: Configure, piece: Piece, released: Released, resumed: Resumed, step: Step

    init() throws {
        let handle = try #require(dlopen(Harness.agent, RTLD_NOW | RTLD_LOCAL), "dlopen \(Harness.agent): \(String(cString: dlerror()))")
        func symbol<T>(_ name: String, _ type: T.Type) throws -> T { unsafeBitCast(try #require(dlsym(handle, name), "\(name)"), to: type) }
        configure = try symbol("stasis_agent_orphan_configure", Configure.self)
        piece = try symbol("stasis_agent_orphan_store_piece", Piece.self)
        released = try symbol("stasis_agent_orphan_released", Released.self)
        resumed = try symbol("stasis_agent_orphan_resumed", Resumed.self)
        step = try symbol("stasis_agent_orphan_step", Step.self)
    }

    var hooks: ProtocolPeer.OrphanWatch {
        let (piece, released, resumed, step) = (piece, released, resumed, step)
        return .init(released: { released($0) }, storePiece: { piece($0) }, resumed: { resumed() }, step: { step($0 ? 1 : 0) })
    }
}

/// A process that connects to this process's agent socket (the stand-in's) and passes the connection back
/// through a socket of this test's, then waits to be killed: the controller the agent watches.
private final class Controller {
    let process = Process()
    let connection: FileDescriptor
    var pid: Int32 { process.processIdentifier }

    static let source = """
        #define _GNU_SOURCE
        #include <stddef.h>
        #include <string.h>
        #include <sys/socket.h>
        #include <sys/un.h>
        #include <unistd.h>
        static int connect_to(const char *name, int abstract) {
            struct sockaddr_un address = {.sun_family = AF_UNIX};
            strncpy(address.sun_path + abstract, name, sizeof address.sun_path - 2);
            int fd = socket(AF_UNIX, SOCK_STREAM, 0);
            socklen_t length = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + abstract + strlen(name));
            return fd >= 0 && connect(fd, (struct sockaddr *)&address, length) == 0 ? fd : -1;
        }
        int main(int argc, char **argv) {
            if (argc < 3) return 2;
            int agent = connect_to(argv[1], 1), test = connect_to(argv[2], 0);
            if (agent < 0 || test < 0) return 1;
            char byte = 1;
            struct iovec vector = {&byte, 1};
            union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
            memset(&control, 0, sizeof control);
            struct msghdr message = {.msg_iov = &vector, .msg_iovlen = 1, .msg_control = control.space, .msg_controllen = sizeof control.space};
            struct cmsghdr *passed = CMSG_FIRSTHDR(&message);
            passed->cmsg_level = SOL_SOCKET;
            passed->cmsg_type = SCM_RIGHTS;
            passed->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(passed), &agent, sizeof agent);
            if (sendmsg(test, &message, 0) != 1) return 1;
            for (;;) pause();
        }
        """

    static let binary: String = {
        let directory = Harness.scratch("agent-orphan-controller")
        let file = directory + "/controller.c"
        FileManager.default.createFile(atPath: file, contents: Data(source.utf8))
        let built = try? Harness.run("/usr/bin/env", ["cc", "-O1", "-o", directory + "/controller", file])
        precondition(built?.succeeded == true, "cannot build the controller: \(built?.stderr ?? "no cc")")
        return directory + "/controller"
    }()

    init() throws {
        let name = Harness.scratch("agent-orphan-handover") + "/socket"
        let listener = try UnixSocket.listen(at: name)
        defer { listener.closeQuietly() }
        process.executableURL = URL(fileURLWithPath: Self.binary)
        process.arguments = ["stasis-agent-\(getpid())", name]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        let accepted = try UnixSocket.accept(listener)
        defer { accepted.closeQuietly() }
        var byte: UInt8 = 0
        let (failure, descriptor) = withUnsafeMutableBytes(of: &byte) { UnixSocket.receive(accepted, into: $0) }
        connection = try #require(failure == nil ? descriptor : nil, "the controller passed no connection")
    }

    func kill() {
        Glibc.kill(pid, SIGKILL)
        process.waitUntilExit()
    }
}

/// The job: the stand-in with the agent's watch, device memory to move, a store, and its controller.
private final class OrphanJob {
    let memory: [UInt64: [UInt8]] = [0x70: (0..<(3 * ChunkFormat.chunkSize)).map { UInt8(truncatingIfNeeded: $0 &* 29 / 11) },
                                     0x71: [UInt8](repeating: 0, count: ChunkFormat.chunkSize)]
    let watch: AgentWatch
    let peer: ProtocolPeer
    let store: ChunkStore
    let controller: Controller
    /// The controller's connection went to a session, which closes it: closing it here too would close a
    /// descriptor number some other test may have been given since (seen: EBADF in a parallel test).
    private var connectionHandedOver = false
    private let messagesRead: FileDescriptor, messagesWritten: FileDescriptor

    init(stasis: String) throws {
        watch = try AgentWatch()
        var ends: [Int32] = [0, 0]
        precondition(pipe(&ends) == 0)
        for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        messagesRead = FileDescriptor(rawValue: ends[0])
        messagesWritten = FileDescriptor(rawValue: ends[1])
        _ = fcntl(ends[0], F_SETFL, O_NONBLOCK)
        watch.configure(stasis, AgentOrphanTests.grace, ends[1])
        peer = try ProtocolPeer(memory: memory, slots: 4, orphanWatch: watch.hooks)
        // Longer than a message's text: the agent gets the path in pieces.
        store = try DirectoryChunkStore(path: Harness.scratch("agent-orphan") + "/" + String(repeating: "a-long-store-path-", count: 8) + "store", create: true)
        controller = try Controller()
    }

    /// What stasis does up to RELEASE, through the controller's connection: the memory is then only in the store.
    func dumpUntilRelease() throws {
        connectionHandedOver = true
        let session = try AgentSession.open(pid: getpid(), connection: controller.connection)
        #expect(session.resumesItself)
        _ = try evacuateIntoRescue(session, store: store)
        try session.release(rescueStore: store.path)
        session.disconnect()
    }

    /// What the agent said, once it says `text` or `seconds` pass.
    func waitFor(_ text: String, seconds: Double) -> String {
        let deadline = Date().addingTimeInterval(seconds)
        var said = messages()
        while !said.contains(text) && Date() < deadline {
            usleep(20_000)
            said += messages()
        }
        return said
    }

    func messages() -> String {
        var text = Data()
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let got = read(messagesRead.rawValue, &buffer, buffer.count)
            if got <= 0 { break }
            text.append(contentsOf: buffer[0..<got])
        }
        return String(decoding: text, as: UTF8.self)
    }

    func stop() {
        // Nothing of this job's may act after it: no grace, nothing watched.
        watch.configure(nil, -1, 2)
        watch.resumed()
        if controller.process.isRunning { controller.kill() }
        if !connectionHandedOver { controller.connection.closeQuietly() }
        peer.stop()
        messagesRead.closeQuietly()
        messagesWritten.closeQuietly()
    }
}
