import Testing

/// The suites that run real processes through real CRIU, one test at a time: restores reuse PIDs, and the
/// machine has two cores. Unit suites (the other test targets) run in parallel beside them.
@Suite(.serialized) enum Integration {}
