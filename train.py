#!/usr/bin/env python
"""Train a DRT (or a baseline) from a run config.

    python train.py --config tiny
    python train.py --config tiny --set train.steps=300 model.dropout_rate=0.1 optim.peak_lr=1e-3
    python train.py --config drt-133m --set data.corpus=/data/pg19 data.tokenizer=/data/tok.json

The run folder (train.run_dir, default runs/<name>) is resumed from its latest checkpoint when it
holds one. Multi-host: launch one process per host with --coordinator HOST:PORT --num-processes N
--process-id I (or the env vars DRT_COORDINATOR / DRT_NUM_PROCESSES / DRT_PROCESS_ID).
Configuration and data errors (and a run folder whose checkpoints are all unreadable) print one line on
stderr and exit with status 2; a non-finite loss or parameter stops the run with one line and status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="a configs/<name>.py name or a path to a config file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. train.steps=300")
    parser.add_argument("--run-dir", help="shortcut for --set train.run_dir=PATH")
    parser.add_argument("--coordinator", help="multi-host: coordinator address host:port")
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's index")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from drt_jax.config import ConfigError
    from drt_jax.data.config import DataError
    from drt_jax.train.config import load_run_config

    overrides = list(args.set)
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    for flag, key in ((args.coordinator, "coordinator"), (args.num_processes, "num_processes"), (args.process_id, "process_id")):
        if flag is not None:
            overrides.append(f"mesh.{key}={flag!r}" if isinstance(flag, str) else f"mesh.{key}={flag}")
    try:
        run = load_run_config(args.config, overrides)
        if args.print_config:
            print(run.to_json())
            return 0
        from drt_jax.train.loop import train

        summary = train(run)
    except (ConfigError, DataError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a non-finite step: nothing of it was saved
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if summary.last_loss is None or summary.last_loss == summary.last_loss else 1


if __name__ == "__main__":
    sys.exit(main())
