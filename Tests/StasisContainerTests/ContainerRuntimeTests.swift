import Foundation
import StasisContainer
import StasisCore
import Testing

/// The container runtime through its protocol (`any ContainerRuntime`), as the engine uses it: a container
/// the runtime does not know is a clear error at every step, before anything is touched.
@Suite struct ContainerRuntimeSeam {
    let missing = "stasis-no-such-container-\(UInt32.random(in: 0...UInt32.max))"

    func runtime() throws -> any ContainerRuntime { try Runc.locate() }

    @Test func theRuntimeNamesItselfAsManifestsRecordIt() throws {
        let runtime = try runtime()
        #expect(runtime.name == "runc")
        #expect(FileManager.default.isExecutableFile(atPath: runtime.path))
    }

    @Test func theStateOfAContainerTheRuntimeDoesNotKnowIsProcessNotFound() throws {
        let error = try #require(throws: StasisError.self) { try runtime().state(missing) }
        #expect(error.code == .processNotFound)
        #expect(error.message.contains(missing))
    }

    /// (`remove` is left out: `runc delete --force` of a container it does not know succeeds, as there is
    /// nothing left to remove.)
    @Test func everyStepOnAContainerTheRuntimeDoesNotKnowIsARuntimeError() throws {
        let runtime = try runtime()
        let steps: [(String, () throws -> Void)] = [
            ("processes", { _ = try runtime.processes(missing) }),
            ("pause", { try runtime.pause(missing) }),
            ("resume", { try runtime.resume(missing) }),
        ]
        for (step, body) in steps {
            let error = try #require(throws: StasisError.self, "\(step)") { try body() }
            #expect(error.code == .runtime, "\(step)")
            #expect(error.message.contains(missing), "\(step)")
        }
    }
}
