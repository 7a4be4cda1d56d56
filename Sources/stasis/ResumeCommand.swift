import ArgumentParser
import StasisCore
import StasisEngine
import StasisGPU
import StasisStore

struct ResumeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resume",
        abstract: "Put back the device memory of a process whose agent still holds it, and let its CUDA calls go on.",
        discussion: """
        For the rare dump that fails after an agent gave its process's device memory back and cannot put it \
        back either (another process took the GPU memory in between), or a stasis that died at that moment: \
        the memory is in the store under a rescue entry (listed by `stasis ls`, kept by gc), or, for a \
        --leave-running dump into a store on a disk, in that dump's stage in memory (/dev/shm/stasis-stage-*, \
        looked up too), and the process waits with its CUDA calls held. `stasis resume PID` resumes the driver's state if needed, re-creates \
        and refills the memory, lets the calls go on and drops the rescue entry. A process started by `stasis run` \
        runs this itself once the stasis that released its memory has been gone for STASIS_AGENT_ORPHAN_GRACE \
        seconds (5), and says so on its standard error; by hand it is needed only where that failed.
        """)

    @Argument(help: "The process whose agent holds its memory.")
    var pid: Int32

    @OptionGroup var store: StoreOptions

    @OptionGroup var output: OutputOptions

    func run() throws {
        try Output.run(json: output.json) {
            let chunks = try Backends().openStore(store.store, create: false)
            let report = try AgentRescue.resume(pid: pid, store: chunks)
            if output.json { return Output.json(report) }
            print("resumed PID \(report.pid): \(Format.bytes(report.bytes)) of device memory put back from \(report.rescue) in \(Format.seconds(report.seconds))")
        }
    }
}
