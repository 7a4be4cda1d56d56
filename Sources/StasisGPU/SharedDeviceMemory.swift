import Foundation
import StasisCore
import StasisOS

/// Device memory shared between the processes of a tree (cuMemExportToShareableHandle /
/// cuMemImportFromShareableHandle with POSIX descriptors: NCCL's peer-to-peer buffers, any framework that
/// passes allocations between processes). The driver cannot restore it; the agents can:
///
/// - at a checkpoint each agent names the descriptors it exported or imported (it keeps a duplicate of
///   each), and `SharePlan` pairs every import with its export (kcmp: the same open file in both processes).
///   The owner's agent moves the memory once; every importer's mapping is recorded as a reference to it.
///   When the exporter is gone (it exited after passing the memory on), one importer adopts it and the
///   others import from that one. An importer whose exporter lives outside the tree is refused, naming both.
/// - at a restore (and when a dump puts memory back) every agent re-creates and refills its own memory,
///   then `reconnect` has each owner export each shared allocation again and passes the new descriptor to its
///   importers' agents (SCM_RIGHTS), which map it where it was, with the access it had, before any held call
///   goes on.
struct SharePlan {
    /// By importer PID: what it imports, from which process's allocation.
    var imports: [Int32: [Manifest.AgentImport]] = [:]
    /// Imported allocations whose exporter is gone, and the process that takes them over.
    var adoptions: [(pid: Int32, id: UInt64)] = []

    typealias Holding = (pid: Int32, allocation: AgentSession.Allocation)

    /// Pairs the imports of `processes` with their exports. `sameFile(pid1, fd1, pid2, fd2)` tells whether two
    /// descriptors are one open file; `outsideHolder(pid, fd)` finds a process outside the tree that holds it.
    static func make(_ processes: [(pid: Int32, allocations: [AgentSession.Allocation])],
                     sameFile: (Int32, Int32, Int32, Int32) -> Bool? = ProcessFiles.same,
                     outsideHolder: (Int32, Int32) -> Int32? = { _, _ in nil }) throws -> SharePlan {
        let holdings = processes.flatMap { process in process.allocations.map { (pid: process.pid, allocation: $0) } }
        let exports = holdings.filter { $0.allocation.exported && !$0.allocation.imported }
        var plan = SharePlan()
        var unresolved: [Holding] = []
        for importer in holdings where importer.allocation.imported {
            guard let fd = importer.allocation.shareDescriptors.first else {
                throw StasisError(.gpu, "PID \(importer.pid) imported device memory (allocation \(hex(importer.allocation.id))) as a handle its agent could not keep: stasis cannot tell whose it is; nothing was touched")
            }
            let owner = exports.first { export in
                export.allocation.shareDescriptors.contains { sameFile(importer.pid, fd, export.pid, $0) == true }
            }
            if let owner {
                plan.add(importer, owner: owner)
            } else {
                unresolved.append(importer)
            }
        }
        // Imports of one export whose exporter is not in the tree: one group per open file.
        var groups: [[Holding]] = []
        for importer in unresolved {
            let fd = importer.allocation.shareDescriptors[0]
            if let index = groups.firstIndex(where: { sameFile(importer.pid, fd, $0[0].pid, $0[0].allocation.shareDescriptors[0]) == true }) {
                groups[index].append(importer)
            } else {
                groups.append([importer])
            }
        }
        for group in groups {
            let first = group[0]
            if let outside = outsideHolder(first.pid, first.allocation.shareDescriptors[0]) {
                throw StasisError(.gpu, "PID \(first.pid) maps device memory (allocation \(hex(first.allocation.id))) that PID \(outside), outside the checkpointed tree, shares with it; it cannot be carried without that process; nothing was touched",
                                  hint: "checkpoint a tree that holds both processes (their common parent)")
            }
            // The exporter exited: the memory lives on in the importers. The first takes it over.
            let adopter = group.min { $0.pid < $1.pid }!
            plan.adoptions.append((adopter.pid, adopter.allocation.id))
            for importer in group where importer.pid != adopter.pid || importer.allocation.id != adopter.allocation.id {
                plan.add(importer, owner: adopter)
            }
        }
        return plan
    }

    private mutating func add(_ importer: Holding, owner: Holding) {
        imports[importer.pid, default: []].append(.init(id: importer.allocation.id, ownerPID: owner.pid, ownerID: owner.allocation.id))
    }

    /// After every process of `sessions` has its own memory back: each owner exports each shared allocation
    /// once more, and every importer maps the new descriptor where it had the old. Only importers in
    /// `sessions` are reconnected. A failure names the allocation, both processes and the step.
    static func reconnect(_ imports: [Int32: [Manifest.AgentImport]], sessions: [Int32: AgentSession]) throws {
        var descriptors: [String: FileDescriptor] = [:]
        defer { descriptors.values.forEach { $0.closeQuietly() } }
        for (pid, list) in imports.sorted(by: { $0.key < $1.key }) {
            guard let importer = sessions[pid] else { continue }
            for shared in list {
                let what = "allocation \(hex(shared.ownerID)) of PID \(shared.ownerPID), shared with PID \(pid) (its \(hex(shared.id)))"
                guard let owner = sessions[shared.ownerPID] else {
                    throw StasisError(.gpu, "cannot restore \(what): its owner has no agent session")
                }
                let key = "\(shared.ownerPID)/\(shared.ownerID)"
                let descriptor: FileDescriptor
                if let known = descriptors[key] {
                    descriptor = known
                } else {
                    do { descriptor = try owner.exportAgain(shared.ownerID) } catch {
                        throw StasisError(.gpu, "cannot restore \(what): exporting it again failed: \(error)", cause: error)
                    }
                    descriptors[key] = descriptor
                }
                do { try importer.importAgain(shared.id, from: descriptor) } catch {
                    throw StasisError(.gpu, "cannot restore \(what): importing it again failed: \(error)", cause: error)
                }
            }
        }
    }

    static func hex(_ id: UInt64) -> String { String(id, radix: 16) }
}
