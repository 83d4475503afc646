"""Benchmark of one PPO iteration against plain single-process floors:
`deepspeed --num_gpus 2 launch/bench.py --json bench.json` (`--smoke` for a tiny check run, `--help`)."""
from pipeline.bench import main

if __name__ == "__main__":
    main()
