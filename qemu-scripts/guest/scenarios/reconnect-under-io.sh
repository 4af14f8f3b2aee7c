# reconnect-under-io: four O_DIRECT writers (on the guest's two CPUs, so on both queues) rewrite
# their 1 MiB and read it back, round after round, while the host SIGKILLs and restarts remapblk
# `kills` times (QEMU reconnects: reconnect=1; remapblk resubmits what the inflight region says
# was in flight). No request may fail, every writer must finish two more rounds after each
# restart, and each region must end up holding its writer's last round. args: kills=
eval "$args"
writers_start 1 8 16 24 32
writers_advance 1 60
i=1
while [ $i -le "$kills" ]; do
    log "IO-RUNNING $i"
    read -r line || fail "console closed"
    writers_advance 2 60
    log "IO-PROGRESS $i"
    i=$((i + 1))
done
writers_stop_verify
