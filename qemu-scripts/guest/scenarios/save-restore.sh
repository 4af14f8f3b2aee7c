# save-restore: two O_DIRECT writers rewrite and read back their 1 MiB round after round while
# the host saves the VM to a file (migrate to exec:), quits QEMU and restores the file in a new
# QEMU on the same remapblk. After the host's line (sent to the restored guest) every writer
# must finish two more rounds, and each region must hold its writer's last round.
writers_start 1 8 16
writers_advance 1 60
log "IO-RUNNING"
read -r line || fail "console closed"
log "restored"
writers_advance 2 60
writers_stop_verify
