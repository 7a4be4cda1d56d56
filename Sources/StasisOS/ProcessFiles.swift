import CStasisLinux
import Foundation
import Glibc

/// Open files of other processes, as the kernel tells them: whether two descriptors (of two processes) are
/// the same open file (kcmp(2)), and which process holds a given one. How stasis pairs device memory one
/// process imported with the export it came from: both agents keep a duplicate of the descriptor.
public enum ProcessFiles {
    /// Whether descriptor `fd1` of `pid1` and `fd2` of `pid2` are one open file; nil when it cannot be told.
    public static func same(_ pid1: Int32, _ fd1: Int32, _ pid2: Int32, _ fd2: Int32) -> Bool? {
        switch stasis_same_file(pid1, fd1, pid2, fd2) {
        case 0: true
        case 1, 2: false
        default: nil
        }
    }

    /// A process other than those in `excluding` that holds the open file `fd` of `pid`, and its descriptor.
    public static func holder(of fd: Int32, in pid: Int32, excluding: Set<Int32>) -> (pid: Int32, fd: Int32)? {
        for other in ProcFS.allPIDs() where !excluding.contains(other) && other != pid {
            for candidate in ProcFS.descriptors(other) where same(pid, fd, other, candidate) == true {
                return (other, candidate)
            }
        }
        return nil
    }
}
