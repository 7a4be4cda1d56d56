import Foundation
import Glibc
import StasisCore
@testable import StasisEngine
import StasisOS
import StasisTestSupport
import Testing

/// A GPU job's tree is taken only while it holds still: real processes, one of them a "compiler" (a copy of
/// sleep named ptxas, as XLA runs ptxas for every kernel it compiles).
@Suite struct TreeSettlingTests {
    /// A shell whose child is `ptxas` for `seconds`, then plain sleep.
    static func treeCompiling(for seconds: Int) throws -> Process {
        let folder = Harness.scratch("settle")
        try FileManager.default.copyItem(atPath: "/bin/sleep", toPath: folder + "/ptxas")
        let shell = Process()
        shell.executableURL = URL(fileURLWithPath: "/bin/sh")
        shell.arguments = ["-c", "\(folder)/ptxas \(seconds); sleep 30"]
        try shell.run()
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline, !ProcFS.tree(root: shell.processIdentifier).contains(where: { $0.command == "ptxas" }) { usleep(10_000) }
        return shell
    }

    @Test func aCompilerInTheTreeIsWaitedForThenTheTreeIsTaken() throws {
        let shell = try Self.treeCompiling(for: 1)
        defer { shell.terminate(); kill(shell.processIdentifier, SIGKILL) }
        let watch = Stopwatch()
        try TreeSettling.await(root: shell.processIdentifier, seconds: 10)
        #expect(watch.seconds >= 0.5, "it waited for ptxas to end: \(watch.seconds) s")
        #expect(!ProcFS.tree(root: shell.processIdentifier).contains { $0.command == "ptxas" })
    }

    @Test func aCompilerThatOutlastsTheTimeIsRefusedNamingIt() throws {
        let shell = try Self.treeCompiling(for: 20)
        defer { for member in ProcFS.tree(root: shell.processIdentifier).reversed() { kill(member.pid, SIGKILL) } }
        do {
            try TreeSettling.await(root: shell.processIdentifier, seconds: 0.5)
            Issue.record("a tree running ptxas must be refused")
        } catch let error as StasisError {
            #expect(error.code == .busy && error.message.contains("ptxas") && error.message.contains("nothing was touched"), "\(error)")
        }
    }

    @Test func aChangedTreeIsNamed() throws {
        let shell = try Self.treeCompiling(for: 20)
        defer { for member in ProcFS.tree(root: shell.processIdentifier).reversed() { kill(member.pid, SIGKILL) } }
        let before = ProcFS.tree(root: shell.processIdentifier).map(\.pid)
        #expect(TreeSettling.change(root: shell.processIdentifier, expected: before) == nil)
        let helper = try #require(ProcFS.tree(root: shell.processIdentifier).first { $0.command == "ptxas" })
        kill(helper.pid, SIGKILL)
        let deadline = Date().addingTimeInterval(5)
        var change: String?
        while Date() < deadline, change == nil || change!.contains("ended") == false {
            change = TreeSettling.change(root: shell.processIdentifier, expected: before)
            usleep(10_000)
        }
        #expect(change?.contains("ended") == true || change?.contains("started") == true, "\(change ?? "no change seen")")
    }
}
