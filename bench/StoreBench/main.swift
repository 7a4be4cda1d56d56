// Placeholder: bench/store-throughput.sh's driver (ingest and rebuild throughput of the chunk store).
print("stasis-store-bench: not written yet")
