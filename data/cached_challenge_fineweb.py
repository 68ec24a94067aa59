#!/usr/bin/env python3
"""Upstream's name for ``python data/prepare.py download``, so that the command lines of upstream's README and
of the record READMEs work as written, e.g.

    MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf python3 data/cached_challenge_fineweb.py --variant sp4096 --train-shards 143

Same options, env vars and layout (``python data/prepare.py download --help``).
"""
import sys

import prepare  # this file's folder is on sys.path when it runs as a script

if __name__ == "__main__":
    sys.exit(prepare.main(["download", *sys.argv[1:]]))
