import CStasisAgentProtocol
import Foundation
import StasisCore
import StasisOS

/// One connection to the agent preloaded into a GPU process (libstasis-agent.so): fixed-size messages over
/// its abstract unix socket, "@stasis-agent-<pid>" (see stasis_agent_protocol.h). Sends may come from any
/// thread; one thread receives.
final class AgentChannel: Sendable {
    typealias Message = stasis_agent_message
    let pid: Int32
    private let fd: FileDescriptor
    /// One message at a time goes out, whole, whichever thread sends it.
    private let sending = CriticalSection()
    private let closed = Locked(false)

    private init(pid: Int32, fd: FileDescriptor) {
        self.pid = pid
        self.fd = fd
    }

    deinit { close() }

    /// The socket names the agent of `pid` may listen on: its PID as it sees itself (the last NSpid entry,
    /// different inside a PID namespace), then the PID here.
    static func socketNames(_ pid: Int32) -> [String] {
        let pids = [ProcFS.namespacePID(pid) ?? pid, pid]
        return (pids[0] == pids[1] ? [pid] : pids).map { STASIS_AGENT_SOCKET_PREFIX + "\($0)" }
    }

    /// Connects to the agent of `pid`; nil when none listens (the process was not started by `stasis run`,
    /// or it has not initialised CUDA yet).
    static func connect(pid: Int32, timeoutSeconds: Int = 120) throws -> AgentChannel? {
        for name in socketNames(pid) {
            guard let fd = try UnixSocket.connect(abstract: name, inNetworkNamespaceOf: pid) else { continue }
            // The name may belong to another process (PID namespaces sharing a network namespace both have
            // a PID 1): only the agent of `pid` itself will do.
            guard UnixSocket.peerPID(fd) == pid else {
                fd.closeQuietly()
                continue
            }
            let channel = AgentChannel(pid: pid, fd: fd)
            // A stuck agent becomes an error, not a hang.
            channel.setTimeout(seconds: timeoutSeconds)
            return channel
        }
        return nil
    }

    /// A channel over a connection already made to the agent of `pid`.
    static func adopting(pid: Int32, fd: FileDescriptor, timeoutSeconds: Int = 120) -> AgentChannel {
        let channel = AgentChannel(pid: pid, fd: fd)
        channel.setTimeout(seconds: timeoutSeconds)
        return channel
    }

    /// How long a receive or a send may wait; requests that may take long (QUIESCE waits for the program's
    /// threads) set it first.
    func setTimeout(seconds: Int) { StreamSocket.setTimeout(fd, seconds: seconds) }

    /// Sends `op`; `text` goes in the message's text when it fits (with its terminating zero), else none is sent.
    func send(_ op: stasis_agent_op, slot: Int32 = 0, id: UInt64 = 0, offset: UInt64 = 0, length: UInt64 = 0, text: String = "") throws {
        var message = Message()
        message.op = op.rawValue
        message.slot = slot
        message.id = id
        message.offset = offset
        message.length = length
        let bytes = Array(text.utf8)
        if bytes.count < MemoryLayout.size(ofValue: message.text) {
            withUnsafeMutableBytes(of: &message.text) { $0.copyBytes(from: bytes) }
        }
        try sending.run {
            if let failure = withUnsafeBytes(of: &message, { StreamSocket.send(fd, $0) }) {
                throw StasisError(.gpu, "the agent of PID \(pid) went away (\(failure.reason))")
            }
        }
    }

    /// Sends `text` with `op` in pieces that fit a message's text (RESCUE_STORE): each names the whole
    /// length (id) and where it goes (offset, length); the agent answers none of them.
    func sendText(_ op: stasis_agent_op, _ text: String) throws {
        let bytes = Array(text.utf8)
        let piece = MemoryLayout.size(ofValue: Message().text)
        for start in stride(from: 0, to: max(bytes.count, 1), by: piece) {
            var message = Message()
            message.op = op.rawValue
            message.id = UInt64(bytes.count)
            message.offset = UInt64(start)
            let part = bytes[start..<min(bytes.count, start + piece)]
            message.length = UInt64(part.count)
            withUnsafeMutableBytes(of: &message.text) { $0.copyBytes(from: part) }
            try sending.run {
                if let failure = withUnsafeBytes(of: &message, { StreamSocket.send(fd, $0) }) {
                    throw StasisError(.gpu, "the agent of PID \(pid) went away (\(failure.reason))")
                }
            }
        }
    }

    /// Sends `op` about allocation `id` with `descriptor` attached (IMPORT).
    func send(_ op: stasis_agent_op, id: UInt64, passing descriptor: FileDescriptor) throws {
        var message = Message()
        message.op = op.rawValue
        message.id = id
        try sending.run {
            if let failure = withUnsafeBytes(of: &message, { UnixSocket.send(fd, $0, passing: descriptor) }) {
                throw StasisError(.gpu, "the agent of PID \(pid) went away (\(failure.reason))")
            }
        }
    }

    /// Receives a message and the descriptor that came with it (EXPORT's answer).
    func receivePassed() throws -> (Message, FileDescriptor?) {
        var message = Message()
        let (failure, descriptor) = withUnsafeMutableBytes(of: &message) { UnixSocket.receive(fd, into: $0) }
        switch failure {
        case nil: return (message, descriptor)
        case .timedOut?: throw StasisError(.gpu, "the agent of PID \(pid) did not answer in time")
        case .closed?, .failed?, .tls?: throw StasisError(.gpu, "the agent of PID \(pid) closed the connection")
        }
    }

    func receive() throws -> Message {
        var message = Message()
        switch withUnsafeMutableBytes(of: &message, { StreamSocket.receive(fd, into: $0) }) {
        case nil: return message
        case .timedOut?: throw StasisError(.gpu, "the agent of PID \(pid) did not answer in time")
        case .closed?, .failed?, .tls?: throw StasisError(.gpu, "the agent of PID \(pid) closed the connection")
        }
    }

    /// Receives the answer to a request: OK (returned), or ERROR (thrown with the agent's words).
    @discardableResult
    func expect(_ op: stasis_agent_op, doing what: String) throws -> Message {
        let message = try receive()
        if message.op == STASIS_AGENT_ERROR.rawValue { throw Self.error(message, pid: pid, doing: what) }
        guard message.op == op.rawValue else {
            throw StasisError(.gpu, "the agent of PID \(pid) answered \(message.op) to \(what), expected \(op.rawValue)")
        }
        return message
    }

    static func text(_ message: Message) -> String {
        withUnsafeBytes(of: message.text) { bytes in
            String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    static func error(_ message: Message, pid: Int32, doing what: String) -> StasisError {
        let why = text(message)
        // NCCL shares its peer-to-peer buffers between the ranks; without them it goes through host memory.
        let hint = why.contains("NCCL P2P") ? "start the job with NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0 (NCCL then passes data through plain host memory, which checkpoints)" : nil
        return StasisError(.gpu, "the agent of PID \(pid) could not \(what): \(why)", hint: hint)
    }

    /// Ends the connection both ways (a receiver blocked on it returns).
    func shutdown() { fd.shutdown(.both) }

    /// Ends the connection and waits until the agent has closed its end too (or `seconds` pass), so that
    /// CRIU, which comes next, finds no connection in the process.
    func closeAndWait(seconds: Int = 10) {
        fd.shutdown(.writing)
        setTimeout(seconds: seconds)
        StreamSocket.drainUntilClosed(fd)
        close()
    }

    func close() {
        closed.withLock { closed in
            guard !closed else { return }
            closed = true
            fd.closeQuietly()
        }
    }
}
