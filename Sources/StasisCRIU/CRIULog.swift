import Foundation
import StasisCore
import StasisOS

/// Picks the lines of a CRIU log that explain a failure, for quoting in error messages.
public enum CRIULog {
    /// Errors CRIU logs that do not make it fail. Seen on every run in VMs whose hard RLIMIT_NOFILE is
    /// below CRIU's wish: "rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted".
    static let harmless = ["Can't setup RLIMIT_NOFILE"]

    /// The error lines of the log (CRIU marks them "Error (file:line)"), at most `limit`, with the line
    /// before the first one for context; when there are none, the log's last lines.
    public static func excerpt(path: String, limit: Int = 8) -> [String] {
        // A log that cannot be read quotes nothing: the failure being explained is reported all the same.
        guard let data = try? FileSystem.readFileIfPresent(path) else { return [] }
        let lines = String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: true)
            .map(String.init).filter { line in !harmless.contains { line.contains($0) } }
        let errorIndices = lines.indices.filter { lines[$0].contains("Error (") || lines[$0].contains("Error: ") }
        guard let first = errorIndices.first else { return Array(lines.suffix(min(limit, 5))) }
        var picked = Array(errorIndices.suffix(limit))
        if first > 0, picked.first == first, picked.count < limit { picked.insert(first - 1, at: 0) }
        return picked.map { lines[$0] }
    }
}
