import Foundation
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

    /// Starts CRIU with `arguments`, the same way for every call: CRIU's stdout goes to our stderr, keeping
    /// --json output clean, and the stasis CRIU plugin, if installed in
    /// CRIU's plugin directory, stands aside (stasis drives the GPU itself).
    /// `ownProcessGroup`: out of the terminal's reach (a dump: only stasis decides when it stops, see `call`).
    /// `quiet`: CRIU's stdout goes nowhere (`check`'s "Looks good.": stasis reports the check itself).
    func start(_ arguments: [String], passing descriptors: [FileDescriptor: Int32] = [:], ownProcessGroup: Bool = false, quiet: Bool = false) throws -> Int32 {
        var environment = ProcessInfo.processInfo.environment
        environment["STASIS_CRIU_PLUGIN"] = "off"
        let null = quiet ? try FileDescriptor.open("/dev/null", .writeOnly) : nil
        defer { null?.closeQuietly() }
        do {
            return try Spawn.start(binary.path, arguments, descriptors: descriptors.merging([null ?? .standardError: 1]) { $1 },
                                   environment: environment, ownProcessGroup: ownProcessGroup)
        } catch {
            throw StasisError(.criuMissing, "cannot start \(binary.path) \(arguments.first ?? ""): \(error)", hint: CRIUBinary.installHint)
        }
    }

    /// Sends `request` and returns CRIU's final response. `handing` are descriptors CRIU gets under the
    /// numbers given (above 3, its RPC socket's); they are closed here once CRIU has them, so that only
    /// CRIU holds them from then on.
    func call(_ request: criu_req, handing descriptors: [FileDescriptor: Int32] = [:], onNotify: (Notification) throws -> Void = { _ in }) throws -> criu_resp {
        defer { for fd in descriptors.keys { fd.closeQuietly() } }
        let (ours, theirs) = try attempt("cannot create a socket pair for", "criu swrk") { try UnixSocket.packetPair() }
        defer { ours.closeQuietly() }
        let pid: Int32
        do {
            defer {
                theirs.closeQuietly()
                for fd in descriptors.keys { fd.closeQuietly() }
            }
            // A dump's CRIU must not get the terminal's Ctrl-C itself: after a migration's commit, a CRIU that
            // died would thaw the job here while it runs there too. stasis handles the signal instead.
            pid = try start(["swrk", "3"], passing: descriptors.merging([theirs: 3]) { $1 }, ownProcessGroup: request.type == .dump,
                            quiet: request.type == .check)
        }
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

    private func send(_ message: criu_req, on fd: FileDescriptor) throws {
        let bytes: [UInt8] = try message.serializedBytes()
        try attempt("cannot send a request to", "criu swrk") { try UnixSocket.sendPacket(fd, bytes) }
    }

    /// Receives one message; nil when CRIU closed its end. The size is peeked first so no message is cut.
    private func receive(on fd: FileDescriptor) throws -> criu_resp? {
        guard let buffer = try attempt("cannot read a response from", "criu swrk", { try UnixSocket.receivePacket(fd) }) else { return nil }
        do {
            return try criu_resp(serializedBytes: buffer)
        } catch {
            throw StasisError(.criuFailed, "criu swrk sent a response stasis cannot decode: \(error)")
        }
    }
}
