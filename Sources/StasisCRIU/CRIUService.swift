import Foundation
import Glibc
import StasisCore
import StasisOS
import SwiftProtobuf

/// One `criu swrk` session: CRIU's RPC over a SOCK_SEQPACKET socket pair, as runc, podman and go-criu use it.
///
/// CRIU runs as our child and gets its end of the socket as descriptor 3. Descriptors named in a request
/// (images_dir_fd, work_dir_fd) are numbers in *our* table: CRIU opens them as /proc/<peer pid>/fd/N, with
/// the peer's PID taken from the socket's credentials. Each request may be answered by
/// notifications (pre-dump, post-dump, pre-resume, ...) before the final response; every notification is
/// handed to `onNotify`, and its outcome is sent back, so a failing device step makes CRIU abort and roll
/// back exactly as a failing action script would.
public final class CRIUService {
    public let binary: CRIUBinary
    public init(binary: CRIUBinary) { self.binary = binary }

    /// A notification from CRIU: the action-script name ("pre-dump", "post-restore", ...) and a PID when
    /// CRIU gives one (the restored root for restore actions).
    public struct Notification: Sendable {
        public var script: String
        public var pid: Int32
    }

    /// Starts CRIU with `arguments`, the same way for every call: CRIU's stdout (where `check` prints "Looks
    /// good.") goes to our stderr, keeping --json output clean, and the stasis CRIU plugin, if installed in
    /// CRIU's plugin directory, stands aside (stasis drives the GPU itself).
    func start(_ arguments: [String], passing descriptors: [Int32: Int32] = [:]) throws -> pid_t {
        var environment = ProcessInfo.processInfo.environment
        environment["STASIS_CRIU_PLUGIN"] = "off"
        do {
            return try Spawn.start(binary.path, arguments, descriptors: descriptors.merging([STDERR_FILENO: STDOUT_FILENO]) { $1 },
                                   environment: environment)
        } catch {
            throw StasisError(.criuMissing, "cannot start \(binary.path) \(arguments.first ?? ""): \(error)", hint: CRIUBinary.installHint)
        }
    }

    /// Sends `request` and returns CRIU's final response.
    func call(_ request: criu_req, onNotify: (Notification) throws -> Void = { _ in }) throws -> criu_resp {
        var ends: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &ends) == 0 else {
            throw systemError("cannot create a socket pair for", "criu swrk")
        }
        let ours = ends[0], theirs = ends[1]
        defer { close(ours) }
        let pid: pid_t
        do {
            pid = try start(["swrk", "3"], passing: [theirs: 3])
        } catch {
            close(theirs)
            throw error
        }
        close(theirs)
        defer { Spawn.wait(pid) }

        try send(request, on: ours)
        var notifyFailure: Error?
        while true {
            guard let response = try receive(on: ours) else {
                let status = Spawn.wait(pid)
                throw StasisError(.criuFailed, "criu swrk exited (status \(status)) without answering the \(request.type) request")
            }
            guard response.type == .notify else {
                if let notifyFailure, !response.success { throw notifyFailure }
                return response
            }
            let note = Notification(script: response.notify.script, pid: response.notify.pid)
            var success = true
            if notifyFailure == nil {
                do { try onNotify(note) } catch { notifyFailure = error; success = false }
            } else {
                success = false
            }
            var reply = criu_req()
            reply.type = .notify
            reply.notifySuccess = success
            try send(reply, on: ours)
        }
    }

    private func send(_ message: criu_req, on fd: Int32) throws {
        let bytes: [UInt8] = try message.serializedBytes()
        let sent = bytes.withUnsafeBytes { raw in retryingSend(fd, raw) }
        guard sent == bytes.count else { throw systemError("cannot send a request to", "criu swrk") }
    }

    private func retryingSend(_ fd: Int32, _ raw: UnsafeRawBufferPointer) -> Int {
        while true {
            let sent = Glibc.send(fd, raw.baseAddress, raw.count, Int32(MSG_NOSIGNAL))
            if sent < 0 && errno == EINTR { continue }
            return sent
        }
    }

    /// Receives one message; nil when CRIU closed its end. The size is peeked first so no message is cut.
    private func receive(on fd: Int32) throws -> criu_resp? {
        var size = 0
        while true {
            size = recv(fd, nil, 0, Int32(MSG_PEEK | MSG_TRUNC))
            if size < 0 && errno == EINTR { continue }
            break
        }
        if size < 0 { throw systemError("cannot read a response from", "criu swrk") }
        if size == 0 { return nil }
        var buffer = [UInt8](repeating: 0, count: size)
        let got = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, size, 0) }
        guard got == size else { throw systemError("cannot read a response from", "criu swrk") }
        do {
            return try criu_resp(serializedBytes: buffer)
        } catch {
            throw StasisError(.criuFailed, "criu swrk sent a response stasis cannot decode: \(error)")
        }
    }
}
