"""Stage 1 alone, supervised fine-tuning:
`deepspeed launch/sft.py [--config FILE] [--option value ...]`."""

from pipeline.orchestrator import main

if __name__ == "__main__":
    main(("sft",), "Stage 1 alone: supervised fine-tuning (causal-LM loss on response tokens).")
