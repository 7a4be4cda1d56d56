import Foundation
import StasisCore

/// Switches for reaching failure paths in tests: STASIS_FAULT=point[,point...]. Each named point throws
/// where `FaultInjection.check` is called with it. Points: "post-dump" (inside CRIU's post-dump step, while
/// the tree is frozen), "publish" (the same step, after the images were hashed and synced, before the
/// manifest is written), "after-restore" (after CRIU restored the tree, before it is handed over),
/// "pull-later-round" (a pull's rounds of chunks after its first).
/// `point`-kill kills stasis there instead (`die`): "released" (agents released their device memory),
/// "listed" (the catalog entry written, nothing published), "post-dump" (the tree frozen, nothing published),
/// "published" (inside post-dump, just after the rename), "criu-exited", "manifest-rewritten" and "log-moved"
/// (the steps after CRIU's exit, in that order), "push-blob" (a blob sent, the manifest not), "pull-round" (a round of chunks stored, nothing published). `point`-stall stops there for good (`stall`): "chunk",
/// "receive" (a migration's receiver), "commit" (its source), "partial-written" (an export's file),
/// "import-staged". `point`-pause waits 3 s there (`pause`): "receive", "commit", "committed".
public enum FaultInjection {
    public static func check(_ point: String) throws {
        let points = (ProcessInfo.processInfo.environment["STASIS_FAULT"] ?? "").split(separator: ",")
        if points.contains(Substring(point)) {
            throw StasisError(.interrupted, "fault injected at \(point) (STASIS_FAULT)")
        }
    }

    /// Kills this process (SIGKILL, nothing runs after it) when STASIS_FAULT names `point`-kill: how tests
    /// reach "stasis died right here" at a step no outside timing could hit reliably.
    public static func die(_ point: String) {
        let points = (ProcessInfo.processInfo.environment["STASIS_FAULT"] ?? "").split(separator: ",")
        guard points.contains(Substring(point + "-kill")) else { return }
        Signals.killSelf()
    }

    /// Waits here 3 s when STASIS_FAULT names `point`-pause, saying so first: how tests hold an answer back
    /// long enough to send a signal in the middle of a migration.
    public static func pause(_ point: String, say: (String) -> Void) {
        let points = (ProcessInfo.processInfo.environment["STASIS_FAULT"] ?? "").split(separator: ",")
        guard points.contains(Substring(point + "-pause")) else { return }
        say("paused at \(point) (STASIS_FAULT)")
        sleep(3)
    }

    /// Stops here for good when STASIS_FAULT names `point`-stall, saying so first: how tests kill a
    /// process at a known step (a receiver in the middle of a migration).
    public static func stall(_ point: String, say: (String) -> Void) {
        let points = (ProcessInfo.processInfo.environment["STASIS_FAULT"] ?? "").split(separator: ",")
        guard points.contains(Substring(point + "-stall")) else { return }
        say("stalled at \(point) (STASIS_FAULT)")
        while true { sleep(60) }
    }
}
