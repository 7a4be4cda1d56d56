// swift-tools-version: 6.0
// stasis: checkpoint/restore for GPU process trees. One package, small libraries, a thin command on top.
//
//   StasisCore    leaf: errors, the manifest schema and its validation, formatting, the concurrency kit, rollback
//   StasisOS      the system boundary, the only module that imports Glibc: descriptors (swift-system's, re-exported),
//                 files (AtomicFile), /proc, processes, signals, sockets, hashing of files (CStasisLinux: C shims),
//                 TLS 1.3 (CStasisTLS: a thin layer over OpenSSL)
//   StasisCRIU    CRIU through `criu swrk` RPC (generated protobuf code committed under Generated/)
//   StasisGPU     the GPU driver (dlopen'd at run time) and the per-process device steps; the driver's
//                 checkpoint steps themselves are C (CStasisCUDA), shared with the CRIU plugin
//   StasisStore   content-addressed, compressed chunks shared by checkpoints (CStasisCompress: libzstd, liblz4)
//   StasisImage   the checkpoint directory: staging, writing the manifest (CheckpointWriter), verification, publish
//   StasisEngine  dump / restore / check / inspect / verify / migrate / serve, built from the modules above
//   StasisCRIUPlugin  the same driver steps as a CRIU plugin, for plain criu, runc and podman
//   StasisAgent   libstasis-agent.so, preloaded into GPU programs by `stasis run`: it interposes the CUDA
//                 driver API and moves device memory itself (C); CStasisAgentProtocol: its control messages
//   stasis        the command line
//   stasis-workload  C test workloads that build state and verify it themselves after a restore
//   stasis-store-bench  the chunk store's throughput benchmark (bench/store-throughput.sh)
import PackageDescription

let package = Package(
    name: "stasis",
    products: [
        .executable(name: "stasis", targets: ["stasis"]),
        .executable(name: "stasis-workload", targets: ["stasis-workload"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.28.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.0.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.0"),
    ],
    targets: [
        .target(name: "StasisCore"),
        .target(name: "CStasisLinux"),
        // TLS for migrations: a thin layer over OpenSSL's libssl (scripts/install-build-deps.sh installs libssl-dev).
        .target(name: "CStasisTLS", linkerSettings: [.linkedLibrary("ssl"), .linkedLibrary("crypto")]),
        .target(name: "StasisOS", dependencies: [
            "StasisCore", "CStasisLinux", "CStasisTLS",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        .target(name: "StasisCRIU", dependencies: [
            "StasisCore", "StasisOS",
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ], exclude: ["Proto"]),
        .target(name: "CStasisCUDA"),
        // Compiled here as a check; the loadable libstasis_cuda_plugin.so comes from scripts/build-criu-plugin.sh.
        .target(name: "StasisCRIUPlugin", dependencies: ["CStasisCUDA"]),
        .target(name: "CStasisAgentProtocol"),
        // Compiled here as a check; the preloadable libstasis-agent.so comes from scripts/build-agent.sh (a
        // SwiftPM library product would link the Swift runtime into every GPU program).
        // kernels/: the GPU code, compiled by scripts/gen-chunk-digest.sh into chunk_digest_kernel.h.
        .target(name: "StasisAgent", dependencies: ["CStasisAgentProtocol"], exclude: ["kernels"]),
        .target(name: "StasisGPU", dependencies: ["StasisCore", "StasisOS", "StasisStore", "CStasisCUDA", "CStasisAgentProtocol"]),
        .target(name: "CStasisCompress", linkerSettings: [.linkedLibrary("zstd"), .linkedLibrary("lz4")]),
        .target(name: "StasisStore", dependencies: [
            "StasisCore", "StasisOS", "CStasisCompress",
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        .target(name: "StasisImage", dependencies: ["StasisCore", "StasisOS", "StasisStore"]),
        .target(name: "StasisRegistry", dependencies: [
            "StasisCore", "StasisOS",
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        .target(name: "StasisContainer", dependencies: ["StasisCore", "StasisOS"]),
        .target(name: "StasisEngine", dependencies: [
            "StasisCore", "StasisOS", "StasisCRIU", "StasisGPU", "StasisImage", "StasisStore", "StasisContainer", "StasisRegistry",
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        .executableTarget(name: "stasis", dependencies: [
            "StasisEngine", "StasisCore", "StasisOS", "StasisStore", "StasisImage", "StasisCRIU", "StasisGPU", "StasisRegistry",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "stasis-workload", path: "Workloads/cpu"),
        // bench/store-throughput.sh's driver: the chunk store's ingest and rebuild on N threads.
        .executableTarget(name: "stasis-store-bench", dependencies: ["StasisStore", "StasisCore", "StasisOS"], path: "bench/StoreBench"),
        // The other end of the agent's control channel, without a GPU: for the tests and stasis-agent-bench.
        .target(name: "StasisAgentStandIn", dependencies: ["CStasisAgentProtocol", "CStasisLinux", "StasisCore", "StasisOS", "StasisStore"], path: "Tests/AgentStandIn"),
        // bench/agent-cpu.sh's driver: stasis's side of an evacuation and a refill against the stand-in.
        .executableTarget(name: "stasis-agent-bench", dependencies: ["StasisGPU", "StasisStore", "StasisCore", "StasisOS", "StasisAgentStandIn"],
                          path: "bench/AgentBench"),

        // Tests. One target per module for what dumps and restores no process, one integration target for real
        // processes through real CRIU, runc and network namespaces (root), and their shared support.
        .target(name: "StasisTestSupport", dependencies: ["StasisCore", "StasisOS", "StasisStore"], path: "Tests/Support"),
        .testTarget(name: "StasisCoreTests", dependencies: ["StasisCore", "StasisImage"]),
        .testTarget(name: "StasisOSTests", dependencies: ["CStasisLinux", "StasisCore", "StasisOS", "StasisTestSupport"]),
        .testTarget(name: "StasisCRIUTests", dependencies: ["StasisCRIU"]),
        .testTarget(name: "StasisImageTests", dependencies: ["StasisCore", "StasisOS", "StasisImage", "StasisTestSupport"]),
        .testTarget(name: "StasisStoreTests", dependencies: ["StasisCore", "StasisOS", "StasisStore", "StasisTestSupport"]),
        .testTarget(name: "StasisRegistryTests", dependencies: ["StasisCore", "StasisRegistry"]),
        .testTarget(name: "StasisContainerTests", dependencies: ["StasisCore", "StasisOS", "StasisContainer", "StasisTestSupport"]),
        .testTarget(name: "StasisGPUTests", dependencies: ["StasisCore", "StasisOS", "StasisStore", "StasisGPU", "StasisAgentStandIn", "StasisTestSupport"]),
        .testTarget(name: "StasisEngineTests", dependencies: ["StasisCore", "StasisOS", "StasisStore", "StasisImage", "StasisEngine", "StasisAgentStandIn",
                                                             "StasisTestSupport"]),
        .testTarget(name: "StasisIntegrationTests", dependencies: ["StasisCore", "StasisOS", "StasisStore", "StasisImage", "StasisEngine", "StasisCRIU",
                                                                  "StasisGPU", "StasisContainer", "StasisRegistry", "StasisTestSupport"]),
    ]
)
