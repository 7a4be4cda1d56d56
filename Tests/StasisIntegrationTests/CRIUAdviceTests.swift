import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisTestSupport
import Testing

/// What CRIU explains in its log gets stasis's own next step (`CRIULog.advice`), each provoked here as a new
/// user meets it: a job started from a terminal, one in its starter's session, one with TCP connections, one
/// connected to a process outside its tree, one with a nested namespace, and a restore whose job's open file
/// was removed. A dump that fails leaves the job running.
extension Integration {
    @Suite(.serialized) struct CRIUAdvice {
        /// A program run in the background that writes the PIDs to dump, space-separated, into the file named
        /// where its arguments say PIDFILE, then waits.
        final class Helper {
            let process = Process()
            let pids: [Int32]

            init(_ executable: String, _ arguments: [String]) throws {
                let pidFile = Harness.scratch("helper") + "/pids"
                process.executableURL = URL(fileURLWithPath: executable)
                process.arguments = arguments.map { $0.replacingOccurrences(of: "PIDFILE", with: pidFile) }
                process.standardInput = FileHandle.nullDevice
                process.standardOutput = FileHandle.nullDevice
                process.standardError = FileHandle.nullDevice
                try process.run()
                let deadline = Date().addingTimeInterval(10)
                var found: [Int32] = []
                while found.isEmpty, Date() < deadline {
                    let text = (try? String(contentsOfFile: pidFile, encoding: .utf8)) ?? ""
                    if text.hasSuffix("\n") { found = text.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { Int32($0) } }
                    if found.isEmpty { usleep(20_000) }
                }
                pids = found
                try #require(!pids.isEmpty, "the helper \(executable) wrote no PID")
            }

            convenience init(python code: String) throws { try self.init("/usr/bin/python3", ["-c", code, "PIDFILE"]) }

            func stop() {
                for pid in pids { kill(pid, SIGKILL) }
                // SIGKILL: the test runner's threads may block SIGTERM, and the helper inherits the mask.
                kill(process.processIdentifier, SIGKILL)
                process.waitUntilExit()
            }
        }

        /// The python line that writes `expression` (a PID) into the helper's PID file, whole or not at all.
        static func reportPID(_ expression: String) -> String {
            #"open(sys.argv[-1] + ".tmp", "w").write(f"{"# + expression + #"}\n"); os.rename(sys.argv[-1] + ".tmp", sys.argv[-1])"#
        }

        func expectAdvice(dumping pid: Int32, _ advice: String) throws {
            let checkpoint = Harness.scratch("advice") + "/image"
            let dump = try Harness.stasis("dump", "\(pid)", "-D", checkpoint)
            #expect(dump.status == 1, "\(dump.stdout)")
            #expect(dump.stderr.contains("hint: " + advice), "\(dump.stderr)")
            #expect(ProcFS.isLive(pid), "the dump failed; PID \(pid) runs on")
            #expect(!FileSystem.exists(checkpoint))
        }

        /// A process started from a shell on a terminal, not its session's leader: CRIU's "Task attached to
        /// shell terminal" (the pty's session leader, sh, is not in the dumped tree).
        @Test func aJobOnATerminal() throws {
            // script(1) runs the shell on a new pseudo-terminal, as its session's leader.
            let helper = try Helper("/usr/bin/script", ["-qfc", "sh -c 'sleep 300 & echo $! > PIDFILE; wait'", "/dev/null"])
            defer { helper.stop() }
            try expectAdvice(dumping: helper.pids[0], "the job uses the terminal it was started from: dump it with --shell-job")
        }

        /// A process that shares the session of the program that started it (no setsid, no terminal).
        @Test func aJobInItsStartersSession() throws {
            let helper = try Helper(python: """
            import os, sys, time
            child = os.fork()
            if child == 0:
                time.sleep(300)
                os._exit(0)
            \(Self.reportPID("child"))
            time.sleep(300)
            """)
            defer { helper.stop() }
            // Where this runner's own session began outside its PID namespace (CI's container), the child
            // has no visible session leader and CRIU says so before it checks for one.
            let advice = getsid(0) == 0
                ? "the job's session began outside its PID namespace"
                : "the job shares the session of what started it"
            try expectAdvice(dumping: helper.pids[0], advice)
        }

