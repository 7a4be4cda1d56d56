import Foundation
import Glibc
import CStasisLinux
import StasisCore

/// Starting and reaping child processes.
public enum Spawn {
    /// Starts `executable` with `arguments`. `descriptors` maps a descriptor of ours to the number it gets in
    /// the child (dup2 clears close-on-exec there); every other descriptor is closed in the child, even one
    /// that a library opened without close-on-exec (Foundation's pipes): a daemon the child leaves behind
    /// (podman's conmon, a container's shim) must not hold a pipe of ours open.
    /// `ownProcessGroup`: the child leads a process group of its own, so that a terminal's SIGINT or SIGHUP,
    /// sent to the foreground group, reaches stasis alone, which decides what to do with it.
    public static func start(_ executable: String, _ arguments: [String], descriptors: [FileDescriptor: Int32] = [:],
                             environment: [String: String]? = nil, ownProcessGroup: Bool = false) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (ours, theirs) in descriptors.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
            posix_spawn_file_actions_adddup2(&actions, ours.rawValue, theirs)
        }
        _ = stasis_spawn_close_from(&actions, max(3, (descriptors.values.max() ?? 0) + 1))
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        let env = environment.map { $0.map { strdup("\($0.key)=\($0.value)") } + [nil] }
        defer { env?.forEach { free($0) } }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        if ownProcessGroup {
            posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
            posix_spawnattr_setpgroup(&attributes, 0)
        }
        var pid: pid_t = 0
        let result: Int32 = env.map { envp in posix_spawn(&pid, executable, &actions, &attributes, argv, envp) }
            ?? posix_spawn(&pid, executable, &actions, &attributes, argv, environ)
        guard result == 0 else { throw systemError("cannot start", executable, errno: result) }
        return pid
    }

    /// Waits for a child and returns its exit status (128+signal when it was killed).
    @discardableResult
    public static func wait(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { return -1 }
        }
        if status & 0x7f == 0 { return (status >> 8) & 0xff }
        return 128 + (status & 0x7f)
    }

    /// Makes orphaned descendants this process's children (on) or not (off), so that it can reap what a
    /// child leaves behind where PID 1 does not (a container's init that reaps nothing).
    public static func adoptOrphans(_ on: Bool) {
        _ = stasis_set_child_subreaper(on ? 1 : 0)
    }

    /// Reaps those of `pids` that are (or within `seconds` become) zombie children of this process.
    public static func reap(_ pids: [pid_t], within seconds: Double = 2) {
        var left = Set(pids)
        let deadline = Date().addingTimeInterval(seconds)
        while !left.isEmpty, Date() < deadline {
            for pid in left {
                var status: Int32 = 0
                let got = waitpid(pid, &status, WNOHANG)
                if got == pid || (got < 0 && errno == ECHILD) { left.remove(pid) }
            }
            if !left.isEmpty { usleep(10_000) }
        }
    }

    /// Runs a program to completion and returns its exit status and standard output (standard error is ours).
    public static func output(_ executable: String, _ arguments: [String]) throws -> (status: Int32, stdout: Data) {
        let (readEnd, writeEnd) = try attempt("cannot create a pipe for", executable) { try FileDescriptor.makePipe() }
        let pid: pid_t
        do {
            defer { writeEnd.closeQuietly() }
            pid = try start(executable, arguments, descriptors: [writeEnd: 1])
        } catch {
            readEnd.closeQuietly()
            throw error
        }
        let data = FileHandle(fileDescriptor: readEnd.rawValue, closeOnDealloc: true).readDataToEndOfFile()
        return (wait(pid), data)
    }

    /// Replaces this process with `arguments[0]` (looked up in PATH) and `arguments`, its environment set to
    /// ours with `environment` on top. Returns only when the program could not be started: the Errno says why.
    public static func replaceProcess(with arguments: [String], environment: [String: String]) -> Errno {
        for (name, value) in environment { setenv(name, value, 1) }
        let argv = arguments.map { strdup($0) } + [nil]
        execvp(arguments[0], argv)
        return Errno(rawValue: errno)
    }

    /// Finds `name` in PATH.
    public static func which(_ name: String, path: String? = ProcessInfo.processInfo.environment["PATH"]) -> String? {
        if name.contains("/") { return FileSystem.isExecutable(name) ? name : nil }
        let directories = (path ?? "").split(separator: ":").map(String.init)
        for directory in directories where !directory.isEmpty {
            let candidate = directory + "/" + name
            if FileSystem.isExecutable(candidate), !FileSystem.isDirectory(candidate) { return candidate }
        }
        return nil
    }
}
