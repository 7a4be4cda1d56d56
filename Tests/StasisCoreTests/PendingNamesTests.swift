import Foundation
import StasisCore
import Testing

/// The kit's `PendingNames`: what an overlapped pull and the restore reading it agree through.
@Suite struct PendingNamesTests {
    @Test func aReaderWaitsForItsNameAndNoOther() throws {
        let names = PendingNames(["a", "b"])
        try names.wait(for: "c")  // never promised: at once
        let readA = DispatchSemaphore(value: 0)
        Thread { do { try names.wait(for: "a"); readA.signal() } catch {} }.start()
        #expect(readA.wait(timeout: .now() + 0.2) == .timedOut, "a is still pending")
        names.arrived(["b"])
        #expect(readA.wait(timeout: .now() + 0.2) == .timedOut, "b's arrival does not let a's reader go")
        names.arrived(["a"])
        #expect(readA.wait(timeout: .now() + 5) == .success)
        #expect(names.remaining == 0)
    }

    @Test func aFailedProducerFailsEveryReaderStillWaitingAndNoneWhoseNameArrived() throws {
        struct Gone: Error {}
        let names = PendingNames(["a", "b"])
        names.arrived(["a"])
        let failed = Locked(false)
        let done = DispatchSemaphore(value: 0)
        Thread {
            do { try names.wait(for: "b") } catch { failed.withLock { $0 = error is Gone } }
            done.signal()
        }.start()
        names.fail(Gone())
        #expect(done.wait(timeout: .now() + 5) == .success)
        #expect(failed.current)
        try names.wait(for: "a")  // arrived before the failure: readable
        #expect(throws: Gone.self) { try names.wait(for: "b") }
    }
}
