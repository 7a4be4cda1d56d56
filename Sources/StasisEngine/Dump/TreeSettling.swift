import Foundation
import StasisCore
import StasisOS

/// A GPU job's tree must hold still while its devices are checkpointed and CRIU seizes it. Frameworks start
/// compilers for a moment (XLA runs ptxas for every kernel it compiles, Triton and torch.compile run a C
/// compiler): such a child, caught half-way through its vfork and exec or exiting as CRIU seizes the tree,
/// fails the dump after the driver has already checkpointed the job, and a dump that fails there can cost
/// the job. So the tree is taken only once it holds no such helper and has kept the same processes for a
/// moment; and after the driver's checkpoint it must still be the same tree, or the GPU is given back and
/// the dump stops, the job running on.
enum TreeSettling {
    /// Commands a job runs for a moment to compile code, by their names in /proc (15 characters at most).
    static let transientHelpers: Set<String> = ["ptxas", "nvlink", "fatbinary", "cicc", "nvcc", "nvdisasm", "cuobjdump",
                                                "cc", "gcc", "g++", "c++", "clang", "clang++", "cc1", "cc1plus", "as", "ld", "collect2"]

    /// Waits (up to `seconds`) until the tree rooted at `root` holds no transient helper and its processes stay
    /// the same over three looks 50 ms apart. Throws, saying which helper kept it busy, when it never does;
    /// nothing has been touched then.
    static func await(root: Int32, seconds: Double) throws {
        let deadline = Date().addingTimeInterval(seconds)
        var steady = 0
        var last: Set<Int32> = []
        var busy: ProcFS.Stat?
        while true {
            let tree = ProcFS.tree(root: root)
            busy = tree.dropFirst().first { transientHelpers.contains($0.command) }
            let members = Set(tree.map(\.pid))
            steady = busy == nil && members == last ? steady + 1 : 0
            last = members
            if steady >= 2 { return }
            guard Date() < deadline else { break }
            usleep(50_000)
        }
        if let busy {
            throw StasisError(.busy, "PID \(busy.pid) (\(busy.command)), a compiler that PID \(busy.ppid) runs for a moment, kept the tree busy for \(Format.seconds(seconds)); nothing was touched",
                              hint: "checkpoint once the job has compiled its kernels (its first steps), or give more time with --lock-timeout")
        }
        throw StasisError(.busy, "the tree of PID \(root) kept starting and ending processes for \(Format.seconds(seconds)); nothing was touched",
                          hint: "try again, or give more time with --lock-timeout")
    }

    /// Nil when the tree rooted at `root` still is `expected`; else what changed.
    static func change(root: Int32, expected: [Int32]) -> String? {
        let now = ProcFS.tree(root: root)
        let members = Set(now.map(\.pid)), before = Set(expected)
        if let gone = before.subtracting(members).sorted().first { return "PID \(gone) ended" }
        if let new = members.subtracting(before).sorted().first {
            return "PID \(new) (\(now.first { $0.pid == new }?.command ?? "?")) started"
        }
        return nil
    }
}
