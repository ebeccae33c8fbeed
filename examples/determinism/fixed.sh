#!/bin/sh
# Writes every source of nondeterminism the sandbox fixes into /output, one file each: runs of
# the same (rootfs, input, args) give the same output CID, wherever the trees were staged.
#   ipfs-execute ROOTFS INPUT sh /input/fixed.sh [clocks]
# `clocks` adds /proc/uptime (whole seconds): fixed only where the tool may make a time
# namespace (as root). Needs busybox; Python's view is added when the image has python3.
set -eu
out=/output

# First, before the other probes take their time: the uptime starts near 1 s. (The second
# field, idle time, is the host's.)
if [ "${1:-}" = clocks ]; then
    cut -d. -f1 /proc/uptime > "$out/uptime"
fi
hostname > "$out/hostname"
env | sort > "$out/env"
umask > "$out/umask"
id > "$out/id"
pwd > "$out/pwd"
{ ulimit -a; echo hard:; ulimit -Ha; } > "$out/ulimit"
cat /proc/self/personality > "$out/personality"
# ASLR off: the same addresses in every run. Device and inode columns are left out: they name
# the staged copy of each file, which differs between staging locations.
awk '{ print $1, $2, $3, $6 }' /proc/self/maps > "$out/maps"
{ nproc; grep -c '^cpu[0-9]' /proc/stat; grep '^btime' /proc/stat; } > "$out/cpus"
if command -v python3 > /dev/null; then
    python3 -c 'import os
print("cpu_count", os.cpu_count())
print("sysconf", os.sysconf("SC_NPROCESSORS_ONLN"), os.sysconf("SC_NPROCESSORS_CONF"))
print("affinity", len(os.sched_getaffinity(0)))
print("hash", hash("determinism"), list({"alpha", "beta", "gamma", "delta"}))' > "$out/python"
fi
# Staged trees: modes and mtimes fixed. The mount points of the sandbox's own file systems
# (/dev /proc /tmp) and /output carry the time of this run: left out.
ls -ln --full-time /input > "$out/input"
find /input | sort | while read -r path; do stat -c '%n %A %s %Y' "$path"; done >> "$out/input"
ls -ln --full-time / | grep -v -E ' (dev|proc|tmp|output)$' > "$out/root"
ls -ln --full-time /bin | head -20 >> "$out/root"
