"""Everything DeepSpeed and torch.distributed; the only package that imports `deepspeed`.

    collectives.py  the process group (`init_distributed`, `Dist`), device, seeding, barriers,
                    sums, object broadcasts/gathers, global means and whitening over every rank
    ds_config.py    the DeepSpeed JSON of every engine, filled in from the run config; "auto"
                    precision and DS files for the accelerator
    engines.py      models built under ZeRO-3, training and frozen engines, the sharded EMA
    zero3.py        gathers of partitioned weights: full state dict, copy into a plain module,
                    Hugging Face export
    checkpoint.py   DeepSpeed's per-engine checkpoints: save, load, universal conversion

The checkpoint folder around the engines (manifest, `latest`, resume) is pipeline/checkpoint.py,
which reaches DeepSpeed only through this package. Nothing is re-exported here: import the module
(`from pipeline.distributed import collectives`), so that importing one does not load the others.
"""
