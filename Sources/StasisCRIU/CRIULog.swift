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
    public static func excerpt(path: String, limit: Int = 8) -> [String] { excerpt(lines(path), limit: limit) }

    /// The log's excerpt and stasis's advice for it, from one read of the log.
    public static func explain(path: String, limit: Int = 8) -> (excerpt: [String], advice: String?) {
        let lines = lines(path)
        return (excerpt(lines, limit: limit), advice(lines))
    }

    /// The log's lines but the harmless ones; none when it cannot be read (the failure being explained is
    /// reported all the same).
    static func lines(_ path: String) -> [String] {
        // See above: an unreadable log quotes nothing.
        guard let data = try? FileSystem.readFileIfPresent(path) else { return [] }
        return String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: true)
            .map(String.init).filter { line in !harmless.contains { line.contains($0) } }
    }

    static func excerpt(_ lines: [String], limit: Int) -> [String] {
        let errorIndices = lines.indices.filter { lines[$0].contains("Error (") || lines[$0].contains("Error: ") }
        guard let first = errorIndices.first else { return Array(lines.suffix(min(limit, 5))) }
        var picked = Array(errorIndices.suffix(limit))
        if first > 0, picked.first == first, picked.count < limit { picked.insert(first - 1, at: 0) }
        return picked.map { lines[$0] }
    }

    /// stasis's next step for a failure CRIU explains in its log, or nil: the first rule whose every marker
    /// is on one line of the log. Each rule is provoked by a test (Integration.CRIUAdvice).
    static func advice(_ lines: [String]) -> String? {
        rules.first { rule in lines.contains { line in rule.markers.allSatisfy { line.contains($0) } } }?.hint
    }

    struct Rule {
        let markers: [String]
        let hint: String
    }

    static let rules: [Rule] = [
        Rule(markers: ["Found dangling tty"],
             hint: "the job uses the terminal it was started from: dump it with --shell-job, or start it detached from the terminal (setsid, nohup, a service)"),
        Rule(markers: ["is not a session leader"],
             hint: "the job shares the session of what started it (a shell, a supervisor): dump it with --shell-job, or start it in a session of its own (setsid)"),
        // Seen where the caller runs in a PID namespace whose session leader lives outside it (a CI
        // container): CRIU refuses before it looks at --shell-job, so the only way out is a new session.
        Rule(markers: ["A session leader of", "is outside of its pid namespace"],
             hint: "the job's session began outside its PID namespace (it was started from a container's entry point or a process outside): start it in a session of its own (setsid); --shell-job does not help here"),
        Rule(markers: ["Connected TCP socket, consider using"],
             hint: "the job has established TCP connections: dump it with --tcp-established (they come back with it, where the same addresses exist), or when they are closed"),
        Rule(markers: ["External socket is used"],
             hint: "the job is connected through a Unix socket to a process outside its tree (a logging daemon, D-Bus, a supervisor): dump the tree that holds both ends, or close that connection first"),
        Rule(markers: ["Can't open file", "on restore"],
             hint: "a file the job had open is no longer where it was: CRIU reopens files by path, so put it back there (or restore where it exists); the log line names it"),
        Rule(markers: ["Can't dump nested", "namespace"],
             hint: "part of the job runs in namespaces of its own (unshare, a container inside it): checkpoint that container (stasis dump --container ID), or dump from the first process in those namespaces"),
    ]
}
