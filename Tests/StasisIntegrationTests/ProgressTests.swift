import Foundation
import StasisTestSupport
import Testing

/// Long operations (export, import, restore, dump) show their progress on a terminal (phase, bytes, of how
/// many, rate) and nothing on a pipe.
extension Integration {
@Suite struct ProgressDisplay {
    @Test func exportAndImportShowProgressOnATerminalOnly() throws {
        let workload = try Workload("memory", ["--mem", "1024", "--fill", "random"])
        defer { workload.stop() }
        let root = Harness.scratch("progress")
        let environment = ["STASIS_STORE": root + "/store"]
        let dump = try Harness.stasis(["dump", "\(workload.pid)", "-D", root + "/ckpt"], environment: environment)
        try #require(dump.succeeded, "\(dump.stderr)")

        // On a pipe: the report only.
        let piped = try Harness.stasis(["export", root + "/ckpt", "-o", root + "/piped.stasis"], environment: environment)
        #expect(piped.succeeded, "\(piped.stderr)")
        #expect(!piped.stderr.contains("exporting") && !piped.stderr.contains("\u{1B}[K"), "\(piped.stderr)")

        // On a terminal (script(1) gives the command one): redrawn progress lines, then the report.
        func onTerminal(_ arguments: [String]) throws -> String {
            let command = ([Harness.stasis] + arguments).map { "'\($0)'" }.joined(separator: " ")
            let run = try Harness.run("/usr/bin/script", ["-qec", command, "/dev/null"], environment: environment)
            #expect(run.succeeded, "\(run.stdout)")
            return run.stdout
        }
        let exported = try onTerminal(["export", root + "/ckpt", "-o", root + "/tty.stasis"])
        #expect(exported.contains("\r\u{1B}[Kexporting: ") && exported.contains("B/s"), "\(exported.suffix(400))")
        #expect(exported.contains(" of 1.00 GiB ("), "an export says how much of how much: \(exported.suffix(400))")
        let imported = try onTerminal(["import", root + "/tty.stasis", "-D", root + "/imported", "--store", root + "/store-b"])
        #expect(imported.contains("\r\u{1B}[Kimporting: ") && imported.contains("%"), "\(imported.suffix(400))")
        #expect(imported.contains("imported"), "\(imported.suffix(400))")

        // A restore shows the memory streamed to CRIU; a dump's bytes never go back.
        let restored = try onTerminal(["restore", root + "/ckpt"])
        #expect(restored.contains("\r\u{1B}[Krestoring memory: ") && restored.contains("%"), "\(restored.suffix(400))")
        #expect(restored.contains("restored"), "\(restored.suffix(400))")
        let again = try onTerminal(["dump", "\(workload.pid)", "-D", root + "/ckpt2", "--leave-running"])
        let frames = again.components(separatedBy: "\r\u{1B}[K").compactMap { frame -> Double? in
            guard frame.hasPrefix("dumping memory: "), let open = frame.firstIndex(of: "("), let close = frame.firstIndex(of: "%") else { return nil }
            return Double(frame[frame.index(after: open)..<close])
        }
        #expect(frames == frames.sorted(), "the dump's progress went back: \(frames)")
    }
}
}
