# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_container="gpus=1 runc"

# GPU containers under runc (Debian's, carried): a CUDA workload in a container that sees the host's programs
# and libraries and the NVIDIA device nodes (scripts/device/container-bundle.sh).
#  - runc checkpoint and restore with the stasis plugin loaded through the container's CRIU configuration;
#  - the same with the workload started by `stasis run` (the plugin then takes the driver path for it);
#  - `stasis dump --container` and `stasis restore` of the same container (the driver path, or the agent's
#    under `stasis run`, reached in the container's network namespace), verified after the restore.
section_container() {
    mkdir -p /opt/runc && for f in .device/runc-debs/*.deb; do dpkg -x "$f" /opt/runc; done
    local runclibs=/opt/runc/usr/lib/x86_64-linux-gnu:/opt/runc/lib/x86_64-linux-gnu
    local runc="env LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$runclibs PATH=/opt/stasis/bin:$PATH /opt/runc/usr/sbin/runc"
    $runc --version | head -n 1
    local label launcher way
    for label in plain agent; do
        launcher=""; [[ $label == agent ]] && launcher="/opt/stasis/bin/stasis run --"
        # Each way on a container of its own, stasis's first.
        for way in stasis runc; do
            local dir; dir=$(mktemp -d /tmp/stasis-container-$label-$way.XXXXXX)
            local id=stasis-gpu-$label-$way
            scripts/device/container-bundle.sh "$dir/bundle" "$dir/data" /opt/stasis/criu-plugins -- \
                $launcher /opt/stasis/bin/cuda-workload buffers --dir "$dir/data" --mem 1024 >"$dir/bundle.txt" 2>&1
            if ! $runc --log "$dir/runc.log" run -d --bundle "$dir/bundle" $id </dev/null >/dev/null 2>&1; then
                fail "runc container ($label, $way)" "did not start: $(tail -n 3 "$dir/runc.log") $(cat "$dir/bundle.txt")"; continue
            fi
            for _ in $(seq 600); do [[ -e $dir/data/ready ]] && break; sleep 0.1; done
            local pid; pid=$($runc state $id | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
            local before; before=$(verify "$pid" "$dir/data")
            if [[ $way == runc && $label == agent ]]; then
                # The plugin refuses a process under `stasis run` (the driver's restore of one failed here):
                # runc's checkpoint fails and the container runs on.
                if ! STASIS_CUDA_PLUGIN_LOG=$dir/plugin.log $runc --log "$dir/runc.log" checkpoint --image-path "$dir/img" --work-path "$dir/work" $id >"$dir/ckpt.txt" 2>&1 \
                    && grep -q 'stasis run' "$dir/plugin.log" && [[ $(verify "$pid" "$dir/data") == PASS* ]]; then
                    pass "runc checkpoint of a GPU container under stasis run refused by the plugin; the container runs on"
                else
                    fail "runc GPU container (agent)" "not refused, or the container did not run on: $(tail -n 3 "$dir/plugin.log" 2>/dev/null | tr '\n' ' ')"
                fi
                cp "$dir/plugin.log" "$LOGS/container-$label-plugin.txt" 2>/dev/null
            elif [[ $way == runc ]]; then
                # runc and CRIU with the stasis plugin, which logs its helper's steps to plugin.log.
                if [[ $before == PASS* ]] && STASIS_CUDA_PLUGIN_LOG=$dir/plugin.log $runc --log "$dir/runc.log" checkpoint --image-path "$dir/img" --work-path "$dir/work" $id >"$dir/ckpt.txt" 2>&1 \
                    && STASIS_CUDA_PLUGIN_LOG=$dir/plugin.log $runc --log "$dir/runc.log" restore -d --image-path "$dir/img" --work-path "$dir/work2" --bundle "$dir/bundle" $id </dev/null >/dev/null 2>&1; then
                    pid=$($runc state $id | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
                    local verdict; verdict=$(verify "$pid" "$dir/data")
                    [[ $verdict == PASS* ]] && pass "runc checkpoint + restore of a GPU container with the stasis plugin ($label): $verdict; $(grep -c 'stasis_cuda' "$dir/work/dump.log") plugin lines in CRIU's log" \
                        || fail "runc GPU container ($label)" "after restore: $verdict; plugin: $(tail -n 4 "$dir/plugin.log" 2>/dev/null | tr '\n' ' ')"
                else
                    fail "runc GPU container ($label)" "before: $before; $(tail -n 3 "$dir/runc.log"); $(grep -h Error "$dir"/work*/*.log 2>/dev/null | tail -n 4)"
                fi
                cp "$dir/plugin.log" "$LOGS/container-$label-plugin.txt" 2>/dev/null
            else
                # stasis through runc: the GPU steps find the container's processes under their new PIDs.
                if [[ $before == PASS* ]] && PATH=/opt/runc/usr/sbin:$PATH LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$runclibs $STASIS dump --container $id -D "$dir/ckpt" >"$dir/sdump.txt" 2>&1 \
                    && PATH=/opt/runc/usr/sbin:$PATH LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$runclibs $STASIS restore -D "$dir/ckpt" >"$dir/srestore.txt" 2>&1; then
                    pid=$($runc state $id | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
                    local verdict2; verdict2=$(verify "$pid" "$dir/data")
                    [[ $verdict2 == PASS* ]] && pass "stasis dump --container + restore of a GPU container ($label): $verdict2; $(agent_line "$dir/sdump.txt") $(grep -h 'gpu:' "$dir/sdump.txt" | sed 's/^ *//')" \
                        || fail "stasis GPU container ($label)" "after restore: $verdict2"
                else
                    fail "stasis GPU container ($label)" "before: $before; $(tail -n 4 "$dir/sdump.txt" "$dir/srestore.txt" 2>/dev/null)"
                fi
                cp "$dir/sdump.txt" "$LOGS/container-$label-sdump.txt" 2>/dev/null; cp "$dir/srestore.txt" "$LOGS/container-$label-srestore.txt" 2>/dev/null
            fi
            cp "$dir"/work*/*.log "$LOGS/" 2>/dev/null
            $runc kill $id KILL >/dev/null 2>&1; sleep 0.5; $runc delete -f $id >/dev/null 2>&1
        done
    done
}
