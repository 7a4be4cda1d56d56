/// What an operation has done so far that a failure must undo, as CRIU's cr_dump_finish undoes cr_dump_tasks:
/// each step that succeeds records its undo, and one `undo` runs them all, the last done first. An undo that
/// cannot put things back says what it left behind (a line for the error the user sees).
public final class Rollback {
    private var undos: [(step: String, undo: () -> String?)] = []

    public init() {}

    /// Records how to undo `step`, which has just succeeded.
    public func onFailure(of step: String, _ undo: @escaping () -> String?) { undos.append((step, undo)) }

    /// Forgets the undo of `step` (it no longer applies: what it guarded was handed on).
    public func forget(_ step: String) { undos.removeAll { $0.step == step } }

    /// Runs every recorded undo, the last first; returns what could not be put back.
    public func undo() -> [String] {
        defer { undos = [] }
        return undos.reversed().compactMap { $0.undo() }
    }
}
