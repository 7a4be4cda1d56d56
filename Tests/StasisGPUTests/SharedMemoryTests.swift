import Foundation
import StasisAgentStandIn
import StasisCore
@testable import StasisGPU
import StasisOS
import StasisTestSupport
import Testing

/// Device memory shared between processes, on its CPU side: which export an import came from (the kernel
/// says whether two descriptors are one open file), what happens when the exporter is gone or outside the
/// tree, and a descriptor passed to and from an agent over its real socket. The GPU side runs on the device
/// (scripts/device/sections/shared.sh).
@Suite struct SharedDeviceMemory {
    typealias Allocation = AgentSession.Allocation

    static func allocation(_ id: UInt64, exported: Bool = false, imported: Bool = false, _ descriptors: [FileDescriptor]) -> Allocation {
        var allocation = Allocation(id: id, bytes: imported ? 0 : 2 << 20, device: 0)
        allocation.exported = exported
        allocation.imported = imported
        allocation.shareDescriptors = descriptors.map(\.rawValue)
        return allocation
    }

    /// The test plays every process with descriptors of its own: the processes' PIDs are labels, the files real.
    static func sameFile(_: Int32, _ fd1: Int32, _: Int32, _ fd2: Int32) -> Bool? { ProcessFiles.same(getpid(), fd1, getpid(), fd2) }

    @Test func everyImportIsPairedWithTheExportItCameFrom() throws {
        let shared = try FileDescriptor.makePipe(), other = try FileDescriptor.makePipe()
        let received = try shared.readEnd.duplicate(), alsoReceived = try shared.readEnd.duplicate(), unrelated = try other.readEnd.duplicate()
        defer { [shared.readEnd, shared.writeEnd, other.readEnd, other.writeEnd, received, alsoReceived, unrelated].forEach { $0.closeQuietly() } }
        let processes: [(pid: Int32, allocations: [Allocation])] = [
            (100, [Self.allocation(1, exported: true, [shared.readEnd]), Self.allocation(2, exported: true, [other.readEnd])]),
            (101, [Self.allocation(5, imported: true, [received])]),
            (102, [Self.allocation(6, imported: true, [alsoReceived]), Self.allocation(7, imported: true, [unrelated])]),
        ]
        let plan = try SharePlan.make(processes, sameFile: Self.sameFile)
        #expect(plan.adoptions.isEmpty)
        #expect(plan.imports[101] == [.init(id: 5, ownerPID: 100, ownerID: 1)])
        #expect(plan.imports[102] == [.init(id: 6, ownerPID: 100, ownerID: 1), .init(id: 7, ownerPID: 100, ownerID: 2)])
    }

    /// The exporter exited after passing the memory on: the first importer takes it over, the others import
    /// from it.
    @Test func memoryWhoseExporterIsGoneIsAdoptedByAnImporter() throws {
        let shared = try FileDescriptor.makePipe()
        let first = try shared.readEnd.duplicate(), second = try shared.readEnd.duplicate()
        defer { [shared.readEnd, shared.writeEnd, first, second].forEach { $0.closeQuietly() } }
        let plan = try SharePlan.make([(201, [Self.allocation(9, imported: true, [second])]), (200, [Self.allocation(8, imported: true, [first])])],
                                      sameFile: Self.sameFile)
        #expect(plan.adoptions.map(\.pid) == [200] && plan.adoptions.map(\.id) == [8])
        #expect(plan.imports == [201: [.init(id: 9, ownerPID: 200, ownerID: 8)]])
    }

    /// An importer whose exporter lives outside the tree is refused before anything is touched, naming both.
    @Test func anExporterOutsideTheTreeIsRefusedByName() throws {
        let shared = try FileDescriptor.makePipe()
        defer { [shared.readEnd, shared.writeEnd].forEach { $0.closeQuietly() } }
        let error = #expect(throws: StasisError.self) {
            _ = try SharePlan.make([(300, [Self.allocation(4, imported: true, [shared.readEnd])])], sameFile: Self.sameFile,
                                   outsideHolder: { _, _ in 999 })
        }
        #expect(error?.message.contains("PID 300") == true && error?.message.contains("PID 999, outside the checkpointed tree") == true,
                "\(String(describing: error))")
        let untraceable = #expect(throws: StasisError.self) {
            _ = try SharePlan.make([(301, [Self.allocation(4, imported: true, [])])], sameFile: Self.sameFile)
        }
        #expect(untraceable?.message.contains("cannot tell whose it is") == true)
    }

    /// The kernel finds the process outside that holds the same open file (what names the exporter above).
    @Test func theProcessHoldingAnOpenFileIsFound() throws {
        let shared = try FileDescriptor.makePipe()
        defer { [shared.readEnd, shared.writeEnd].forEach { $0.closeQuietly() } }
        let child = try Spawn.start("/bin/sleep", ["30"], descriptors: [shared.readEnd: 3])
        defer { Signals.kill(child); Spawn.wait(child) }
        let deadline = Date().addingTimeInterval(5)
        var found: (pid: Int32, fd: Int32)?
        while found == nil, Date() < deadline {
            found = ProcessFiles.holder(of: shared.readEnd.rawValue, in: getpid(), excluding: [getpid()])
            if found == nil { Thread.sleep(forTimeInterval: 0.02) }
        }
        #expect(found?.pid == child && found?.fd == 3)
        #expect(ProcessFiles.same(getpid(), shared.readEnd.rawValue, getpid(), shared.writeEnd.rawValue) == false)
    }

    /// A restore that cannot reconnect shared memory names the allocation, both processes and the step.
    @Test func aReconnectionThatCannotHappenSaysWhatAndWhere() throws {
        let peer = try ProtocolPeer(memory: [0x10: [UInt8](repeating: 1, count: 4096)], slots: 2)
        defer { peer.stop() }
        let session = try #require(try AgentSession.open(pid: getpid()))
        defer { session.disconnect() }
        let error = #expect(throws: StasisError.self) {
            try SharePlan.reconnect([getpid(): [.init(id: 0x11, ownerPID: 4242, ownerID: 0x7)]], sessions: [getpid(): session])
        }
        #expect(error?.message == "cannot restore allocation 7 of PID 4242, shared with PID \(getpid()) (its 11): its owner has no agent session",
                "\(String(describing: error))")
    }

    /// EXPORT's descriptor comes back over the agent's socket, and IMPORT's reaches the agent: the same open
    /// file at both ends.
    @Test func descriptorsTravelToAndFromAnAgent() throws {
        let peer = try ProtocolPeer(memory: [0x10: [UInt8](repeating: 1, count: 4096)], slots: 2)
        defer { peer.stop() }
        let session = try #require(try AgentSession.open(pid: getpid()))
        defer { session.disconnect() }
        let exported = try session.exportAgain(0x10)
        defer { exported.closeQuietly() }
        try session.importAgain(0x11, from: exported)
        let sent = try #require(peer.exports[0x10]), received = try #require(peer.imports[0x11])
        #expect(ProcessFiles.same(getpid(), sent, getpid(), exported.rawValue) == true)
        #expect(ProcessFiles.same(getpid(), received, getpid(), sent) == true)
    }
}
