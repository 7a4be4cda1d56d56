import Foundation
import Glibc
import StasisCRIU
import Testing

@Suite struct CRIULogExcerpts {
    @Test func logExcerptSkipsHarmlessLinesAndKeepsErrors() throws {
        let path = "/tmp/stasis-unit-\(getpid()).log"
        defer { unlink(path) }
        try """
        (00.01) starting
        (00.02) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
        (00.03) about to fail
        (00.04) Error (criu/pstree.c:300): The root process 1 is not a session leader.
        (00.05) Error (criu/cr-dump.c:2111): Dumping FAILED.
        """.write(toFile: path, atomically: true, encoding: .utf8)
        let lines = CRIULog.excerpt(path: path)
        #expect(lines.count == 3)
        #expect(lines[0].contains("about to fail"))
        #expect(lines[1].contains("session leader"))
    }
}
