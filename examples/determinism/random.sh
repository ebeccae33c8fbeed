#!/bin/sh
# Impure on purpose: random bytes, which no namespace can fix. Two runs give two output CIDs,
# and `ipfs-execute verify` reports the run as not reproducible.
head -c 16 /dev/urandom | od -x > /output/random
