import ArgumentParser
import Foundation
import StasisCore
import StasisOS
import StasisEngine
import StasisStore

/// Options every reporting command shares.
struct OutputOptions: ParsableArguments {
    @Flag(name: .long, help: "Print the result as JSON on standard output.")
    var json = false
}

/// --store, for every command that reads or writes chunks.
struct StoreOptions: ParsableArguments {
    @Option(name: .long, help: "The chunk store (default: where a checkpoint is read, the store it names; otherwise $STASIS_STORE, else \(StoreLocation.defaultPath)).")
    var store: String?

    func validate() throws {
        if store?.isEmpty == true { throw ValidationError("--store is empty: name the store's directory (an empty path would make the current directory one)") }
    }
}

/// Every line of text the command prints goes through here: this `print` shadows the standard library's
/// in this module, so no report, listing or message can reach the terminal with a control character or a
/// bidirectional override in it (a container ID with a newline, a manifest's hostname with an escape
/// sequence): they are written out (`Format.printable`). JSON goes through `Output.json` instead.
func print(_ line: String) {
    Swift.print(Format.printable(line))
}

enum Output {
    static func json<T: Encodable>(_ value: T) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        do {
            let data = try encoder.encode(value)
            Swift.print(escapingTerminalControls(json: String(decoding: data, as: UTF8.self)))
        } catch {
            // Not silently nothing: a value JSON cannot hold (a number that is not finite) is named on stderr.
            FileHandle.standardError.write(Data("stasis: error: cannot write the output as JSON: \(error)\n".utf8))
        }
    }

    /// JSON text with DEL, the C1 controls and the bidirectional overrides written as \uXXXX escapes: the
    /// encoder escapes only what JSON requires (C0 controls inside strings, quotes, backslashes), and these
    /// can occur only inside strings, where the escape means the same character. The document is unchanged;
    /// a terminal showing it is safe. (The C0 left are the layout's newlines, outside strings.)
    static func escapingTerminalControls(json text: String) -> String {
        let escapedHere = { (scalar: Unicode.Scalar) in scalar.value >= 0x7F && Format.isHostile(scalar) }
        guard text.unicodeScalars.contains(where: escapedHere) else { return text }
        var escaped = ""
        for scalar in text.unicodeScalars {
            if escapedHere(scalar) {
                escaped += String(format: "\\u%04x", scalar.value)
            } else {
                escaped.unicodeScalars.append(scalar)
            }
        }
        return escaped
    }

    /// An error as the terminal shows it: its message, CRIU's log lines, the log's path and the hint, each
    /// made printable (they may quote names from a manifest, an archive or a peer) and one per line.
    static func text(of error: StasisError) -> String {
        var lines = [Format.printable(error.message)]
        lines += error.logExcerpt.map { "  | " + Format.printable($0) }
        if let path = error.logPath { lines.append("  full log: " + Format.printable(path)) }
        if let hint = error.hint { lines.append("  hint: " + Format.printable(hint)) }
        return lines.joined(separator: "\n")
    }

    /// Runs a command body; a StasisError becomes a clear message (or a JSON error object) and exit code 1.
    static func run(json: Bool, _ body: () throws -> Void) throws {
        do {
            try body()
        } catch let error as StasisError {
            if json {
                struct Failure: Encodable {
                    var error: String; var code: String; var hint: String?; var log: [String]; var logFile: String?
                }
                Output.json(Failure(error: error.message, code: error.code.rawValue, hint: error.hint,
                                    log: error.logExcerpt, logFile: error.logPath))
            }
            clearProgress()
            FileHandle.standardError.write(Data("stasis: error: \(text(of: error))\n".utf8))
            throw ExitCode.failure
        }
    }

    /// A progress line redrawn in place on standard error (phase, bytes moved, of how many, rate since the
    /// phase began), only when standard error is a terminal and the output is not JSON: a pipe or a log file
    /// gets nothing.
    static func progressHandler(json: Bool = false) -> ProgressHandler? {
        guard !json, FileDescriptor.standardError.isTerminal else { return nil }
        let phase = Locked<(name: String, started: Date, bytes: UInt64)?>(nil)
        return { progress in
            let now = Date()
            let start = phase.withLock { current -> (started: Date, bytes: UInt64) in
                if current?.name != progress.phase { current = (progress.phase, now, progress.bytes) }
                return (current!.started, current!.bytes)
            }
            var line = "\r\u{1B}[K\(progress.phase): \(Format.bytes(progress.bytes))"
            if let total = progress.totalBytes, total > 0 {
                line += String(format: " of %@ (%.0f%%)", Format.bytes(total), Double(progress.bytes) * 100 / Double(total))
            }
            let seconds = now.timeIntervalSince(start.started)
            if seconds > 0.2, progress.bytes >= start.bytes {
                line += ", " + Format.throughput(bytes: progress.bytes - start.bytes, seconds: seconds)
            }
            drawn.withLock { $0 = true }
            FileHandle.standardError.write(Data(line.utf8))
        }
    }

    /// Whether a progress line is on the terminal now.
    private static let drawn = Locked(false)

    /// Erases the progress line, if one is drawn (before a report, an error or a log line).
    static func clearProgress() {
        guard drawn.withLock({ was in defer { was = false }; return was }) else { return }
        FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
    }
}
