#!/bin/sh
# Impure on purpose: the wall clock, which no namespace can fix. Two runs give two output
# CIDs, and `ipfs-execute verify` reports the run as not reproducible. (busybox `date` has no
# %N: the mtime of a new file shows the clock to the nanosecond.)
date +%s > /output/now
touch /tmp/now && stat -c %y /tmp/now >> /output/now
