import Foundation
import Glibc

/// Runs work on dedicated threads and waits for all of them.
///
/// `DispatchQueue.concurrentPerform` runs at most as many iterations at once as there are cores, so work that
/// waits on the disk cannot keep more reads in flight than that; these are real threads, as many as asked.
public enum Workers {
    /// The number of workers for work that mixes reads from a cold disk with CPU work: enough threads that
    /// reads stay in flight while others compute (measured: cold reads of 2 MiB chunk files reach the
    /// speed of one big sequential read only at 16-32 readers).
    public static var ioDepth: Int { max(16, 4 * ProcessInfo.processInfo.activeProcessorCount) }

    /// Calls `body(worker)` on `count` threads (at least one) and returns when every call has returned.
    public static func run(_ count: Int, name: String, _ body: @escaping @Sendable (Int) -> Void) {
        let done = DispatchGroup()
        for worker in 0..<max(1, count) {
            done.enter()
            let thread = Thread {
                body(worker)
                done.leave()
            }
            thread.name = "\(name)-\(worker)"
            thread.start()
        }
        done.wait()
    }
}

/// CPU time (user + system) this process has used so far, in seconds: how many cores a phase kept busy is
/// the difference over the phase divided by its wall time.
public enum ProcessCPU {
    public static var seconds: Double {
        var usage = rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
        return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
    }
}
