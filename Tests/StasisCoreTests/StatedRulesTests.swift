import Foundation
import Testing

/// Rules docs/ARCHITECTURE.md states about Sources, checked so they stay true: every `try?` says why the
/// error it drops may be dropped, FileManager is used only inside StasisOS (the system boundary), and every
/// lock or condition is one of the concurrency kit's. A failure lists each offending file:line.
@Suite struct StatedRules {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    /// Every Swift file under Sources, as (path relative to the package, lines); generated code is not ours.
    static func sources() throws -> [(path: String, lines: [Substring])] {
        let sources = root + "/Sources"
        guard let walker = FileManager.default.enumerator(atPath: sources) else { throw CocoaError(.fileReadNoSuchFile) }
        var files: [(String, [Substring])] = []
        while let relative = walker.nextObject() as? String {
            guard relative.hasSuffix(".swift"), !relative.split(separator: "/").contains("Generated") else { continue }
            let text = try String(contentsOfFile: sources + "/" + relative, encoding: .utf8)
            files.append(("Sources/" + relative, text.split(separator: "\n", omittingEmptySubsequences: false)))
        }
        return files.sorted { $0.0 < $1.0 }
    }

    /// The code of a line: what comes before a `//` comment (good enough for these checks: no string in
    /// Sources that holds `//` also holds the words looked for).
    static func code(_ line: Substring) -> Substring {
        line.range(of: "//").map { line[..<$0.lowerBound] } ?? line
    }

    static func isComment(_ line: Substring) -> Bool { line.trimmingCharacters(in: .whitespaces).hasPrefix("//") }

    /// The places (file:line) where code uses `word`, in the files `include` accepts.
    static func uses(of word: String, where include: (String) -> Bool = { _ in true }) throws -> [String] {
        try sources().filter { include($0.path) }.flatMap { file in
            file.lines.indices.filter { code(file.lines[$0]).contains(word) }.map { "\(file.path):\($0 + 1)" }
        }
    }

    /// A `try?` turns any error into nil; each says, on its line or the line before, why that is right there.
    @Test func everyTryQuestionMarkIsJustified() throws {
        var unjustified: [String] = []
        for file in try Self.sources() {
            for (index, line) in file.lines.enumerated() where Self.code(line).contains("try?") {
                let commented = line.contains("//") || (index > 0 && Self.isComment(file.lines[index - 1]))
                if !commented { unjustified.append("\(file.path):\(index + 1)") }
            }
        }
        #expect(unjustified.isEmpty, "try? without a comment saying why the error may be dropped (\(unjustified.count)):\n\(unjustified.joined(separator: "\n"))")
    }

    /// Files are listed, examined, read and removed through StasisOS, which says what failed.
    @Test func fileManagerStaysInsideStasisOS() throws {
        let outside = try Self.uses(of: "FileManager") { !$0.hasPrefix("Sources/StasisOS/") }
        #expect(outside.isEmpty, "FileManager outside StasisOS (use FileSystem):\n\(outside.joined(separator: "\n"))")
    }

    /// Threads share state through the kit (Locked, CriticalSection, Monitor, BlockingQueue, PendingNames, FirstFailure),
    /// not locks or conditions of their own.
    @Test func everyLockIsTheKits() throws {
        let outsideKit: (String) -> Bool = { $0 != "Sources/StasisCore/Concurrency.swift" }
        let own = try Self.uses(of: "NSLock", where: outsideKit) + Self.uses(of: "NSCondition", where: outsideKit)
        #expect(own.isEmpty, "NSLock or NSCondition outside the concurrency kit (use Locked, CriticalSection or Monitor):\n\(own.joined(separator: "\n"))")
    }
}
