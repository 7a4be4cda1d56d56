import Foundation
import Glibc
import StasisCore
@testable import StasisEngine
import StasisOS
import StasisStore
import StasisTestSupport
import Testing

/// What keeps stasis's own directories in order: restores' work directories do not pile up, and `rm` does not
/// pull a checkpoint from under a restore or a verify that is reading it.
@Suite struct Housekeeping {
    /// The restore root kept one directory per restore forever; now the newest ones stay, and none whose
    /// restore still runs goes.
    @Test func restoreWorkDirectoriesDoNotPileUp() throws {
        let root = Harness.scratch("restore-work")
        // PIDs above the kernel's limit: no process has them.
        let dead = (0..<20).map { String(format: "202612%02d-120000-%d", $0 + 1, 4_194_400 + $0) }
        let live = "20260101-000000-\(getpid())"  // the oldest, but its restore (this process) runs
        for name in dead + [live, "not-a-restore"] { try FileManager.default.createDirectory(atPath: root + "/" + name, withIntermediateDirectories: false) }
        RestoreOperation.pruneWorkDirectories(in: root, keeping: 16)
        let left = Set(try FileManager.default.contentsOfDirectory(atPath: root))
        #expect(left == Set(dead.suffix(16) + [live, "not-a-restore"]), "\(left.sorted())")
    }

    /// `stasis rm` waits while a reader (restore, verify, export) holds the store's lock, then removes.
    @Test func rmWaitsForAReaderOfTheStore() throws {
        let sample = try SampleCheckpoint.make()
        let reader = try #require(sample.store.readerLock())
        let started = Date()
        let arguments = ["rm", sample.manifest.id, "--store", sample.store.path]
        let removal = Thread.detachedResult { try Harness.stasis(arguments) }
        usleep(1_500_000)
        #expect(FileSystem.exists(sample.checkpoint + "/manifest.json"), "rm went ahead while a reader held the store")
        reader.release()
        let result = try removal.value()
        #expect(result.succeeded, "\(result.stderr)")
        #expect(Date().timeIntervalSince(started) >= 1.4)
        #expect(!FileSystem.exists(sample.checkpoint))
    }
}
