import Foundation
import Glibc

/// Signals stasis sends, and the one it must not die of.
public enum Signals {
    /// SIGKILL to `pid`: nothing in the process runs after it (a tree that must not run on half-restored, or
    /// a rolled-back dump's leftovers). Errors (the process is gone already) are of no interest.
    public static func kill(_ pid: Int32) { _ = Glibc.kill(pid, SIGKILL) }

    /// SIGSTOP / SIGCONT to `pid`: a prepared restore's tree waits stopped until its activation. Errors (the
    /// process is gone) show when its state is read next, which every caller does.
    public static func stop(_ pid: Int32) { _ = Glibc.kill(pid, SIGSTOP) }
    public static func resume(_ pid: Int32) { _ = Glibc.kill(pid, SIGCONT) }

    /// SIGKILL to this process, at once: how a test reaches "stasis died right here".
    public static func killSelf() -> Never {
        _ = Glibc.kill(getpid(), SIGKILL)
        while true { pause() }
    }

    /// Ignores SIGPIPE until `restoreBrokenPipe` gets what this returns, so that writing to a pipe whose
    /// reader went away (CRIU failing, a consumer of an archive exiting) is EPIPE, an error stasis reports,
    /// not a signal that kills it. Each use puts back the handler it found, so uses may nest.
    public static func ignoreBrokenPipe() -> BrokenPipeHandler {
        BrokenPipeHandler(previous: signal(SIGPIPE, SIG_IGN))
    }

    public static func restoreBrokenPipe(_ handler: BrokenPipeHandler) { signal(SIGPIPE, handler.previous) }

    /// SIGPIPE's handler as it was before stasis ignored it.
    public struct BrokenPipeHandler: @unchecked Sendable {
        // @unchecked Sendable: a C function pointer (or SIG_DFL/SIG_IGN), handed back to signal(2) unchanged.
        let previous: sighandler_t?
    }
}

/// Who this process is.
public enum ThisProcess {
    public static var pid: Int32 { getpid() }
    public static var isRoot: Bool { geteuid() == 0 }
}

/// Whether two byte ranges hold the same bytes (memcmp: far faster than comparing element by element).
public func bytesEqual(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Bool {
    a.count == b.count && (a.count == 0 || memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0)
}
