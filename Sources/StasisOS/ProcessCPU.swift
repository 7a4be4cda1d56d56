import Foundation
import Glibc

/// CPU time (user + system) this process has used so far, in seconds: how many cores a phase kept busy is
/// the difference over the phase divided by its wall time.
public enum ProcessCPU {
    public static var seconds: Double {
        var usage = rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
        return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
    }
}