        /// Its own session's leader (setsid), as a detached job is, with a connection to itself.
        @Test func aJobWithATCPConnection() throws {
            let helper = try Helper(python: """
            import os, socket, sys, time
            child = os.fork()
            if child == 0:
                os.setsid()
                listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(1)
                client = socket.create_connection(listener.getsockname()); server, _ = listener.accept()
                \(Self.reportPID("os.getpid()"))
                time.sleep(300)
                os._exit(0)
            time.sleep(300)
            """)
            defer { helper.stop() }
            try expectAdvice(dumping: helper.pids[0], "the job has established TCP connections: dump it with --tcp-established")
        }

        /// The dumped process is connected to a Unix socket whose other end another process (outside its tree) holds.
        @Test func aJobConnectedToAProcessOutsideItsTree() throws {
            let helper = try Helper(python: """
            import os, socket, sys, time
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            child = os.fork()
            if child == 0:
                os.setsid()
                a.close()
                time.sleep(300)
                os._exit(0)
            b.close()
            \(Self.reportPID("child"))
            time.sleep(300)
            """)
            defer { helper.stop() }
            // The child holds one end; its parent, outside the dumped tree, the other.
            try expectAdvice(dumping: helper.pids[0], "the job is connected through a Unix socket to a process outside its tree")
        }

        /// A tree whose child runs in a UTS namespace of its own (`unshare -u`).
        @Test func aJobWithANestedNamespace() throws {
            let helper = try Helper("/usr/bin/setsid", ["sh", "-c", "unshare -u sleep 300 & echo $$ > PIDFILE; wait"])
            defer {
                for process in ProcFS.tree(root: helper.pids[0]) { kill(process.pid, SIGKILL) }
                helper.stop()
            }
            try expectAdvice(dumping: helper.pids[0], "part of the job runs in namespaces of its own")
        }

        /// A process outside the dumped tree still in the session its root led keeps the root's PID taken
        /// (without a process of that PID): the restore says so instead of CRIU's "Can't fork: File exists".
        @Test func aRestoreWhosePIDStillNamesASession() throws {
            // The root leads its own session; a grandchild leaves the tree (its parent exits) but keeps the session.
            let helper = try Helper(python: """
            import os, signal, sys, time
            if os.fork() == 0:
                os.closerange(3, 4096)
                os.setsid()
                if os.fork() == 0:
                    if os.fork() == 0:
                        os.execv("/bin/sleep", ["sleep", "300"])
                    os._exit(0)
                os.wait()
                \(Self.reportPID("os.getpid()"))
                os.execv("/bin/sleep", ["sleep", "301"])
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # its child, ended by the dump, is reaped at once
            time.sleep(300)
            """)
            let root = helper.pids[0]
            defer {
                for pid in ProcFS.allPIDs() where ProcFS.stat(pid)?.session == root { kill(pid, SIGKILL) }
                helper.stop()
            }
            let checkpoint = Harness.scratch("advice-session") + "/image"
            let dump = try Harness.stasis("dump", "\(root)", "-D", checkpoint)
            try #require(dump.succeeded, "\(dump.stderr)")
            #expect(Harness.waitGone(root))
            let restore = try Harness.stasis("restore", checkpoint)
            #expect(restore.status == 1)
            #expect(restore.stderr.contains("PID \(root) is still the session of PID") && !restore.stderr.contains("File exists"), "\(restore.stderr)")
            #expect(!ProcFS.isLive(root), "nothing was restored")
        }

        @Test func aRestoreWhoseOpenFileWasRemoved() throws {
            let workload = try Workload("counter", ["--mem", "4"])
            defer { workload.stop() }
            let checkpoint = Harness.scratch("advice-file") + "/image"
            try #require(try Harness.stasis("dump", "\(workload.pid)", "-D", checkpoint).succeeded)
            #expect(Harness.waitGone(workload.pid))
            // The workload writes its log in its directory, which CRIU reopens by path.
            FileSystem.remove(workload.directory + "/log")
            let restore = try Harness.stasis("restore", "-D", checkpoint)
            #expect(restore.status == 1)
            #expect(restore.stderr.contains("hint: a file the job had open is no longer where it was"), "\(restore.stderr)")
            #expect(!ProcFS.isLive(workload.pid), "nothing was restored")
            // A failed restore keeps the log its error names.
            let named = restore.stderr.components(separatedBy: "full log: ").last?.split(separator: "\n").first.map(String.init)
            #expect(named.map(FileSystem.exists) == true, "the log named: \(named ?? "none")")
        }
    }
}
